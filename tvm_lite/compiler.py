"""``tvm_lite.build``: an imported Relax module -> a TVM Executable for a target."""

from __future__ import annotations

import tvm
from tvm import relax

from . import pipeline as _pipeline
from .errors import stage
from .target import check_codegen, parse_target


def detach_params(mod: tvm.IRModule) -> tuple[tvm.IRModule, list]:
    """Split the weights the importer attached (``params`` attr) from the module."""
    if not any(gv.name_hint == "main" for gv in mod.get_global_vars()):
        return mod, []
    func = mod["main"]
    params = list(func.attrs["params"]) if func.attrs and "params" in func.attrs else []
    if params:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # do not mutate the caller's
        mod["main"] = func.without_attr("params")
    return mod, params


def build(mod: tvm.IRModule, target="llvm", *, kv_cache: str = "auto",
          memory_plan: str = "arena", dump_dir: str | None = None, tuning_db=None,
          decode_function: bool | None = None, applied: list | None = None,
          pipeline: str = "tvm_lite", fusion: bool = True,
          fused_attention: bool = True):
    """Compile ``mod`` for ``target`` through tvm_lite's pipeline.

    ``target`` is a classic string (``"llvm"``, ``"cuda -arch=sm_90"``, ``"opencl -device=adreno"``,
    ``"opencl -device=mali"``, ``"vulkan"``), a dict or a ``tvm.target.Target``. Returns the
    ``tvm.runtime.Executable``; the weights stay out of it (they are the ``params`` attribute of
    the imported module: see :func:`detach_params`).

    ``kv_cache``: ``"auto"`` (default) turns a decoder's past/present KV interface into one
    in-place cache per layer (``relax_passes/inplace_kv_cache.py`` documents the new signature),
    ``"inplace"`` insists on it, ``"copy"`` keeps the exported past/present interface. An in-place
    decoder comes out as two functions, ``prefill`` and ``decode`` (one new token).

    ``memory_plan``: ``"arena"`` (default) plans prefill's and decode's activations into workspace
    buffers the caller allocates once (``relax_passes/plan_symbolic_arena.py``); ``"tvm"`` keeps
    TVM's StaticPlanBlockMemory alone.

    ``fusion``: tvm_lite's pattern fusion passes (``relax_passes/fuse_*.py``); False compiles
    with FuseOps alone (for comparisons).
    ``fused_attention``: each layer's attention on the in-place cache as one kernel (default), or
    the exported op-by-op graph (False).

    ``tuning_db``: a MetaSchedule database directory written by ``tvm-lite tune``; its kernels
    replace tvm_lite's schedules where it has them (their names are appended to ``applied``).
    ``decode_function``: see ``pipeline.phases``.

    ``pipeline="stock"`` compiles with TVM's own default pipeline for the target instead (for CUDA:
    FuseOps + DLight's default GPU rules, past/present KV interface): the baseline benchmarks
    compare against. The other options do not apply to it.
    """
    if pipeline not in ("tvm_lite", "stock"):
        raise ValueError(f"pipeline={pipeline!r}: expected 'tvm_lite' or 'stock'")
    tgt = parse_target(target)
    check_codegen(tgt)
    mod, _ = detach_params(mod)
    if tuning_db is not None:
        from tvm_lite.rpc.tune import check_database

        tuning_db = check_database(tuning_db)
    if pipeline == "stock":
        with tgt, stage("compile", where=f"stock pipeline, {tgt.kind.name}"):
            return tvm.compile(mod, target=tgt)
    with tgt, stage("compile", where=f"{tgt.kind.name}"):  # TVM's errors -> CompileError
        return tvm.compile(mod, target=tgt,
                           relax_pipeline=relax.get_pipeline(_pipeline.PIPELINE_NAME, target=tgt,
                                                             dump_dir=dump_dir, kv_cache=kv_cache,
                                                             memory_plan=memory_plan,
                                                             tuning_db=tuning_db,
                                                             decode_function=decode_function,
                                                             applied=applied,
                                                             fusion=fusion,
                                                             fused_attention=fused_attention))


def device_source(executable, kind: str = "opencl") -> str:
    """The generated source of the ``kind`` device module (e.g. the OpenCL C of every kernel)."""
    found = []

    def walk(module):
        if module.kind == kind:
            found.append(module.inspect_source())
        for sub in module.imports:
            walk(sub)

    walk(executable.mod)
    if not found:
        raise ValueError(f"the executable has no {kind} module")
    return "\n".join(found)
