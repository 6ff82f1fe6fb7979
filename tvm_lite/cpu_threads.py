"""How many threads TVM's CPU thread pool runs: one per physical core.

Without ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``), TVM 0.27's runtime takes half of
``std::thread::hardware_concurrency()`` on x86, assuming two hyper-threads per core; on a machine
without SMT (this 2-core VM, most cloud vCPU slices, phones) that leaves half the cores idle: every
parallel kernel ran on one thread here. ``configure()`` sets ``TVM_NUM_THREADS`` to the number of
physical cores this process may run on, before the pool starts (it reads the variable once, at
the first parallel kernel). A value the user set is kept.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TVM_NUM_THREADS"


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (Linux sysfs; else all CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def configure() -> int:
    """Set ``TVM_NUM_THREADS`` (unless set) to the physical cores; return the thread count."""
    if ENV not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ[ENV] = str(physical_cores())
    return int(os.environ.get(ENV) or os.environ["OMP_NUM_THREADS"])
