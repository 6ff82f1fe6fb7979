"""Against phone lag: bound the GPU work submitted at once, and ask for a low queue priority.

A phone's GPU also draws the user interface. A 2048-token prefill submitted in one go keeps the GPU
busy for seconds without a break, and the compositor's frames wait behind it: the UI stutters.
Transformer-Lite keeps each submission short and the LLM's queue at low priority. tvm_lite has the
two knobs, as ``Engine`` options:

``gpu_slice=N``
    At most N kernels are submitted between two flushes: a VM instrument counts the kernels a call
    launches and, after every N, flushes and waits for the device queue (``Device.sync()``), so the
    GPU is free between slices. Prefill calls are also cut into ``prefill_chunk`` tokens (the
    engine's existing chunking), which bounds what one kernel does. Decode steps are short by nature
    (one token) and are not sliced.
``priority="low"``
    CUDA: the engine's work goes to a stream created with the lowest priority the device allows
    (``cuStreamCreateWithPriority``, through the driver API), set as TVM's stream for the device.
    OpenCL: TVM's stock runtime creates its command queues in C++ at workspace initialisation
    (``OpenCLWorkspace::Init``) without properties, so a queue priority
    (``CL_QUEUE_PRIORITY_KHR``, ``cl_khr_priority_hints``) can only be asked for there, in a C++
    build of the runtime; from Python the option reports that it is not available. CPU: nothing to
    do.

``tvm_lite/bench/gpu_slice.py`` measures what the slices buy: the longest single kernel and the
longest uninterrupted submission during a prefill, with and without slicing.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

from .cuda_graphs import Driver, make_stream
from .errors import TvmLiteError

PRIORITIES = ("normal", "low")


def is_kernel(name: str) -> bool:
    """A VM call that launches device work (a compiled PrimFunc), not a VM builtin."""
    return not name.startswith(("vm.", "relax.", "runtime."))


@dataclass
class Submissions:
    """What a slicer saw: the wall time of each uninterrupted submission (from one flush to the
    next, waiting for the device included) and the kernels in each."""

    seconds: list = field(default_factory=list)
    kernels: list = field(default_factory=list)

    @property
    def longest_s(self) -> float:
        return max(self.seconds, default=0.0)


class GpuSlicer:
    """A VM instrument that flushes the device queue after every ``kernels`` kernel launches.

    ``kernels=None`` never flushes inside a call: it only records the call as one submission
    (what an engine without ``gpu_slice`` does), so both cases are measured the same way.
    """

    def __init__(self, device, kernels: int | None, sync=None):
        if kernels is not None and kernels < 1:
            raise ValueError(f"gpu_slice={kernels}: the number of kernels between flushes must be "
                             ">= 1 (or None for no slicing)")
        self.device, self.kernels = device, kernels
        self.sync = sync or device.sync  # waits for the queue the engine's kernels go to
        self.record = Submissions()
        self._count = 0
        self._t0 = 0.0

    def _flush(self) -> None:
        self.sync()
        now = time.perf_counter()
        self.record.seconds.append(now - self._t0)
        self.record.kernels.append(self._count)
        self._t0, self._count = now, 0

    def __call__(self, func, name, before_run, ret_value, *args):
        if not before_run and is_kernel(name):
            self._count += 1
            if self.kernels is not None and self._count >= self.kernels:
                self._flush()
        return 0  # VMInstrumentReturnKind.NO_OP: the call runs as usual

    def run(self, vm, call):
        """Run ``call()`` (one VM function call) sliced; the tail after the last flush is the
        call's last submission."""
        self.sync()
        self._t0, self._count = time.perf_counter(), 0
        vm.set_instrument(self)
        try:
            out = call()
        finally:
            vm.set_instrument(no_instrument)
        if self._count:
            self._flush()
        return out


def no_instrument(*_args):
    """The VM instrument that does nothing (set to remove another)."""
    return 0


# -- queue priority -----------------------------------------------------------------------------
class PriorityNotSupported(TvmLiteError, RuntimeError):
    """The runtime cannot give this device's queue another priority from Python."""


def set_priority(device, priority: str):
    """Ask for ``priority`` on ``device``'s queue. Returns what was done (for logs and
    benchmarks) and the function that waits for that queue (``Device.sync`` waits for TVM's
    default stream only).

    Raises ``PriorityNotSupported`` where the runtime cannot do it, naming why."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority={priority!r}: expected one of {PRIORITIES}")
    if priority == "normal":
        return "normal (the runtime's default queue)", device.sync
    # the device type without the RPC session bits (a remote device's type is offset by 128s)
    kind = device._DEVICE_TYPE_TO_NAME.get(int(device.dlpack_device_type()) % 128, "?")
    if kind == "cpu":
        return "cpu: no queue (nothing to do)", device.sync
    if kind == "cuda":
        drv = Driver(PriorityNotSupported, "priority='low' on CUDA")
        device.sync()  # TVM's runtime has made the device's primary context current
        least, greatest = ctypes.c_int(), ctypes.c_int()
        drv("cuCtxGetStreamPriorityRange", ctypes.byref(least), ctypes.byref(greatest))
        stream = make_stream(device, drv, priority=least.value)

        def sync():
            drv("cuStreamSynchronize", stream)

        sync.stream = stream  # (CUDA graphs record on it: tvm_lite/cuda_graphs.py)

        return (f"cuda stream at priority {least.value} (the lowest; the device's range is "
                f"{least.value}..{greatest.value})", sync)
    if kind == "opencl":
        raise PriorityNotSupported(
            "priority='low' on OpenCL: TVM's stock OpenCL runtime creates its command queues in C++ "
            "at workspace init (OpenCLWorkspace::Init) without queue properties; a low priority "
            "(CL_QUEUE_PRIORITY_KHR, cl_khr_priority_hints) must be set there, in a C++ build of "
            "the runtime")
    raise PriorityNotSupported(f"priority='low' is not available for {kind} devices")
