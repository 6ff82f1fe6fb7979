"""tvm-lite profile ARTIFACT: where a prefill and a decode step spend their time, kernel by kernel.

    tvm-lite profile out/ --device cuda --prompt-len 512 --steps 16 [--json p.json]

For one prefill call (``prompt_len`` tokens) and for decode steps at that context it reports each
kernel's GPU time, calls and share of the step, the kernels launched per step, the step's wall
time and the *host gap* (wall time - GPU kernel time: VM instructions, shape builtins, launches,
waiting for the token). Every VM call the step makes is counted too (kernels vs. VM builtins).

* CUDA: ``torch.profiler``'s CUDA activity (CUPTI) records every kernel launched in the process,
  TVM's included; the steps run as they do in the engine (asynchronously).
* Elsewhere (CPU, OpenCL...): a VM instrument that waits for the device after every kernel and
  times it (``Device.sync()``), so kernel times are exact but the wall time of that run is not a
  real step's; the step's wall time is measured in a separate, uninstrumented run.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from . import convention as cv
from .cuda_graphs import bucket_end
from .gpu_slice import is_kernel
from .gpu_time import init_torch_cuda, torch_kernels


def _busy(gpu_ms: float, busy_ms: float | None) -> str:
    """`` (busy B ms)`` where the kernels overlapped (their union 1% or more under their sum)."""
    return "" if busy_ms is None or busy_ms >= 0.99 * gpu_ms else f" (busy {busy_ms:.3f} ms)"


@dataclass
class StepProfile:
    """One kind of step (prefill or decode), averaged over ``steps`` steps."""

    phase: str
    steps: int
    context: int  # tokens in the cache when the step starts
    wall_ms: float  # per step, uninstrumented (CUDA) or a separate run (elsewhere)
    gpu_ms: float  # sum of kernel times per step
    kernels: dict = field(default_factory=dict)  # name -> {"calls": per step, "us": per step}
    vm_calls: int = 0  # VM calls per step (PrimFuncs + builtins)
    vm_kernel_calls: int = 0  # of which PrimFunc calls (one may launch several GPU kernels)
    vm_builtins: dict = field(default_factory=dict)  # VM builtin -> calls per step
    method: str = "torch.profiler"
    # decode with steps queued on the device (Engine.run_ahead > 1): wall time per step
    run_ahead: int = 1
    wall_ms_run_ahead: float | None = None
    # decode through decode_padded replayed as CUDA graphs (Engine(cuda_graphs=True)): wall time,
    # GPU kernel time and kernels per step (its context padded to a bucket: a few more kernels)
    wall_ms_graphs: float | None = None
    gpu_ms_graphs: float | None = None
    kernels_graphs: float | None = None
    # time at least one kernel ran (the union of their intervals; torch.profiler only): less
    # than gpu_ms where kernels overlap (programmatic dependent launch)
    busy_ms: float | None = None
    busy_ms_graphs: float | None = None

    @property
    def kernels_per_step(self) -> float:
        return sum(k["calls"] for k in self.kernels.values())

    @staticmethod
    def _busy_or_sum(busy_ms: float | None, sum_ms: float) -> float:
        return sum_ms if busy_ms is None else busy_ms

    @property
    def gpu_busy_ms(self) -> float:  # busy_ms where measured, else the kernels' sum
        return self._busy_or_sum(self.busy_ms, self.gpu_ms)

    @property
    def host_gap_ms(self) -> float:  # the wall time no kernel ran
        return max(0.0, self.wall_ms - self.gpu_busy_ms)

    @property
    def host_gap_ms_run_ahead(self) -> float | None:
        return None if self.wall_ms_run_ahead is None \
            else max(0.0, self.wall_ms_run_ahead - self.gpu_busy_ms)

    @property
    def host_gap_ms_graphs(self) -> float | None:
        if self.wall_ms_graphs is None:
            return None
        return max(0.0, self.wall_ms_graphs
                   - self._busy_or_sum(self.busy_ms_graphs, self.gpu_ms_graphs))

    def table(self, top: int = 20) -> str:
        queued = "" if self.wall_ms_run_ahead is None else (
            f"; {self.run_ahead} steps queued at a time: wall {self.wall_ms_run_ahead:.3f} ms, "
            f"host gap {self.host_gap_ms_run_ahead:.3f} ms "
            f"({100 * self.host_gap_ms_run_ahead / max(self.wall_ms_run_ahead, 1e-9):.0f}%)")
        if self.wall_ms_graphs is not None:
            queued += (f"; as CUDA graphs: wall {self.wall_ms_graphs:.3f} ms, GPU kernels "
                       f"{self.gpu_ms_graphs:.3f} ms{_busy(self.gpu_ms_graphs, self.busy_ms_graphs)}"
                       f", {self.kernels_graphs:.0f} kernels/step, "
                       f"host gap {self.host_gap_ms_graphs:.3f} ms "
                       f"({100 * self.host_gap_ms_graphs / max(self.wall_ms_graphs, 1e-9):.0f}%)")
        lines = [f"{self.phase} (context {self.context}, {self.steps} step(s), {self.method}): "
                 f"wall {self.wall_ms:.3f} ms, GPU kernels {self.gpu_ms:.3f} ms"
                 f"{_busy(self.gpu_ms, self.busy_ms)}, "
                 f"{self.kernels_per_step:.0f} kernels/step, host gap {self.host_gap_ms:.3f} ms "
                 f"({100 * self.host_gap_ms / max(self.wall_ms, 1e-9):.0f}%), "
                 f"VM calls/step {self.vm_calls} ({self.vm_kernel_calls} PrimFuncs; builtins: "
                 f"{', '.join(f'{n} {c}' for n, c in list(self.vm_builtins.items())[:4])})"
                 + queued,
                 f"{'us/step':>10} {'calls':>6} {'us/call':>8} {'share':>6}  kernel"]
        rows = sorted(self.kernels.items(), key=lambda kv: -kv[1]["us"])
        for name, k in rows[:top]:
            lines.append(f"{k['us']:10.1f} {k['calls']:6.1f} {k['us'] / max(k['calls'], 1e-9):8.2f} "
                         f"{100 * k['us'] / max(self.gpu_ms * 1e3, 1e-9):5.1f}%  {name[:100]}")
        if len(rows) > top:
            rest = sum(k["us"] for _, k in rows[top:])
            lines.append(f"{rest:10.1f} {'':>6} {'':>8} {100 * rest / max(self.gpu_ms * 1e3, 1e-9):5.1f}%"
                         f"  ({len(rows) - top} more kernels)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(kernels_per_step=self.kernels_per_step, host_gap_ms=self.host_gap_ms,
                 host_gap_ms_run_ahead=self.host_gap_ms_run_ahead,
                 host_gap_ms_graphs=self.host_gap_ms_graphs)
        return d


class _CallCounter:
    """VM instrument: counts the calls of a VM function by name (PrimFuncs, VM builtins; nested
    Relax functions -- closures -- are not counted); with ``sync`` also times each PrimFunc call,
    waiting for the device before and after it."""

    def __init__(self, sync=None):
        self.sync = sync
        self.counts = defaultdict(int)  # name -> calls (PrimFuncs and builtins)
        self.times = defaultdict(lambda: [0, 0.0])  # PrimFunc name -> [calls, seconds]
        self._t0 = 0.0

    @staticmethod
    def _is_primfunc(func, name) -> bool:
        return is_kernel(name) and type(func).__name__ != "Closure"

    def __call__(self, func, name, before_run, _ret, *_args):
        if type(func).__name__ == "Closure":
            return 0
        kernel = self._is_primfunc(func, name)
        if before_run:
            if kernel and self.sync is not None:
                self.sync()
                self._t0 = time.perf_counter()
            return 0
        self.counts[name] += 1
        if kernel and self.sync is not None:
            self.sync()
            entry = self.times[name]
            entry[0] += 1
            entry[1] += time.perf_counter() - self._t0
        return 0

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    @property
    def kernel_calls(self) -> int:
        return sum(c for n, c in self.counts.items() if is_kernel(n))

    @property
    def builtins(self) -> dict:
        return {n: c for n, c in sorted(self.counts.items(), key=lambda kv: -kv[1])
                if not is_kernel(n)}


def whole_batches(steps: int, run_ahead: int) -> int:
    """``steps`` rounded up to whole batches of ``run_ahead``: the queued decode loops run whole
    batches (3 steps taken from a batch of 4 would run 4 and count 3)."""
    batch = max(run_ahead, 1)
    return -(-steps // batch) * batch


def kernel_launches(executable, function: str = "decode", kind: str | None = None) -> dict:
    """Device kernels one call of ``function`` launches, counted in the build (no device needed):
    the PrimFunc calls in the function's VM code (``as_text()``; the decode function has no
    loops, so each is executed once), each expanded to the kernels of its device code
    (``<prim>_kernel``, ``<prim>_kernel_1``...: a split-K GEMV or attention is two).
    Returns {PrimFunc name: device kernels launched per call of ``function``}."""
    from .compiler import device_source

    text = executable.as_text()
    body = re.search(rf"^@{re.escape(function)}:\n(.*?)(?:^@|\Z)", text, re.S | re.M)
    if body is None:
        raise ValueError(f"no VM function {function!r} in this executable")
    calls = re.findall(r"^\s*call\s+(\S+)\s", body.group(1), re.M)
    relax_functions = set(re.findall(r"^@([\w.]+):$", text, re.M))
    kind = kind or next((k for k in ("opencl", "cuda", "vulkan", "metal")
                         if _has_source(executable, k)), None)
    if kind is None:
        raise ValueError("kernel_launches counts GPU kernels: this executable has no device "
                         "module (a CPU build?)")
    source = device_source(executable, kind)
    kernels = re.findall(r"(?:__kernel void|__global__ void(?: __cluster_dims__\([\d, ]+\))?"
                         r"(?: __launch_bounds__\(\d+\))?) (\w+)\(", source)
    per_prim = defaultdict(set)
    for k in kernels:
        per_prim[re.sub(r"_kernel(_\d+)?$", "", k)].add(k)
    out = defaultdict(int)
    for name in calls:
        if is_kernel(name) and name not in relax_functions and per_prim.get(name):
            out[name] += len(per_prim[name])  # a PrimFunc with no device code launches nothing
    return dict(out)


def _has_source(executable, kind: str) -> bool:
    from .compiler import device_source

    try:
        return bool(device_source(executable, kind))
    except Exception:  # pylint: disable=broad-except
        return False


def _with_instrument(vm, instrument, call):
    vm.set_instrument(instrument)
    try:
        return call()
    finally:
        # None removes the instrument; a no-op Python function would still be called around every
        # VM instruction and make each later step several times slower (measured: 7x on the CPU)
        vm.set_instrument(None)


class Profiler:
    """Profiles an :class:`~tvm_lite.engine.Engine`'s greedy steps (in-place artifacts)."""

    def __init__(self, engine, use_torch: bool | None = None):
        self.engine = engine
        if use_torch is None:
            use_torch = int(engine.dev.dlpack_device_type()) == 2  # kDLCUDA
        self.use_torch = use_torch
        if use_torch:
            init_torch_cuda()  # CUDA (and CUPTI) initialised by torch in this process first

    def _sync(self):
        self.engine.sync()  # (the engine's stream: its own with cuda_graphs)

    def _measure(self, phase: str, context: int, steps: int, run) -> StepProfile:
        vm = self.engine.vm
        counter = _CallCounter()
        _with_instrument(vm, counter, lambda: run(1))
        self._sync()
        t0 = time.perf_counter()
        run(steps)
        self._sync()
        wall = (time.perf_counter() - t0) / steps
        if self.use_torch:
            kernels, _, busy_us = torch_kernels(lambda: run(steps), steps)
            method = "torch.profiler (CUDA activity)"
        else:
            timer = _CallCounter(sync=self._sync)
            _with_instrument(vm, timer, lambda: run(steps))
            kernels = {n: {"calls": c / steps, "us": s * 1e6 / steps}
                       for n, (c, s) in timer.times.items()}
            method = "VM instrument, device sync per kernel"
        gpu_ms = sum(k["us"] for k in kernels.values()) / 1e3
        prof = StepProfile(phase, steps, context, wall * 1e3, gpu_ms, kernels, counter.calls,
                           counter.kernel_calls, counter.builtins, method)
        if self.use_torch:
            prof.busy_ms = busy_us / 1e3
        return prof

    def prefill(self, prompt_len: int, repeats: int = 3, chunk: int | None = None,
                read_each_chunk: bool = False) -> StepProfile:
        """One prompt of ``prompt_len`` tokens from an empty cache: one call, or calls of
        ``chunk`` tokens (then a "step" is the whole prompt, all its chunks).
        ``read_each_chunk``: every chunk through ``prefill_step`` (its token read back, so the
        host waits for the device between chunks), as before ``prefill_chain``."""
        eng = self.engine
        if read_each_chunk:
            chain = eng.runner.prefill_chain
            eng.runner.prefill_chain = False
            try:
                prof = self.prefill(prompt_len, repeats, chunk)
            finally:
                eng.runner.prefill_chain = chain
            prof.phase += ", each chunk's token read back"
            return prof
        ids = [(7 * i + 3) % 200 + 10 for i in range(prompt_len)]  # any in-vocabulary ids

        def run(n):
            for _ in range(n):
                eng.prefill_greedy(eng.new_session(), ids, chunk_size=chunk or prompt_len)

        run(1)  # warm-up (with chunk graphs: each chunk's call; the counting run records them)
        phase = "prefill" if not chunk or chunk >= prompt_len else f"prefill in chunks of {chunk}"
        if phase != "prefill" and eng.chunk_graphs and eng.runner.prefill_chain:
            phase += " (all but the last as CUDA graphs)"
        return self._measure(phase, 0, repeats, run)

    def decode(self, prompt_len: int, steps: int = 16, warmup: int = 4) -> StepProfile:
        eng = self.engine
        session = eng.new_session()
        ids = [(7 * i + 3) % 200 + 10 for i in range(prompt_len)]
        token = [eng.prefill_greedy(session, ids, chunk_size=prompt_len)]

        def run(n):
            for _ in range(n):
                token[0] = eng.decode_greedy(session, token[0])

        run(warmup)
        context = session.length
        prof = self._measure("decode", context, steps, run)
        batched = whole_batches(steps, eng.run_ahead)  # what the queued loops run
        if eng.run_ahead > 1:  # the same steps as the engine's generation loop queues them
            def ahead(n):
                loop = eng.decode_run_ahead(session, token[0])
                for _ in range(n):
                    token[0] = next(loop).token
                loop.close()

            ahead(eng.run_ahead)
            self._sync()
            t0 = time.perf_counter()
            ahead(batched)
            self._sync()
            prof.run_ahead = eng.run_ahead
            prof.wall_ms_run_ahead = (time.perf_counter() - t0) / batched * 1e3
        if eng.cuda_graphs:  # the engine's generation loop on a GPU: decode_padded as graphs
            def graphs(n):
                loop = eng.decode_padded_steps(session, token[0])
                for _ in range(n):
                    token[0] = next(loop).token
                loop.close()

            # to the first row of the next bucket, then its first two steps (the call, then the
            # recording): the measured steps replay one graph, as a generation does for up to
            # PADDED_BUCKET - 2 steps at a time
            graphs(bucket_end(session.length, cv.PADDED_BUCKET) - session.length + 2)
            self._sync()
            t0 = time.perf_counter()
            graphs(batched)
            self._sync()
            prof.wall_ms_graphs = (time.perf_counter() - t0) / batched * 1e3
            if self.use_torch:
                kernels, _, busy_us = torch_kernels(lambda: graphs(batched), batched)
                prof.gpu_ms_graphs = sum(k["us"] for k in kernels.values()) / 1e3
                prof.busy_ms_graphs = busy_us / 1e3
                prof.kernels_graphs = sum(k["calls"] for k in kernels.values())
        return prof


def profile_artifact(artifact, device: str = "cuda", prompt_len: int = 512, steps: int = 16,
                     max_context: int | None = None, chunk: int | None = None) -> dict:
    """Prefill and decode profiles of an in-place artifact on ``device``; with ``chunk``, also
    the same prompt prefilled in calls of ``chunk`` tokens (key ``"prefill_chunked"``; with
    ``Engine.chunk_graphs``, its chunks before the last replayed as CUDA graphs, and again
    launched kernel by kernel: ``"prefill_chunked_launched"``) and, where the artifact has
    ``prefill_chain``, again with every chunk's token read back (``"prefill_chunked_read"``)."""
    from .engine import DEFAULT_RUN_AHEAD, Engine
    from .errors import UserError

    if chunk is not None and chunk < 1:
        raise UserError(f"--chunk {chunk}: a chunk needs at least one token")
    # prefill, warm-ups, the counting and measured runs, then the queued ones (a warm-up batch,
    # the measured steps, and each of the two loops' last batch run past what it takes)
    batched = whole_batches(steps, DEFAULT_RUN_AHEAD)  # (what Profiler.decode runs)
    queued = batched + 3 * DEFAULT_RUN_AHEAD
    total = prompt_len + 4 + steps * 4 + 8 + queued + cv.PADDED_BUCKET + 2 * batched + 2
    eng = Engine(artifact, device=device, max_context=max_context or total, buckets=None,
                 prefill_chunk=prompt_len)
    if not eng.runner.greedy_steps:
        raise ValueError(f"{artifact}: profiling needs an in-place artifact with the greedy step "
                         "entries (compile it with --kv-cache inplace)")
    prof = Profiler(eng)
    out = {"prefill": prof.prefill(prompt_len)}
    if chunk and chunk < prompt_len:
        out["prefill_chunked"] = prof.prefill(prompt_len, chunk=chunk)
        if eng.chunk_graphs:  # the same chunks launched kernel by kernel: what the graphs save
            eng.chunk_graphs = False
            try:
                out["prefill_chunked_launched"] = prof.prefill(prompt_len, chunk=chunk)
            finally:
                eng.chunk_graphs = True
        if eng.runner.prefill_chain:  # the same without prefill_chain: what it saves
            out["prefill_chunked_read"] = prof.prefill(prompt_len, chunk=chunk,
                                                       read_each_chunk=True)
    out["decode"] = prof.decode(prompt_len, steps)
    return out


def profile_shapes(shapes, variant: str = "tvm_lite-e0m4", target: str | None = None,
                   device: str = "cuda", prompt_len: int = 512, steps: int = 16,
                   work_dir="bench_models", progress=print, chunk: int | None = None,
                   switch: str | None = None) -> dict:
    """Random-weight models of ``shapes`` (``tvm_lite.bench.models.SHAPES``), exported and
    compiled as ``bench.models`` does, each profiled: shape -> {"prefill", "decode"}.
    ``target``: default this GPU's (:func:`tvm_lite.target.local_cuda_target`). ``switch``: a
    ``--switch`` (:func:`model_switch`) in force while the model is built and profiled; its build
    goes to ``work_dir/<shape>/switch-<NAME>``, rebuilt every time (not the compile cache,
    whose keys do not know the switch)."""
    from .target import local_cuda_target

    target = target or local_cuda_target()
    out = {}
    for shape in shapes:
        onnx_dir = export_shape(shape, work_dir, progress)
        (artifact,) = build_runs(onnx_dir, [(variant, switch)], target, work_dir, shape,
                                 progress=progress)
        with in_force(switch):
            out[shape] = profile_artifact(artifact, device, prompt_len, steps, chunk=chunk)
    return out


def export_shape(shape: str, work_dir, progress=print):
    """The fp16 ONNX export of a random-weight model of ``shape`` under ``work_dir/<shape>``."""
    from pathlib import Path

    from .bench.models import random_model
    from .export import export_onnx

    work = Path(work_dir) / shape
    return export_onnx(random_model(shape, work / "hf"), work / "onnx", dtype="float16",
                       progress=progress)


def _build_run(onnx_dir: str, variant: str, target: str, out_dir: str | None,
               spec: str | None, progress=None) -> str:
    """One build of :func:`build_runs` (in this process or a worker's): ``variant`` with the
    constants of ``spec`` (a ``--switch``) set while it compiles."""
    from .bench.models import compile_variant

    if progress is None:  # a worker: its lines named after its build
        tag = f"[{spec.partition(':')[0] if spec else variant}]"

        def progress(*a, **k):
            print(tag, *a, **k, flush=True)
    with in_force(spec):
        return str(compile_variant(onnx_dir, variant, target, progress, out_dir=out_dir))


def build_runs(onnx_dir, runs, target: str, work_dir, shape: str, jobs: int = 1,
               progress=print) -> list:
    """The artifact of each ``(variant, switch spec or None)`` in ``runs``, compiled from
    ``onnx_dir``: an unswitched run from the compile cache, a switched one rebuilt in
    ``work_dir/<shape>/switch-<NAME>``. With ``jobs > 1`` up to that many builds run at once,
    each in its own process (a build is mostly one CPU core's Python and codegen, so the GPU
    machine's 16 cores can build a tree and its switches side by side; not yet timed there)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from pathlib import Path

    calls = [(str(onnx_dir), variant, target,
              str(Path(work_dir) / shape / f"switch-{model_switch(spec)[0]}") if spec else None,
              spec) for variant, spec in runs]
    if jobs <= 1 or len(calls) == 1:
        return [Path(_build_run(*c, progress=progress)) for c in calls]
    with ProcessPoolExecutor(max_workers=min(jobs, len(calls)),
                             mp_context=get_context("spawn")) as pool:
        return [Path(f.result()) for f in [pool.submit(_build_run, *c) for c in calls]]


def model_switch(spec: str) -> tuple[str, list[tuple[object, str, object]]]:
    """A whole-model ``--switch NAME:MODULE.CONSTANT=VALUE[,...]`` (``MODULE`` under
    ``tvm_lite``, e.g. ``staged:schedules.gpu_attention_prefill.TC_STAGED_STORES=True``; ``VALUE``
    a Python literal) as ``(NAME, [(module, constant, value)])``. Raises ValueError naming a
    malformed item, a module that does not import, a constant it does not have, or a value that
    is not a literal. The constant must be read where it is defined, when a model is built or
    run (one copied into another module at import keeps its value)."""
    import ast
    import importlib

    from .bench.kernels import switch_items

    name, items = switch_items(spec)
    assignments = []
    for key, text in items:
        path, dot, const = key.rpartition(".")
        if not dot or not path:
            raise ValueError(f"--switch {spec!r}: {key!r} is not MODULE.CONSTANT")
        try:
            module = importlib.import_module(f"tvm_lite.{path}")
        except ImportError as err:
            raise ValueError(f"--switch {spec!r}: no module tvm_lite.{path} ({err})") from None
        if not hasattr(module, const):
            raise ValueError(f"--switch {spec!r}: tvm_lite.{path} has no {const}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--switch {spec!r}: {text!r} is not a Python literal") from None
        assignments.append((module, const, value))
    return name, assignments


class switched:
    """Context manager: the constants of :func:`model_switch`'s ``assignments`` set, and put
    back as they were on exit."""

    def __init__(self, assignments):
        self.assignments, self.saved = assignments, []

    def __enter__(self):
        for module, const, value in self.assignments:
            self.saved.append((module, const, getattr(module, const)))
            setattr(module, const, value)
        return self

    def __exit__(self, *exc):
        for module, const, value in reversed(self.saved):
            setattr(module, const, value)
        self.saved = []
        return False


def in_force(spec: str | None) -> switched:
    """The constants of the ``--switch`` ``spec`` set while in the ``with`` (None: nothing)."""
    return switched(model_switch(spec)[1] if spec else [])

def check_switches(ap, specs) -> None:
    """``ap.error`` (usage, exit 2) for the first malformed or unknown ``--switch`` in
    ``specs``: before any build."""
    for spec in specs:
        try:
            model_switch(spec)
        except ValueError as err:
            ap.error(str(err))


def chunk_summary(result: dict) -> str | None:
    """One line setting the prompt in chunks against the one call (wall, GPU kernel time,
    kernels, host gap), where ``result`` (:func:`profile_artifact`'s) has both; else None."""
    one, chunked = result.get("prefill"), result.get("prefill_chunked")
    if one is None or chunked is None:
        return None
    line = (f"{chunked.phase} / one call: wall {chunked.wall_ms / one.wall_ms:.2f}x "
            f"({chunked.wall_ms:.3f} / {one.wall_ms:.3f} ms), GPU kernels "
            f"{chunked.gpu_ms / one.gpu_ms:.2f}x, kernels {chunked.kernels_per_step:.0f} / "
            f"{one.kernels_per_step:.0f}, host gap {chunked.host_gap_ms:.3f} / "
            f"{one.host_gap_ms:.3f} ms")
    launched = result.get("prefill_chunked_launched")
    if launched is not None:
        line += (f"; launched kernel by kernel, not as graphs: wall "
                 f"{launched.wall_ms / one.wall_ms:.2f}x ({launched.wall_ms:.3f} ms), host gap "
                 f"{launched.host_gap_ms:.3f} ms")
    read = result.get("prefill_chunked_read")
    if read is not None:
        line += f"; each chunk's token read back: wall {read.wall_ms / one.wall_ms:.2f}x"
    return line


_LAUNCH_SUFFIX = re.compile(r"_kernel(?:_\d+)?$")


def primfunc_of(kernel: str) -> str:
    """The PrimFunc a GPU kernel's name comes from: TVM names a PrimFunc's kernels
    ``NAME_kernel``, ``NAME_kernel_1``, ... (a GEMM's plan branches and its split-K sum kernel
    among them); other names (``Memcpy ...``) are kept."""
    return _LAUNCH_SUFFIX.sub("", kernel)


def chunk_kernels_table(one: dict, chunked: dict, top: int = 12) -> str:
    """Markdown: where prefilling in chunks costs GPU time the one call does not, a row a
    PrimFunc (its kernels' times summed), the largest extra first. ``one``, ``chunked``: the two
    phases' ``kernels`` (name -> {"calls", "us"} a step, :class:`StepProfile`'s)."""
    def by_func(kernels):
        out = defaultdict(lambda: [0.0, 0.0])
        for name, k in kernels.items():
            entry = out[primfunc_of(name)]
            entry[0] += k["us"]
            entry[1] += k["calls"]
        return out

    a, b = by_func(one), by_func(chunked)
    extra_total = sum(v[0] for v in b.values()) - sum(v[0] for v in a.values())
    rows = sorted(set(a) | set(b), key=lambda f: -(b.get(f, [0])[0] - a.get(f, [0])[0]))
    lines = ["| PrimFunc | one call us (kernels) | chunks us (kernels) | chunks / one call "
             "| extra us | share of the extra |", "|---|---|---|---|---|---|"]
    for f in rows[:top]:
        (ua, ca), (ub, cb) = a.get(f, (0.0, 0.0)), b.get(f, (0.0, 0.0))
        ratio = f"{ub / ua:.2f}x" if ua > 0 else "-"
        share = f"{100 * (ub - ua) / extra_total:.0f}%" if extra_total > 0 else "-"
        lines.append(f"| {f[:70]} | {ua:.1f} ({ca:.0f}) | {ub:.1f} ({cb:.0f}) | {ratio} | "
                     f"{ub - ua:.1f} | {share} |")
    if len(rows) > top:
        rest = sum(b.get(f, [0])[0] - a.get(f, [0])[0] for f in rows[top:])
        lines.append(f"| ({len(rows) - top} more) | | | | {rest:.1f} | |")
    return "\n".join(lines)


def comparison_table(runs: dict) -> str:
    """Markdown: one row a profiled run (``runs``: name -> {phase: ``StepProfile.as_dict()``},
    what ``main`` writes to ``--json``), its prefill wall and GPU ms, the chunks' wall and their
    ratio to the one call, and a decode step's wall (as CUDA graphs where timed so); a phase
    not profiled is a dash."""
    def ms(d, key="wall_ms"):
        return "-" if d is None or d.get(key) is None else f"{d[key]:.3f}"

    rows = ["| run | prefill wall ms | prefill GPU ms | chunks wall ms | chunks / one call "
            "| decode wall ms | decode as graphs ms |", "|---|---|---|---|---|---|---|"]
    for name, phases in runs.items():
        one, chunked, dec = (phases.get(k) for k in ("prefill", "prefill_chunked", "decode"))
        ratio = (f"{chunked['wall_ms'] / one['wall_ms']:.2f}x"
                 if one is not None and chunked is not None else "-")
        rows.append(f"| {name} | {ms(one)} | {ms(one, 'busy_ms')} | {ms(chunked)} | {ratio} | "
                    f"{ms(dec)} | {ms(dec, 'wall_ms_graphs')} |")
    return "\n".join(rows)


CHUNK_HELP = ("also profile the prompt prefilled in calls of this many tokens (one 'step' = "
              "the whole prompt), next to the one call")


def add_arguments(p) -> None:
    p.add_argument("artifact", help="a compiled artifact directory (in-place KV cache)")
    p.add_argument("--device", default="cuda", help="cuda, cpu, opencl... (default: cuda)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=16, help="decode steps measured")
    p.add_argument("--chunk", type=int, default=None, help=CHUNK_HELP)
    p.add_argument("--top", type=int, default=20, help="kernels listed per table")
    p.add_argument("--json", default=None, help="also write the profiles to this file")


def run(args) -> None:
    result = profile_artifact(args.artifact, args.device, args.prompt_len, args.steps,
                              chunk=args.chunk)
    for prof in result.values():
        print(prof.table(args.top))
        print()
    summary = chunk_summary(result)
    if summary:
        print(summary)
        print(chunk_kernels_table(result["prefill"].kernels,
                                  result["prefill_chunked"].kernels, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v.as_dict() for k, v in result.items()}, f, indent=1)


def main(argv=None) -> None:
    """python -m tvm_lite.profile --shapes smollm2-135m,gemma-2b [--json p.json]: random-weight
    models of those shapes, built and profiled on the GPU machine."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tvm_lite.profile", description=main.__doc__)
    ap.add_argument("--shapes", default="smollm2-135m")
    ap.add_argument("--variant", default="tvm_lite-e0m4",
                    help="a bench.models variant, or several separated by commas, each profiled "
                         "(e.g. tvm_lite-e0m4,tvm_lite-e0m4+pdl,tvm_lite-e0m4+pdlg: without "
                         "programmatic dependent launch, with it, with it in CUDA graphs only)")
    ap.add_argument("--target", default=None,
                    help="default: this GPU's, sm_90a on Hopper (tvm_lite.target.local_cuda_target)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help=CHUNK_HELP)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--work-dir", default="bench_models", help="random models and their builds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--switch", action="append", default=[],
                    metavar="NAME:MODULE.CONSTANT=VALUE[,...]",
                    help="also profile the first variant built and run with these constants "
                         "(modules under tvm_lite) set, as NAME (repeatable), e.g. "
                         "staged:schedules.gpu_attention_prefill.TC_STAGED_STORES=True")
    ap.add_argument("--jobs", type=int, default=None,
                    help="builds (the variants and switches of a shape) compiled at once, each "
                         "in its own process (default: up to 4 on a machine of 8 or more cores, "
                         "else 1)")
    args = ap.parse_args(argv)
    if args.jobs is None:
        args.jobs = 4 if (os.cpu_count() or 1) >= 8 else 1
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: at least one build at a time")
    if args.chunk is not None and args.chunk < 1:  # before any build
        ap.error(f"--chunk {args.chunk}: a chunk needs at least one token")
    check_switches(ap, args.switch)
    if args.device.startswith("cuda"):  # before the exports and builds (minutes)
        from .bench.kernels import require_cuda_gpu

        require_cuda_gpu("tvm_lite.profile")
    from .target import local_cuda_target

    target = args.target or local_cuda_target()
    out = {}
    variants = args.variant.split(",")
    runs = [(v, None) for v in variants] + [(variants[0], spec) for spec in args.switch]
    for shape in args.shapes.split(","):
        onnx_dir = export_shape(shape, args.work_dir)
        if args.jobs > 1 and len(runs) > 1:  # every build first, side by side; then the runs
            started = time.perf_counter()
            built = build_runs(onnx_dir, runs, target, args.work_dir, shape, args.jobs)
            print(f"== {shape}: {len(runs)} builds, {min(args.jobs, len(runs))} at a time: "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            artifacts = iter(built)
        else:  # each build just before its run (a call cut short keeps what it measured)
            artifacts = (build_runs(onnx_dir, [run], target, args.work_dir, shape)[0]
                         for run in runs)
        for (variant, spec), artifact in zip(runs, artifacts):
            with in_force(spec):
                res = profile_artifact(artifact, args.device, args.prompt_len, args.steps,
                                       chunk=args.chunk)
            name = shape if len(runs) == 1 else f"{shape} {variant}"
            if spec is not None:
                name += " " + spec.partition(":")[0]
            out[name] = {k: v.as_dict() for k, v in res.items()}
            for prof in res.values():
                print(f"== {name}\n{prof.table(args.top)}\n", flush=True)
            summary = chunk_summary(res)
            if summary:
                print(f"== {name}: {summary}\n", flush=True)
                print(chunk_kernels_table(res["prefill"].kernels,
                                          res["prefill_chunked"].kernels, args.top) + "\n",
                      flush=True)
            if args.json:  # rewritten after every build: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    if len(out) > 1:  # variants, switches or shapes side by side
        print(comparison_table(out), flush=True)


__all__ = ["StepProfile", "Profiler", "profile_artifact", "profile_shapes", "chunk_summary",
           "check_switches", "chunk_kernels_table", "primfunc_of", "model_switch", "switched",
           "build_runs", "export_shape",
           "comparison_table"]


if __name__ == "__main__":
    main()
