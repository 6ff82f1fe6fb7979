"""tvm_lite's Relax pipeline, top to bottom in phases.

The build options are one ``BuildOptions`` (``tvm_lite/options.py``).

Registered as ``relax.get_pipeline("tvm_lite", target=...)``. Target switches live here and in
``schedules/``, never inside a pass.

    Phase 1  graph                 stock canonicalization + tvm_lite's RemoveNoOpOps; the in-place
                                   KV cache (InplaceKVCache) unless kv_cache="copy", then main
                                   split into prefill + decode (SplitPrefillDecode), each
                                   layer's attention on the cache as one kernel (FuseAttention)
                                   unless fused_attention=False, prefill_last (prefill with the
                                   row-local tail -- last MLP, norm, lm_head -- on the last real
                                   row only: AddLastRowPrefill), the step helpers (step inputs
                                   and greedy token on the device: AddStepHelpers), prefill_fill
                                   (the cache writes only, for a prompt's chunks before its last:
                                   AddCacheFillPrefill), 4-bit kernels
                                   rebuilt per call shape (BindDequantKernelShapes), then the
                                   fusion passes unless fusion=False (fusion_passes())
    Phase 2  lower to TIR          LegalizeOps, fusion of elementwise/reduction chains, where the
                                   target's GEMM stores it a prefill gate+up GEMM and its gated
                                   activation as one kernel (FuseGatedEpilogue; with gate and up
                                   interleaved), on GPUs a decode GEMV's activation/RMSNorm
                                   folded into it (FuseGEMVPrologue)
    Phase 3  schedule              a MetaSchedule tuning database, if given (tvm-lite tune), then
                                   schedules.rules_for(target): CPU rules or GPU rules
    Phase 4  VM lowering           dataflow lowering, memory planning (TVM's StaticPlanBlockMemory,
                                   then tvm_lite's PlanSymbolicArena for prefill/decode unless
                                   memory_plan="tvm"), entry points that take the caches and
                                   workspaces as tuples (AddTupledBufferEntries: RPC), one-call
                                   greedy steps over them, also with the buffers as separate
                                   arguments (AddStepEntries), inlined into flat functions
                                   (InlineStepCalls), register kills only where storage is freed
                                   (DropKillsWithoutStorage), each view, symbolic shape and
                                   scalar made once per call there (ShareHostValues), VM shape
                                   lowering (static weights unchecked: "num_input") and last the
                                   calling convention as _metadata() (AttachMetadata)
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from tvm_lite import schedules
from tvm_lite.convention import KV_CACHE_ATTR, KV_COPY, KV_INPLACE
from tvm_lite.errors import UserError
from tvm_lite.options import PDL_AUTO, PDL_GRAPHS, BuildOptions
from tvm_lite.tuning_db import check_database_matches, records_faster_than_rules
from tvm_lite.relax_passes.launch_dependents_early import supports as launch_dependents_supported
from tvm_lite.relax_passes import (AddCacheFillPrefill, AddDecodeFunction, AddLastRowPrefill,
                                   AttachMetadata, AddStepEntries, AddStepHelpers,
                                   AddTupledBufferEntries,
                                   BindDequantKernelShapes, DecodeWritesAtPosition,
                                   DropKillsWithoutStorage,
                                   FuseAddRMSNorm, FuseAttention, FuseGatedEpilogue,
                                   FuseGEMVPrologue,
                                   FuseKVAppend, FuseRotary, FuseSiluMul, InlineStepCalls,
                                   InplaceKVCache, LaunchDependentsEarly, SeparateGraphKernels,
                                   LegalizeGroupedReshape, PlanSymbolicArena, RemoveNoOpOps,
                                   ShareHostValues, SplitPrefillDecode)

PIPELINE_NAME = "tvm_lite"
# TIR: TVM's default pipeline, the device modules of CUDA sm_90+ then through LaunchDependentsEarly
TIR_PIPELINE_DEPENDENT_LAUNCH = "tvm_lite_dependent_launch"
# ... only the kernels SeparateGraphKernels set apart for the CUDA-graph functions
TIR_PIPELINE_DEPENDENT_LAUNCH_GRAPHS = "tvm_lite_dependent_launch_graphs"
# A gated MLP's gate and up merged with their columns interleaved (MergeSharedInputProjections'
# ``interleave_gate_up``) in builds whose target's prefill GEMM stores ``act(gate) * up`` itself
# (:func:`interleaves_gate_up`); False: gate then up, the halves, on every target. H100,
# thirty-eighth session (``results/issue16_gated_epilogue_llama1b_h100_s38.json``), Llama-1B at
# 2048 tokens: one call's GPU time 14.35 -> 13.91 ms (the gate+up GEMM 401 us + its activation
# kernel 32 us -> 406 us a layer), the chunks of 256 20.69 -> 20.36 ms, decode unchanged;
# Gemma-2B's fused kernel saved 814 us over 17 layers in the thirty-sixth session.
INTERLEAVE_GATE_UP = True


def _tir_pipeline_dependent_launch(graph_only: bool):
    """(pipeline, host finalization, device finalization) of TVM's default TIR pipeline, the
    device finalization first running :class:`LaunchDependentsEarly` (it needs the kernels as
    split from the host code, their launch tags set)."""

    def make(**kwargs):
        pipeline, host, device = tvm.tirx.get_tir_pipeline("default", **kwargs)
        return pipeline, host, lambda: tvm.transform.Sequential(
            [LaunchDependentsEarly(graph_only=graph_only), device()])

    return make


for _name, _graph_only in ((TIR_PIPELINE_DEPENDENT_LAUNCH, False),
                           (TIR_PIPELINE_DEPENDENT_LAUNCH_GRAPHS, True)):
    tvm.tirx.compilation_pipeline.register_tir_pipeline(
        _name, _tir_pipeline_dependent_launch(_graph_only))


def resolved(target: tvm.target.Target, opts: BuildOptions) -> BuildOptions:
    """``opts`` with what the target decides filled in: ``dependent_launch="auto"`` becomes
    ``"graphs"`` on CUDA sm_90+ and False elsewhere."""
    if opts.dependent_launch == PDL_AUTO:
        return opts.replace(dependent_launch=PDL_GRAPHS if launch_dependents_supported(target)
                            else False)
    return opts


def tir_pipeline(target: tvm.target.Target, opts: BuildOptions) -> str:
    """The TIR pipeline's name for ``target``: ``dependent_launch`` takes
    :data:`TIR_PIPELINE_DEPENDENT_LAUNCH` (``"graphs"``: ``..._GRAPHS``; CUDA sm_90+ only:
    another target is an error naming the option), otherwise TVM's default."""
    opts = resolved(target, opts)
    if not opts.dependent_launch:
        return "default"
    if not launch_dependents_supported(target):
        raise UserError(f"dependent_launch={opts.dependent_launch!r}: programmatic dependent "
                        f"launch needs a CUDA target of sm_90 or newer, not {target}")
    if opts.dependent_launch == PDL_GRAPHS:
        return TIR_PIPELINE_DEPENDENT_LAUNCH_GRAPHS
    return TIR_PIPELINE_DEPENDENT_LAUNCH


def _dump(phase: str, dump_dir: str | None):
    """A pass that writes the module after ``phase`` to ``dump_dir`` (if set)."""

    @tvm.transform.module_pass(opt_level=0, name=f"Dump[{phase}]")
    def dump(mod, _ctx):
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(dump_dir) / f"{phase}.py").write_text(mod.script(show_meta=False))
        return mod

    return dump


def fusion_passes(gpu: bool = False) -> list:
    """tvm_lite's pattern fusion passes (``relax_passes/fuse_*.py``), in the order they run.
    ``gpu``: the norms in front of decode GEMVs keep their residual add outside (the previous
    GEMV's epilogue), for FuseGEMVPrologue to fold the norm into the next GEMV."""
    return [FuseAddRMSNorm(norm_before_gemv=gpu), FuseRotary(),
            FuseKVAppend(), FuseSiluMul(), LegalizeGroupedReshape()]


def interleaves_gate_up(target: tvm.target.Target) -> bool:
    """Whether a build for ``target`` merges a gated MLP's gate and up interleaved
    (``relax_passes/merge_shared_input_projections.py``): with :data:`INTERLEAVE_GATE_UP`, only
    where its prefill GEMM stores the activation (:func:`gated_epilogue_passes`). Elsewhere the
    layout would only make the activation kernel read two strided views instead of two halves."""
    return bool(INTERLEAVE_GATE_UP and schedules.gated_gemm_check(target) is not None)


def gated_epilogue_passes(target: tvm.target.Target) -> list:
    """After FuseOps: a prefill gate+up GEMM and the gated activation reading its interleaved
    output as one kernel (``relax_passes/fuse_gated_epilogue.py``), on targets whose prefill GEMM
    stores that (``schedules.gated_gemm_check``: CUDA with tensor cores); a no-op unless the
    weights were merged interleaved (:func:`interleaves_gate_up`)."""
    takes = schedules.gated_gemm_check(target)
    return [FuseGatedEpilogue(takes)] if takes is not None else []


def gemv_prologue_passes(gpu: bool) -> list:
    """After FuseOps, on GPUs: a decode GEMV's activation / RMSNorm producer folded into the GEMV
    (``relax_passes/fuse_gemv_prologue.py``); the CPU rules take a GEMV with its input in
    memory, so the CPU pipeline keeps them apart."""
    return [FuseGEMVPrologue()] if gpu else []


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


def phases(target: tvm.target.Target, kv_cache: str | None = None,
           memory_plan: str | None = None, *, options: BuildOptions | None = None,
           applied: list | None = None, described: list | None = None,
           **fields) -> list[tuple[str, list]]:
    """The pipeline as named phases of passes (what ``tvm_lite_pipeline`` runs, in order).

    ``options``: a :class:`BuildOptions` (``tvm_lite/options.py`` documents each field); its
    fields may also be given as arguments (``phases(tgt, "copy", fusion=False)``). What they do
    here: ``kv_cache`` other than "copy" rewrites the past/present KV interface into one in-place
    cache per layer (InplaceKVCache; "inplace" insists) and splits the decoder into ``prefill``
    and ``decode``; ``memory_plan="arena"`` plans their activations into caller-owned workspaces;
    ``fusion``: tvm_lite's pattern fusion passes before FuseOps; ``fused_attention``: one
    attention kernel per layer on the in-place cache; ``tuning_db``: a MetaSchedule database
    applied before the rules (``applied`` receives the names of the kernels it scheduled);
    ``described`` receives the module's calling convention (AttachMetadata);
    ``decode_function`` (default: on with a database) gives a past/present decoder a ``decode``
    function too, ``main`` with one new token, whose static-shape kernels are what tuning
    measures. The last pass describes the calling convention (AttachMetadata).
    """
    opts = resolved(target, BuildOptions.of(options, kv_cache=kv_cache, memory_plan=memory_plan,
                                            **fields))
    kv_cache, memory_plan, tuning_db = opts.kv_cache, opts.memory_plan, opts.tuning_db
    kv_passes = [] if kv_cache == KV_COPY else [
        InplaceKVCache(required=kv_cache == KV_INPLACE, windows=opts.kv_windows),
        SplitPrefillDecode(only_with_attr=KV_CACHE_ATTR)]
    if opts.fused_attention and kv_passes:  # ring caches for window layers (every target)
        kv_passes.append(FuseAttention(ring=True))
    if kv_passes:  # prefill_step's prefill computes one row's logits; device-side step inputs
        # and greedy token (relax_passes/add_last_row_prefill.py, add_step_helpers.py)
        kv_passes += [AddLastRowPrefill(KV_CACHE_ATTR), AddStepHelpers(KV_CACHE_ATTR),
                      AddCacheFillPrefill(KV_CACHE_ATTR)]  # prefill_chain's: no logits
    arena = [PlanSymbolicArena(only_with_attr=KV_CACHE_ATTR)] if memory_plan == "arena" else []
    gpu = "gpu" in target.keys  # GPU-only fusions: the norm and activation in decode GEMVs
    decode_function = bool(tuning_db) if opts.decode_function is None else opts.decode_function
    add_decode = [AddDecodeFunction()] if decode_function and kv_cache == KV_COPY else []
    return [
        ("1_graph", [
            *add_decode,
            relax.transform.CanonicalizeBindings(),
            RemoveNoOpOps(),
            relax.transform.CanonicalizeBindings(),  # forward the aliases RemoveNoOpOps leaves
            *kv_passes,
            BindDequantKernelShapes(),  # 4-bit kernels built for prefill's and decode's shapes
            *(fusion_passes(gpu) if opts.fusion else []),
            *([DecodeWritesAtPosition()] if kv_passes else []),  # decode's K/V row at its position
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
            *(gated_epilogue_passes(target) if opts.fusion else []),
            *(gemv_prologue_passes(gpu) if opts.fusion else []),
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
            AddTupledBufferEntries(KV_CACHE_ATTR),  # in-place decoders over RPC; else a no-op
            AddStepEntries(),  # prefill_step/decode_step: ints in, the greedy token out
            InlineStepCalls(),  # ... as flat functions: weights checked once per step, not thrice
            # dependent_launch="graphs": decode_padded's kernels as copies of their own
            *([SeparateGraphKernels()] if opts.dependent_launch == PDL_GRAPHS else []),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            DropKillsWithoutStorage(),  # no register kills where nothing is freed (views only)
            ShareHostValues(),  # ... and there one view per (buffer, shape, dtype), one shape
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
            AttachMetadata(opts.to_dict(), described),  # last: _metadata() describes what is above
        ]),
    ]


@relax.register_pipeline(PIPELINE_NAME)
def tvm_lite_pipeline(target: tvm.target.Target, dump_dir: str | None = None,
                      options: BuildOptions | None = None, applied: list | None = None,
                      described: list | None = None, **fields):
    """The whole pipeline as one pass. ``dump_dir`` (or ``$TVM_LITE_DUMP_IR``) gets the IR after
    each phase; ``options`` (or its fields as arguments), ``applied`` and ``described`` as in
    :func:`phases`."""
    dump_dir = dump_dir or os.environ.get("TVM_LITE_DUMP_IR")
    opts = BuildOptions.of(options, **fields)

    @tvm.transform.module_pass(opt_level=0, name="tvm_lite_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            for name, passes in phases(target, options=opts, applied=applied,
                                        described=described):
                mod = tvm.transform.Sequential([*passes, _dump(name, dump_dir)], name=name)(mod)
        return mod

    return _pipeline
