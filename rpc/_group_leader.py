"""Run a TVM RPC entry point so that it and every process it forks stop together.

    python -m tvm_lite.rpc._group_leader tvm.exec.rpc_server --host 127.0.0.1 ...

``processes.py`` starts trackers and servers through this, each in its own process group. The
group stops as one when this process gets SIGTERM/SIGINT, and also when the process that started
it dies without stopping it (killed, crashed): Linux's parent-death signal. Without this, TVM's
``popen_worker`` children outlive a killed parent and keep its port (FIELD_GUIDE, RPC gotchas).
The parent-death signal fires when the *thread* that started this process exits, so start
trackers and servers from a thread that outlives them (the main thread).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def _stop_group(_signum, _frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)  # the workers and session processes
    finally:
        os._exit(0)


def main() -> None:
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _stop_group)
    signal.signal(signal.SIGINT, _stop_group)
    if os.getppid() != parent:  # the parent died before the signal was armed
        _stop_group(None, None)
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
