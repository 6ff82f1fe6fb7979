"""Tune a model's kernels with MetaSchedule, measuring on devices behind TVM's RPC tracker.

(The database as a build reads it is ``tvm_lite/tuning_db.py``; the tracker and server processes
are ``tvm_lite.rpc``.)

    db = tune_model("model.onnx", "opencl -device=adreno", "tuned/", tracker="127.0.0.1:9190",
                    key="android", trials=64, top=4)
    tvm_lite.compile_model("model.onnx", "opencl -device=adreno", tuning_db="tuned/")

What is tuned: the kernels of ``decode`` (one new token: the in-place build's own ``decode``, or for a
past/present build ``main`` with one new token, see ``relax_passes.AddDecodeFunction``) and of
``prefill``/``main`` after tvm_lite's phases 1-2 with the build's options (``kv_cache``, ``quant``):
the same module ``build(..., tuning_db=...)`` schedules, so the database's workloads are the build's
kernels. Only
static-shape kernels can be measured (the decode GEMVs, norms...); the attention kernels, dynamic in
the context length, keep tvm_lite's rules.

How: MetaSchedule's evolutionary search with the XGBoost cost model; candidates are built here
(``LocalBuilder``, exported with the NDK compiler for Android hosts) and measured by an
``RPCRunner`` through the tracker, one worker per server under the key, so a farm of phones measures
in parallel. Records go to a ``JSONDatabase`` in a directory, committed as they are measured:
a session that stops (a server lost, Ctrl-C) keeps them, and a rerun resumes, counting them against
each kernel's budget. A measurement lost with its device is not recorded (it is not the schedule's
fault); if no server is left under the key for ``server_wait`` seconds, tuning stops with a clear
error.

A tuned kernel is used only where it beats tvm_lite's rules: each kernel's hand-scheduled time,
measured the same way ("rules us"), is kept next to the records (``tvm_lite_rules.json``), and a
build applies a record only if it is faster (``records_faster_than_rules``). On the H200 the rules'
packed E0M4 GEMV beat MetaSchedule's best by 1.2-1.8x, and such a database must not slow the build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .options import BuildOptions
from .rpc.processes import RPCError, parse_address, tracker_status
from .tuning_db import (_FAILED, RULES, TuningError, check_database, measured, open_database,
                        record_rules_time)

DEVICE_LOST = "[tvm_lite.rpc: device lost]"


class TuningStopped(RuntimeError):
    """Tuning stopped early (no device left); the records measured so far are in the database."""


# -- the kernels ----------------------------------------------------------------------------------
@dataclass
class KernelTask:
    name: str
    mod: object  # IRModule {"main": PrimFunc}, the workload
    weight: int  # how many times the model calls it
    flops: float  # per call
    static: bool  # MetaSchedule measures static shapes only
    ctx: object = field(default=None, repr=False)  # the ExtractedTask

    @property
    def total_flops(self) -> float:
        return self.flops * self.weight


# GPU limits MetaSchedule's rules need, where the target does not say: CUDA's static shared
# memory; OpenCL's 32 KB local memory (Adreno 6xx/7xx, Mali)
_SHARED_MEMORY = {"cuda": 48 * 1024, "opencl": 32 * 1024, "vulkan": 32 * 1024}


def tuning_target(target, num_cores: int | None = None):
    """The target for MetaSchedule: tvm_lite's parsed target, plus what MetaSchedule requires
    and TVM's defaults leave out: ``num-cores`` on CPUs (default: this machine's cores), and
    ``max_threads_per_block`` / ``max_shared_memory_per_block`` on GPUs (from the target's
    ``max_num_threads``; name them in a dict target to override)."""
    import tvm

    from tvm_lite.target import parse_target

    tgt = parse_target(target)
    cfg = dict(tgt.export())
    kind = tgt.kind.name
    if kind == "llvm" and "num-cores" not in cfg:
        cfg["num-cores"] = int(num_cores or os.cpu_count() or 1)
    elif kind in _SHARED_MEMORY:
        cfg.setdefault("max_threads_per_block", int(cfg.get("max_num_threads", 256)))
        cfg.setdefault("max_shared_memory_per_block", _SHARED_MEMORY[kind])
        cfg.setdefault("thread_warp_size", 32 if kind == "cuda" else 1)
    else:
        return tgt
    return tvm.target.Target(cfg)


def import_model(model, quant=None, log=print):
    """An ONNX file / export folder imported (and 4-bit quantized with ``quant``, a
    ``tvm_lite.quant.QuantConfig``) as the build would import it."""
    from tvm_lite.artifact import onnx_input
    from tvm_lite.frontend import from_onnx

    log(f"importing {model}")
    onnx_path = onnx_input(model, progress=log)
    mod = from_onnx(onnx_path)
    if quant is not None:
        from tvm_lite.quant.quantize import quantize_module, tokenizer_of

        mod, _ = quantize_module(mod, quant, tokenizer_of(onnx_path.parent), log)
    return mod


def weights_as_built(mod, target, log=print):
    """``mod`` (imported, weights attached) with its weights as a default build for ``target``
    stores them (``artifact.weights_as_built``: projections merged, gate and up interleaved where
    the target's GEMM stores the activation, panel-major on a CPU), so that the kernels tuned are
    the build's."""
    from tvm_lite import artifact
    from tvm_lite.pipeline import interleaves_gate_up
    from tvm_lite.schedules.cpu_target import weight_panel

    return artifact.weights_as_built(mod, panel=weight_panel(target), progress=log,
                                     interleave_gate_up=interleaves_gate_up(target))


def lower_for_tuning(mod, target, kv_cache: str = BuildOptions.kv_cache):
    """tvm_lite's phases 1-2 (with a ``decode`` function): the module whose kernels a tuned
    build with the same ``kv_cache`` option looks up in the database."""
    import tvm

    from tvm_lite import pipeline
    from tvm_lite.compiler import detach_params

    mod, _ = detach_params(mod)
    with target:
        for _name, passes in pipeline.phases(target, kv_cache, decode_function=True)[:2]:
            mod = tvm.transform.Sequential(passes)(mod)
    return mod


def extract_kernels(mod, target) -> list[KernelTask]:
    """Every kernel of the lowered module, as MetaSchedule sees it, most FLOPs first."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks = []
    for t in ms.relax_integration.extract_tasks(mod, target):
        kernel = t.dispatched[0]
        try:
            ms.arg_info.ArgInfo.from_prim_func(kernel["main"])
            static = True
        except Exception:  # a symbolic buffer shape: MetaSchedule cannot allocate its inputs
            static = False
        try:
            flops = float(estimate_tir_flops(kernel))
        except Exception:
            flops = 0.0
        tasks.append(KernelTask(t.task_name, kernel, int(t.weight), flops, static, t))
    tasks.sort(key=lambda k: (-k.total_flops, k.name))
    return tasks


def select_kernels(tasks: list[KernelTask], names=None, top: int | None = None) -> list[KernelTask]:
    """The kernels named in ``names``, or the ``top`` static ones with the most FLOPs (x calls)."""
    static = [t for t in tasks if t.static]
    if names:
        by_name = {t.name: t for t in tasks}
        chosen = []
        for name in names:
            if name not in by_name:
                raise TuningError(f"no kernel named {name!r}; tunable kernels: "
                                  + ", ".join(t.name for t in static))
            if not by_name[name].static:
                raise TuningError(f"kernel {name!r} has a dynamic shape (context length); "
                                  "MetaSchedule measures static shapes only. Tunable kernels: "
                                  + ", ".join(t.name for t in static))
            chosen.append(by_name[name])
        return chosen
    if not static:
        raise TuningError("the model has no static-shape kernel to tune")
    return static[:top] if top else static


# -- measuring ------------------------------------------------------------------------------------
_NO_SERVER: set = set()  # (tracker, key) found without servers for server_wait s


def request_session(tracker: str, key: str, priority: int = 1, session_timeout: float = 0,
                    server_wait: float = 60.0, poll: float = 5.0):
    """An RPC session on a server under ``key``, through the tracker (queued while all are
    busy). Raises ``RPCError`` when the tracker has had no server under ``key`` for
    ``server_wait`` seconds (TVM's own request would wait for ever)."""
    from tvm import rpc

    host, port = parse_address(tracker)
    # once this process has waited in vain, the next requests do not wait again
    deadline = time.monotonic() + (0 if (tracker, key) in _NO_SERVER else server_wait)
    last = None
    parent = os.getppid()
    while True:
        if os.getppid() != parent:  # the tuning process is gone: do not wait for ever
            raise RPCError("the process that asked for an RPC session has exited")
        keys = tracker_status(tracker)["keys"]
        if keys.get(key, {}).get("total", 0) == 0:
            if time.monotonic() > deadline:
                _NO_SERVER.add((tracker, key))
                raise RPCError(
                    f"{DEVICE_LOST} no RPC server left under key {key!r} at the tracker "
                    f"{host}:{port} (waited {server_wait:.0f} s; keys there: "
                    f"{sorted(k for k, v in keys.items() if v['total'])}). Start one with "
                    f"`tvm-lite rpc server --tracker {host}:{port} --key {key}`"
                    + (f"; last error: {last}" if last else ""))
            time.sleep(0.5)
            continue
        _NO_SERVER.discard((tracker, key))
        deadline = time.monotonic() + server_wait
        session = rpc.connect_tracker(host, port)
        session._sock.settimeout(poll)  # re-check the servers every `poll` s while queued
        try:
            return session.request(key, priority=priority, session_timeout=session_timeout,
                                   max_retry=1)
        except Exception as err:  # queued past `poll`, or the server went away meanwhile
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        finally:
            session.close()


def _create_session(rpc_config, server_wait: float):
    # RPCRunner's f_create_session, in its worker processes. A session whose run failed can
    # stay referenced from a cycle through the exception's traceback; until the collector frees
    # it, its server stays busy waiting for us (for session_timeout), and the tracker queues us.
    import gc

    gc.collect()
    return request_session(f"{rpc_config.tracker_host}:{rpc_config.tracker_port}",
                           rpc_config.tracker_key, rpc_config.session_priority,
                           rpc_config.session_timeout_sec, server_wait)


def _guarded(stage, default):
    """Wrap an RPCRunner stage: an error that comes from the RPC link is tagged DEVICE_LOST."""

    def run(session, *args):
        try:
            return default(session, *args)
        except Exception as err:
            text = str(err)
            if DEVICE_LOST not in text and _link_error(text):
                raise RuntimeError(f"{DEVICE_LOST} during {stage}: {text.strip()[-300:]}") from err
            raise

    return run


def _link_error(text: str) -> bool:
    """The RPC link itself failed (the server process died or the network went), as opposed
    to the kernel failing on the device (which the server reports and survives)."""
    text = text.lower()
    return any(s in text for s in ("rpccode::kreturn", "kshutdown", "socket", "broken pipe",
                                   "connection reset", "connection refused", "connection aborted"))


def _upload(session, local_path, remote_path):
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_upload_module

    return _guarded("upload", default_upload_module)(session, local_path, remote_path)


def _alloc(session, device, args_info, alloc_repeat):
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_alloc_argument

    return _guarded("alloc", default_alloc_argument)(session, device, args_info, alloc_repeat)


def _run(session, rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_run_evaluator

    return _guarded("run", default_run_evaluator)(session, rt_mod, device, evaluator_config,
                                                   repeated_args)


def _check_exportable(target) -> None:
    """Candidates for an Android host are linked with the NDK: say so before tuning starts."""
    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", ""))
    if "android" in triple and not os.environ.get("TVM_NDK_CC"):
        raise TuningError(
            f"tuning for {triple} links every candidate with the Android NDK compiler: set "
            "TVM_NDK_CC to the NDK's clang++ (e.g. .../toolchains/llvm/prebuilt/linux-x86_64/"
            "bin/aarch64-linux-android28-clang++)")


def _cleanup(session, remote_path):
    # removing the uploaded kernel fails on a lost link; that must not mask why the run failed
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_cleanup

    try:
        default_cleanup(session, remote_path)
    except Exception:
        pass


def export_for_device(mod, target) -> str:
    """LocalBuilder's export: a ``.so`` the device loads; the NDK compiler for Android hosts."""
    import tempfile

    from tvm_lite.artifact import _export_library

    path = Path(tempfile.mkdtemp(prefix="tvm_lite_tune_")) / "kernel.so"
    _export_library(mod, path, target)
    return str(path)


def _build_kernel(mod, target, _params):
    """LocalBuilder's build, as MetaSchedule's default_build but without importing
    ``tvm.s_tir.tensor_intrin`` (40 s on 2 cores, ~7 s since ``inspect_cache``, in every builder
    worker of every batch: the builder restarts its pool per batch). The candidates arrive
    scheduled, tensorized bodies inlined; nothing here looks an intrinsic up."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with target:  # nvcc/NVRTC take -arch from the current target (tvm.compile does not enter it)
        return tvm.compile(mod, target=target)


def _export_kernel(mod, target_json):
    import tvm

    return export_for_device(mod, tvm.target.Target(target_json))


def make_runner(tracker: str | None, key: str | None, workers: int | None = None,
                number: int = 3, repeat: int = 1, min_repeat_ms: int = 0,
                session_timeout: float = 60.0, server_wait: float = 60.0):
    """An ``RPCRunner`` through the tracker with one worker per server under ``key`` (a farm
    measures in parallel), or a ``LocalRunner`` without a tracker."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=repeat,
                                          min_repeat_ms=min_repeat_ms,
                                          enable_cpu_cache_flush=False)
    if not tracker:
        return ms.runner.LocalRunner(evaluator_config=evaluator), 1
    if not key:
        raise TuningError("--rpc needs --key: the tracker key the device servers registered under")
    host, port = parse_address(tracker)
    servers = tracker_status(tracker)["keys"].get(key, {}).get("total", 0)
    if servers == 0:
        raise RPCError(f"the tracker at {host}:{port} has no server under key {key!r}; start one "
                       f"with `tvm-lite rpc server --tracker {host}:{port} --key {key}`")
    workers = workers or servers
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=session_timeout),
        evaluator_config=evaluator,
        f_create_session=functools.partial(_create_session, server_wait=server_wait),
        f_upload_module=_upload, f_alloc_argument=_alloc, f_run_evaluator=_run,
        f_cleanup=_cleanup, max_workers=workers)
    return runner, workers


def _callbacks(progress):
    """Measure callbacks: record (not what a lost device failed to measure), then MetaSchedule's
    own clean-up and cost-model update, then progress (which stops when no device is left)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.tirx import FloatImm

    @derived_object
    class RecordMeasured(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            db = task_scheduler.database_
            task = task_scheduler.tasks_[task_id].ctx
            workload = db.commit_workload(task.mod)
            for cand, res in zip(candidates, runner_results):
                if res.error_msg:
                    progress.failure(task.task_name, str(res.error_msg))
                if res.error_msg and DEVICE_LOST in str(res.error_msg):
                    progress.lost(str(res.error_msg))
                    continue  # not the schedule's fault: measure it again next time
                secs = res.run_secs if res.run_secs is not None else [FloatImm("float32", 1e10)]
                db.commit_tuning_record(TuningRecord(cand.sch.trace, workload, secs,
                                                     task.target, cand.args_info))
                progress.recorded([float(s.value) for s in secs], res.error_msg)

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            progress.batch_done(len(candidates))
            if progress.stop_reason:
                raise TuningStopped(progress.stop_reason)

    return [RecordMeasured(), ms.measure_callback.RemoveBuildArtifact(),
            ms.measure_callback.UpdateCostModel(), Progress()]


class _Progress:
    """A tqdm bar over the session's trials, and what the callbacks saw."""

    def __init__(self, total: int, show: bool, log_path: Path):
        from tqdm import tqdm

        self.log_path = log_path
        self.bar = tqdm(total=total, unit="trial", desc="tuning", disable=not show,
                        dynamic_ncols=True)
        self.n_recorded = self.n_failed = self.n_lost = 0
        self.lost_batch = 0
        self.stop_reason = None
        self.best: float | None = None
        self.lost_messages: list[str] = []

    def start_task(self, name: str, best: float | None):
        self.best = best
        self.bar.set_description(f"tuning {name}")

    def recorded(self, secs, error):
        self.n_recorded += 1
        if error:
            self.n_failed += 1
            return
        t = sum(secs) / len(secs)
        self.best = t if self.best is None else min(self.best, t)

    def failure(self, kernel: str, message: str):
        """Failed measurements are told why in DB/logs/tvm_lite_failures.log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {kernel}: {message.strip()}\n---\n")

    def lost(self, message: str):
        self.n_lost += 1
        self.lost_batch += 1
        self.lost_messages.append(message)
        if "no RPC server left" in message:
            self.stop_reason = message[message.index("no RPC server left"):].splitlines()[0]

    def batch_done(self, n: int):
        self.bar.update(n)
        if self.best is not None:
            self.bar.set_postfix_str(f"best {self.best * 1e6:.1f} us, lost {self.n_lost}")

    def close(self):
        self.bar.close()


@dataclass
class TuneReport:
    database: Path
    kernels: list = field(default_factory=list)  # one dict per kernel
    trials: int = 0  # measured in this session
    lost: int = 0  # measurements lost with their device (not recorded)
    stopped: str | None = None
    seconds: float = 0.0

    def table(self) -> str:
        from tvm_lite.bench import format_table

        return format_table(self.kernels, ["kernel", "calls", "MFLOP", "budget", "before",
                                           "measured", "records", "best us", "rules us",
                                           "speedup"])


def tune_model(model, target, database, *, tracker: str | None = None, key: str | None = None,
               trials: int = 64, top: int | None = 4, kernels=None, num_cores: int | None = None,
               trials_per_iter: int = 16, population: int = 256, workers: int | None = None,
               number: int = 3, repeat: int = 1, min_repeat_ms: int = 0,
               session_timeout: float = 60.0, server_wait: float = 60.0,
               seed: int | None = 0, baseline: bool = True, progress: bool = True,
               kv_cache: str = BuildOptions.kv_cache, quant=None, log=print) -> TuneReport:
    """Tune ``model``'s kernels for ``target``; records go to ``database`` (a directory).

    ``model``: an ONNX file / export folder, or an imported IRModule. ``trials``: the budget,
    split evenly over the selected kernels (``kernels`` by name, or the ``top`` by FLOPs);
    records already in the database count against it, so a rerun resumes. ``tracker``/``key``:
    measure on the servers under ``key`` (without: on this machine). ``baseline``: also measure
    each kernel as tvm_lite's schedule rules have it ("rules us"), to compare. ``kv_cache`` and
    ``quant`` (a ``tvm_lite.quant.QuantConfig``) must be those the build will use: they decide
    which kernels exist.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()
    if trials < 1:
        raise TuningError(f"--trials must be >= 1, got {trials}")
    tgt = tuning_target(target, num_cores)
    _check_exportable(tgt)
    if not isinstance(model, tvm.IRModule):
        model = import_model(model, quant, log)
    model = weights_as_built(model, tgt, log)
    lowered = lower_for_tuning(model, tgt, kv_cache)
    all_tasks = extract_kernels(lowered, tgt)
    chosen = select_kernels(all_tasks, kernels, None if kernels else top)
    per_kernel = max(1, trials // len(chosen))

    db_dir = Path(database)
    db = open_database(db_dir)
    report = TuneReport(db_dir)
    todo = []
    for task in chosen:
        before = measured(db, task.mod)
        row = {"kernel": task.name, "calls": task.weight, "MFLOP": task.flops / 1e6,
               "budget": per_kernel, "before": len(before), "measured": 0,
               "best us": before[0] * 1e6 if before else None}
        report.kernels.append(row)
        if len(before) < per_kernel:
            todo.append((task, row, per_kernel - len(before)))
    remaining = sum(n for _, _, n in todo)
    log(f"{len(chosen)} of {sum(t.static for t in all_tasks)} tunable kernels "
        f"({len(all_tasks)} in all), {per_kernel} trials each; {remaining} to measure"
        + (f" on the servers under {key!r} at {tracker}" if tracker else " on this machine"))
    if not todo and not baseline:
        report.seconds = time.perf_counter() - t0
        return _finish(report, db, chosen)

    runner, n_workers = make_runner(tracker, key, workers, number, repeat, min_repeat_ms,
                                    session_timeout=session_timeout, server_wait=server_wait)
    if tracker:
        log(f"measuring with {n_workers} RPC worker(s) in parallel")
    export = functools.partial(_export_kernel, target_json=tgt.export())
    builder = ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, timeout_sec=120,
                                      f_build=_build_kernel, f_export=export)
    cost_model = ms.cost_model.XGBModel(
        extractor=ms.feature_extractor.PerStoreFeature(), adaptive_training=True,
        num_tuning_cores=os.cpu_count() or 1)
    bar = _Progress(remaining, progress, db_dir / "logs" / "tvm_lite_failures.log")
    callbacks = _callbacks(bar)
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = ms_logger.level
    try:
        if baseline:  # tvm_lite's own schedule of each kernel, measured the same way
            for task, row in zip(chosen, report.kernels):
                row["rules us"] = _measure_rules(task, tgt, builder, runner, bar)
                if row["rules us"]:
                    record_rules_time(db_dir, task.mod, row["rules us"] / 1e6)
        for i, (task, row, n) in enumerate(todo):
            # its per-round tables would drown the progress bar (they stay in DB/logs/); set for
            # every task, as each tune_tasks call configures its loggers anew
            ms_logger.setLevel(logging.WARNING)
            bar.start_task(task.name, row["best us"] / 1e6 if row["best us"] else None)
            space, dropped = design_space(task.mod, tgt)
            if dropped:
                row["rules dropped"] = dropped
                log(f"{task.name}: MetaSchedule rule(s) {', '.join(dropped)} fail on this kernel "
                    "in TVM 0.27; tuning with the others")
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task.ctx], str(db_dir), space=space,
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=population, init_min_unmeasured=min(population, 64)),
                num_threads=os.cpu_count() or 1,
                seed=None if seed is None else seed + i + row["before"])
            recorded_before = bar.n_recorded
            try:
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db_dir),
                              max_trials_global=n, max_trials_per_task=n,
                              num_trials_per_iter=min(trials_per_iter, n), builder=builder,
                              runner=runner, database=db, cost_model=cost_model,
                              measure_callbacks=callbacks, task_scheduler="round-robin")
            except Exception as err:
                if bar.stop_reason is None:
                    raise
                report.stopped = bar.stop_reason
                del err
            finally:
                row["measured"] = bar.n_recorded - recorded_before
            if report.stopped:
                break
    finally:
        bar.close()
        ms_logger.setLevel(level)
        _shutdown(runner)
        _shutdown(builder)
    report.trials, report.lost = bar.n_recorded, bar.n_lost
    report.seconds = time.perf_counter() - t0
    return _finish(report, db, chosen)


def design_space(kernel, target):
    """MetaSchedule's default search space for ``target``, less the schedule rules that fail on
    ``kernel``: ``(space generator, names of the rules dropped)``.

    TVM 0.27's ``MultiLevelTilingTensorCore`` raises ("Back optional access") while it builds the
    space of a 4-bit decode GEMV for CUDA (``M = 1``: no tensor-core shape to tile), and one
    failing rule fails the whole task. When the full space cannot be built, each rule is tried on
    its own and the ones that fail are left out; the rest of the space is unchanged."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = kernel if isinstance(kernel, tvm.IRModule) else tvm.IRModule({"main": kernel})

    def space_of(rules, postprocs="from-target", mutators="from-target"):
        gen = ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                                mutator_probs=mutators)
        ctx = ms.TuneContext(mod=mod, target=target, space_generator=gen, task_name="probe")
        ctx.generate_design_space()
        return ctx.space_generator

    try:
        space_of("from-target")
        return "post-order-apply", []
    except Exception:  # pylint: disable=broad-except
        pass
    probe = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                           task_name="probe").space_generator
    kept, dropped = [], []
    for rule in probe.sch_rules:
        try:
            space_of([rule], postprocs=[], mutators={})
            kept.append(rule)
        except Exception:  # pylint: disable=broad-except
            dropped.append(type(rule).__name__)
    space = ms.space_generator.PostOrderApply(sch_rules=kept, postprocs=list(probe.postprocs),
                                              mutator_probs=dict(probe.mutator_probs))
    return space, dropped


def _measure_rules(task: KernelTask, target, builder, runner, bar) -> float | None:
    """Run time (us) of ``task`` as tvm_lite's schedule rules (``schedules.rules_for``) schedule
    it without tuning: the baseline a tuned kernel is compared with."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    from tvm_lite import schedules

    import tvm

    # a new module: ApplyDefaultSchedule updates the one it is given, and task.mod is the task's
    mod = tvm.IRModule(dict(task.mod.functions_items()), attrs=task.mod.attrs)
    with target:
        mod = dl.ApplyDefaultSchedule(*schedules.rules_for(target))(mod)
    (built,) = builder.build([ms.builder.BuilderInput(mod, target)])
    if built.error_msg:
        bar.failure(f"{task.name} (rules)", str(built.error_msg))
        return None
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    device = {"llvm": "cpu", "c": "cpu"}.get(target.kind.name, target.kind.name)
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args)])
    result = future.result()
    if result.error_msg:
        bar.failure(f"{task.name} (rules)", str(result.error_msg))
        return None
    secs = [float(s.value) for s in result.run_secs]
    return sum(secs) / len(secs) * 1e6


def _shutdown(obj) -> None:
    pool = getattr(obj, "pool", None)
    if pool is not None:
        try:
            pool.shutdown()
        except Exception:
            pass


def _finish(report: TuneReport, db, chosen=None) -> TuneReport:
    by_name = {k["kernel"]: k for k in report.kernels}
    for task in chosen or []:
        times = measured(db, task.mod)
        by_name[task.name]["records"] = len(times)
        by_name[task.name]["best us"] = times[0] * 1e6 if times else None
    for row in report.kernels:
        row.setdefault("records", row["before"])
        if row.get("rules us") and row.get("best us"):
            row["speedup"] = row["rules us"] / row["best us"]
    return report
