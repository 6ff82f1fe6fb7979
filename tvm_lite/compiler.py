"""``tvm_lite.build``: an imported Relax module -> a TVM Executable for a target."""

from __future__ import annotations

import tvm
from tvm import relax

from . import pipeline as _pipeline
from .errors import stage
from .options import BuildOptions
from .target import check_codegen, parse_target
from .tuning_db import check_database


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


def build(mod: tvm.IRModule, target="llvm", options: BuildOptions | None = None, *,
          dump_dir: str | None = None, applied: list | None = None,
          described: list | None = None, **fields):
    """Compile ``mod`` for ``target`` through tvm_lite's pipeline.

    ``target`` is a classic string (``"llvm"``, ``"cuda -arch=sm_90"``, ``"opencl -device=adreno"``,
    ``"opencl -device=mali"``, ``"vulkan"``), a dict or a ``tvm.target.Target``. Returns the
    ``tvm.runtime.Executable``; the weights stay out of it (they are the ``params`` attribute of
    the imported module: see :func:`detach_params`).

    ``options``: a :class:`tvm_lite.options.BuildOptions` (KV cache, memory plan, fusion, fused
    attention, tuning database, pipeline; documented there); its fields may also be given as
    keyword arguments (``kv_cache="copy"``, ``fusion=False``...), which replace the object's.
    The compiled module describes its calling convention in a ``_metadata`` function
    (``relax_passes/attach_metadata.py``).

    ``dump_dir``: write the IR after each phase there. ``applied``: receives the names of the
    kernels the tuning database scheduled. ``described``: receives the calling convention (the
    dict ``_metadata`` returns as JSON).
    """
    opts = BuildOptions.of(options, **fields)
    tgt = parse_target(target)
    check_codegen(tgt)
    mod, _ = detach_params(mod)
    if opts.tuning_db is not None:
        opts = opts.replace(tuning_db=check_database(opts.tuning_db))
    if opts.stock:  # (TVM's own pipeline: the other options do not apply)
        with tgt, stage("compile", where=f"stock pipeline, {tgt.kind.name}"):
            return tvm.compile(mod, target=tgt)
    tir_pipeline = _pipeline.tir_pipeline(tgt, opts)  # (an option the target cannot take: here)
    with tgt, stage("compile", where=f"{tgt.kind.name}"):  # TVM's errors -> CompileError
        return tvm.compile(mod, target=tgt,
                           relax_pipeline=relax.get_pipeline(_pipeline.PIPELINE_NAME, target=tgt,
                                                             dump_dir=dump_dir, options=opts,
                                                             applied=applied,
                                                             described=described),
                           tir_pipeline=tir_pipeline)


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
