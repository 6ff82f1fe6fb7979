"""``tvm_lite.build``: an imported Relax module -> a TVM Executable for a target."""

from __future__ import annotations

import tvm
from tvm import relax

from . import pipeline as _pipeline
from .target import check_codegen, parse_target


def detach_params(mod: tvm.IRModule) -> tuple[tvm.IRModule, list]:
    """Split the weights the importer attached (``params`` attr) from the module."""
    func = mod["main"]
    params = list(func.attrs["params"]) if func.attrs and "params" in func.attrs else []
    if params:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # do not mutate the caller's
        mod["main"] = func.without_attr("params")
    return mod, params


def build(mod: tvm.IRModule, target="llvm", *, dump_dir: str | None = None, tuning_db=None,
          decode_function: bool | None = None, applied: list | None = None):
    """Compile ``mod`` for ``target`` through tvm_lite's pipeline.

    ``target`` is a classic string (``"llvm"``, ``"cuda -arch=sm_90"``, ``"opencl -device=adreno"``,
    ``"opencl -device=mali"``, ``"vulkan"``), a dict or a ``tvm.target.Target``. Returns the
    ``tvm.runtime.Executable``; the weights stay out of it (they are the ``params`` attribute of
    the imported module: see :func:`detach_params`).

    ``tuning_db``: a MetaSchedule database directory written by ``tvm-lite tune``; its kernels
    replace tvm_lite's schedules where it has them (their names are appended to ``applied``).
    With it, the executable also has a ``decode`` function (``decode_function``: see
    ``pipeline.phases``).
    """
    tgt = parse_target(target)
    check_codegen(tgt)
    mod, _ = detach_params(mod)
    if tuning_db is not None:
        from tvm_lite.rpc.tune import check_database

        tuning_db = check_database(tuning_db)
    with tgt:
        return tvm.compile(mod, target=tgt,
                           relax_pipeline=relax.get_pipeline(
                               _pipeline.PIPELINE_NAME, target=tgt, dump_dir=dump_dir,
                               tuning_db=tuning_db, decode_function=decode_function,
                               applied=applied))


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
