"""Decode steps and prompt chunks replayed as CUDA graphs: one launch each, not one a kernel.

A decode step of a small model is host-bound on a fast GPU: the VM issues ~200 kernels a step,
each costing the host several microseconds (argument checks, views, the launch), more than the
GPU needs to run them (SmolLM2 on an H200: 1.8 ms of host time for 0.8 ms of kernels). A CUDA
graph records the kernels of one call once and replays them with one ``cuGraphLaunch``.

A graph replays the arguments it recorded, so what it replays must not change between steps.
``decode_padded`` (``relax_passes/add_step_entries.py``) is such a call: it reads its token and
position from device buffers and advances them itself, writes its K/V row at the position it
reads (``relax_passes/decode_writes_at_position.py``), and attends over a context padded to a
bucket of ``PADDED_BUCKET`` keys, the keys after the position masked. Every step of a bucket is
the same call on the same buffers; only the bucket (``past_len``) changes every
``PADDED_BUCKET`` steps. So :class:`StepGraphs` keeps one graph per bucket:

1. the first step of a bucket runs as an ordinary call (it loads the kernels and fills the
   VM's memory pool, which capture must not do);
2. the second is recorded (``cuStreamBeginCapture`` .. ``cuStreamEndCapture`` on the engine's
   stream, relaxed mode), instantiated, and launched;
3. the others are ``cuGraphLaunch`` alone.

Prompt chunks (:data:`PROMPT_CHUNKS`). A prompt longer than a chunk runs its chunks before the
last through ``prefill_chain``: ~200 kernels each, and on a fast GPU every kernel boundary of a
queued stream costs ~2 us (Llama-1B's 2048 tokens in 8 chunks of 256 on an H100: 2.8 ms of a
24.2 ms prompt with no kernel running). Such a chunk is the same call whenever it starts at the
same row with the same length: ``Engine.prefill_greedy`` keys it by (entry, first row, tokens,
padded length), runs it through the same :class:`StepGraphs` (a call, the recording, then
replays), and copies each prompt's ids into a device buffer kept per key, the address the graph
recorded. Every fresh prompt's chunks start at rows 0, c, 2c..., so from the third prompt on its
chunks are graph launches; only a fresh session's prompt takes graphs (a follow-up prompt's rows
would add keys, buffers and graphs that nothing replays: the keys stay bounded by
``max_context`` / c). The copy is synchronous and on the engine's stream (or the legacy
default stream, which waits for a blocking stream): it lands after the chunks queued before it
have read the buffer. The last chunk (its token read back) stays an ordinary call. Measured on
an H100 (twenty-seventh session, the same run): the 8 chunks took 22.9 ms replayed against 25.0
launched, the time no kernel ran 1.5 ms against 3.5.

A graph holds the device pointers of the buffers it was recorded with: the session's caches,
the engine's workspace, weights and token buffers. It belongs to one session's caches
(``Session.graphs``) and is destroyed with them. The output tensor the recording allocated is
kept alive with its graph (a replay writes it).

Through the CUDA driver API (``libcuda.so.1``, ctypes), on a stream made for the engine
(``cuStreamCreate``, blocking, so that TVM's copies on the default stream wait for it).
"""

from __future__ import annotations

import ctypes
import warnings

CAPTURE_MODE_RELAXED = 2  # CU_STREAM_CAPTURE_MODE_RELAXED
# Record a prompt's chunks before its last as graphs too (``Engine.chunk_graphs``; module doc).
PROMPT_CHUNKS = True


def bucket_end(row: int, bucket: int) -> int:
    """The keys a ``decode_padded`` step feeding row ``row`` attends over: ``row + 1`` rounded
    up to a multiple of ``bucket`` (the engine caps it at ``max_context``); also the first row
    of the next bucket."""
    return -(-(row + 1) // bucket) * bucket


class CudaGraphError(RuntimeError):
    """A CUDA driver call for recording or replaying a graph failed; the message names it."""


class Driver:
    """The CUDA driver API (``libcuda.so.1``) through ctypes: ``driver("cuName", *args)`` calls
    a function and raises ``error`` naming it where it fails. ``purpose`` says what needs the
    library (the graphs here; a low-priority queue in ``gpu_slice``)."""

    def __init__(self, error: type[Exception] = CudaGraphError, purpose: str = "CUDA graphs"):
        self.error = error
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            raise error(f"{purpose} needs the driver library libcuda.so.1 ({err})") from err

    def __call__(self, name: str, *args) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise self.error(f"{name} failed with CUDA error {code}")


def make_stream(device, driver: Driver, priority: int | None = None) -> ctypes.c_void_p:
    """A new stream (at ``priority``, if given), set as TVM's stream for ``device`` (capture
    needs one other than the legacy default stream)."""
    device.sync()  # TVM's runtime has made the device's primary context current
    stream = ctypes.c_void_p()
    if priority is None:
        driver("cuStreamCreate", ctypes.byref(stream), 0)
    else:
        driver("cuStreamCreateWithPriority", ctypes.byref(stream), 0, priority)
    device.set_raw_stream(stream.value)
    return stream


class StepGraphs:
    """One CUDA graph per key (a decode bucket, a prompt chunk) of a call that is the same at
    every step of a key."""

    def __init__(self, driver: Driver, stream: ctypes.c_void_p):
        self.driver, self.stream = driver, stream
        self.graphs: dict = {}  # key -> (exec handle, graph handle, what the recording returned)
        self.warm: set = set()  # keys run once as an ordinary call
        self.failed: str | bool = False  # why recording failed, if it did (steps run as calls)

    def run(self, key, call) -> None:
        """Run ``call()`` (the step) for ``key``: as a call, recorded, or replayed (module doc).
        If recording fails (the driver's error, or TVM's for a call that cannot be captured),
        nothing ran on the device: the step runs as a call, now and from then on, with a
        warning."""
        if key in self.graphs:
            self.driver("cuGraphLaunch", self.graphs[key][0], self.stream)
            return
        if key not in self.warm or self.failed:
            self.warm.add(key)
            call()
            return
        try:
            self._record(key, call)
        except Exception as err:  # pylint: disable=broad-except  (see the docstring)
            self.failed = str(err)
            warnings.warn(f"steps run without CUDA graphs: recording one failed ({err})",
                          RuntimeWarning, stacklevel=2)
            call()

    def _record(self, key, call) -> None:
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self.driver("cuStreamBeginCapture_v2", self.stream, CAPTURE_MODE_RELAXED)
        try:
            out = call()
        finally:  # a failed capture still ends it, or the stream stays in capture mode
            code = self.driver.lib.cuStreamEndCapture(self.stream, ctypes.byref(graph))
        if code != 0:
            raise CudaGraphError(f"cuStreamEndCapture failed with CUDA error {code}")
        self.driver("cuGraphInstantiateWithFlags", ctypes.byref(exe), graph, ctypes.c_ulonglong(0))
        self.graphs[key] = (exe, graph, out)
        self.driver("cuGraphLaunch", exe, self.stream)

    def close(self) -> None:
        """Destroy the graphs (their recorded buffers may be freed after this)."""
        for exe, graph, _ in self.graphs.values():
            self.driver.lib.cuGraphExecDestroy(exe)
            self.driver.lib.cuGraphDestroy(graph)
        self.graphs.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the driver may be gone
            pass
