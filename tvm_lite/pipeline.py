"""tvm_lite's Relax pipeline, top to bottom in phases.

Registered as ``relax.get_pipeline("tvm_lite", target=...)``. Target switches live here and in
``schedules/``, never inside a pass.

    Phase 1  graph                 stock canonicalization + tvm_lite's RemoveNoOpOps; the in-place
                                   KV cache (InplaceKVCache) unless kv_cache="copy", then main
                                   split into prefill + decode (SplitPrefillDecode), each
                                   layer's attention on the cache as one kernel (FuseAttention)
                                   unless fused_attention=False, the step helpers (step inputs
                                   and greedy token on the device: AddStepHelpers), 4-bit kernels
                                   rebuilt per call shape (BindDequantKernelShapes), then the
                                   fusion passes unless fusion=False (fusion_passes())
    Phase 2  lower to TIR          LegalizeOps, fusion of elementwise/reduction chains
    Phase 3  schedule              a MetaSchedule tuning database, if given (tvm-lite tune), then
                                   schedules.rules_for(target): CPU rules or GPU rules
    Phase 4  VM lowering           dataflow lowering, memory planning (TVM's StaticPlanBlockMemory,
                                   then tvm_lite's PlanSymbolicArena for prefill/decode unless
                                   memory_plan="tvm"), entry points that take the caches and
                                   workspaces as tuples (AddTupledBufferEntries: RPC), one-call
                                   greedy steps over them (AddStepEntries), VM shape lowering
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from tvm_lite import schedules
from tvm_lite.relax_passes import (AddDecodeFunction, AddStepEntries, AddStepHelpers,
                                   AddTupledBufferEntries,
                                   BindDequantKernelShapes, FuseAddRMSNorm, FuseAttention,
                                   FuseKVAppend, FuseRotary, FuseSiluMul, InplaceKVCache,
                                   LegalizeGroupedReshape, PlanSymbolicArena, RemoveNoOpOps,
                                   SplitPrefillDecode)

PIPELINE_NAME = "tvm_lite"


def _dump(phase: str, dump_dir: str | None):
    """A pass that writes the module after ``phase`` to ``dump_dir`` (if set)."""

    @tvm.transform.module_pass(opt_level=0, name=f"Dump[{phase}]")
    def dump(mod, _ctx):
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(dump_dir) / f"{phase}.py").write_text(mod.script(show_meta=False))
        return mod

    return dump


KV_CACHE_MODES = ("auto", "inplace", "copy")
MEMORY_PLANS = ("arena", "tvm")
KV_ATTR = "tvm_lite.kv_cache_names"  # set by InplaceKVCache on the decoders it rewrote


def fusion_passes() -> list:
    """tvm_lite's pattern fusion passes (``relax_passes/fuse_*.py``), in the order they run."""
    return [FuseAddRMSNorm(), FuseRotary(), FuseKVAppend(), FuseSiluMul(),
            LegalizeGroupedReshape()]


def _scheduled(mod) -> set:
    return {gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and int(f.attrs.get("tirx.is_scheduled", 0)) == 1}


def _tuned_schedules(tuning_db, applied: list | None) -> list:
    """MetaSchedule's records (``tvm-lite tune``) before the rules: a tuned kernel is used where
    it measured faster than tvm_lite's rules in its tuning session, the others keep the rules
    (ApplyDefaultSchedule skips scheduled functions). The names of the kernels the database
    scheduled go to ``applied``."""
    if not tuning_db:
        return []

    @tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
    def apply(mod, _ctx):
        from tvm_lite.rpc.tune import check_database_matches, records_faster_than_rules

        before = _scheduled(mod)
        skipped: list = []  # kernels whose records lost to the rules
        with records_faster_than_rules(tuning_db, skipped) as db:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        got = sorted(_scheduled(mod) - before)
        if not got and not skipped:  # a database of other kernels (another model, other options)
            check_database_matches(tuning_db, db)
        if applied is not None:
            applied.extend(got)
        return mod

    return [apply]


def phases(target: tvm.target.Target, kv_cache: str = "auto", memory_plan: str = "arena", *,
           fusion: bool = True, fused_attention: bool = True, tuning_db=None,
           decode_function: bool | None = None,
           applied: list | None = None) -> list[tuple[str, list]]:
    """The pipeline as named phases of passes (what ``tvm_lite_pipeline`` runs, in order).

    ``kv_cache``: "inplace" rewrites the past/present KV interface into one in-place cache per
    layer (an error if the model has none), "auto" does so when the model has one, "copy" keeps
    the exported interface; an in-place decoder is split into ``prefill`` and ``decode``.
    ``memory_plan``: "arena" plans prefill/decode activations into caller-owned workspace buffers
    with symbolic-size reuse; "tvm" keeps TVM's StaticPlanBlockMemory alone.
    ``fusion``: run tvm_lite's pattern fusion passes (add + RMSNorm ...) before FuseOps.
    ``tuning_db``: a MetaSchedule database directory (``tvm-lite tune``) applied before the rules;
    ``applied`` receives the names of the kernels it scheduled. ``decode_function`` (default: on
    with a database) gives a past/present (``kv_cache="copy"``) decoder a ``decode`` function too,
    ``main`` with one new token, whose static-shape kernels are what tuning measures; in-place
    decoders always have one.
    ``fused_attention``: replace each layer's attention on the in-place cache by one tvm_lite
    attention kernel (``relax_passes/fuse_attention.py``); no effect with kv_cache="copy".
    """
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {KV_CACHE_MODES}")
    if memory_plan not in MEMORY_PLANS:
        raise ValueError(f"memory_plan={memory_plan!r}: expected one of {MEMORY_PLANS}")
    kv_passes = [] if kv_cache == "copy" else [InplaceKVCache(required=kv_cache == "inplace"),
                                               SplitPrefillDecode(only_with_attr=KV_ATTR)]
    if fused_attention and kv_passes:
        kv_passes.append(FuseAttention())
    if kv_passes:  # device-side step inputs and greedy token (relax_passes/add_step_helpers.py)
        kv_passes.append(AddStepHelpers(KV_ATTR))
    arena = [PlanSymbolicArena(only_with_attr=KV_ATTR)] if memory_plan == "arena" else []
    if decode_function is None:
        decode_function = bool(tuning_db)
    add_decode = [AddDecodeFunction()] if decode_function and kv_cache == "copy" else []
    return [
        ("1_graph", [
            *add_decode,
            relax.transform.CanonicalizeBindings(),
            RemoveNoOpOps(),
            relax.transform.CanonicalizeBindings(),  # forward the aliases RemoveNoOpOps leaves
            *kv_passes,
            BindDequantKernelShapes(),  # 4-bit kernels built for prefill's and decode's shapes
            *(fusion_passes() if fusion else []),
            relax.transform.EliminateCommonSubexpr(),
            relax.transform.DeadCodeElimination(),
        ]),
        ("2_lower_to_tir", [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]),
        ("3_schedule", [
            *_tuned_schedules(tuning_db, applied),
            dl.ApplyDefaultSchedule(*schedules.rules_for(target)),
        ]),
        ("4_vm_lowering", [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            *arena,
            AddTupledBufferEntries(KV_ATTR),  # in-place decoders over RPC; else a no-op
            AddStepEntries(),  # prefill_step/decode_step: ints in, the greedy token out
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]),
    ]


@relax.register_pipeline(PIPELINE_NAME)
def tvm_lite_pipeline(target: tvm.target.Target, dump_dir: str | None = None,
                      kv_cache: str = "auto", memory_plan: str = "arena", **options):
    """The whole pipeline as one pass. ``dump_dir`` (or ``$TVM_LITE_DUMP_IR``) gets the IR after
    each phase; ``kv_cache``, ``memory_plan`` and ``options`` (``tuning_db``, ``decode_function``,
    ``applied``) as in :func:`phases`."""
    dump_dir = dump_dir or os.environ.get("TVM_LITE_DUMP_IR")

    @tvm.transform.module_pass(opt_level=0, name="tvm_lite_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            for name, passes in phases(target, kv_cache, memory_plan, **options):
                mod = tvm.transform.Sequential([*passes, _dump(name, dump_dir)], name=name)(mod)
        return mod

    return _pipeline
