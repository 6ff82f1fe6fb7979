"""LaunchDependentsEarly: on Hopper, a kernel's launch overlaps the tail of the kernel before it.

A decode step is ~125 small kernels in a row (Llama-3.2-1B: 0.563 ms of kernel time a step on an
H200, ~4.5 us a kernel). Between two of them the GPU drains the first grid, flushes its writes,
then launches and fills the next: a fixed cost at every boundary, paid again inside a CUDA graph.
CUDA's *programmatic dependent launch* (sm_90+) lets the next kernel be launched while the one
before still runs; its workgroups wait, resident, at ``griddepcontrol.wait`` until the earlier
grid has completed and its memory is visible.

This TIR pass runs on the device module after TVM has split host from device code (it is in
the ``tvm_lite_dependent_launch`` TIR pipeline that ``tvm_lite/pipeline.py`` registers, option
``dependent_launch``). For
every kernel of a CUDA sm_90+ target it

* puts ``griddepcontrol.wait`` before the kernel's first statement. Nothing of the kernel runs
  before it returns, so every kernel sees its predecessor's results as the plain stream order
  gave them (and so, transitively, every earlier kernel's);
* then ``griddepcontrol.launch_dependents``: from here the next kernel in the stream may be
  launched. At most two kernels are resident at once: one running, the next one waiting;
* adds TVM's ``tirx.use_programtic_dependent_launch`` launch tag (spelled so in TVM 0.27; a flag,
  no launch argument): the runtime then launches the kernel with ``cuLaunchKernelEx`` and the
  programmatic-stream-serialization attribute (in a CUDA graph capture: a programmatic edge).

A kernel launched without the attribute (an older runtime, another stream) runs the two
instructions as no-ops.

``LaunchDependentsEarly(graph_only=True)`` (``dependent_launch="graphs"``, the
``tvm_lite_dependent_launch_graphs`` TIR pipeline) does this only to the kernels of the
PrimFuncs ``SeparateGraphKernels`` set apart for the CUDA-graph functions: those named
``<name>`` + :data:`GRAPH_SUFFIX` + ``_kernel[_N]``.
"""

from __future__ import annotations

import re

import tvm
from tvm import tirx
from tvm.script import tirx as T

PDL_TAG = "tirx.use_programtic_dependent_launch"  # TVM 0.27's spelling (runtime/...module.h)
DYN_SHARED_TAG = "tirx.use_dyn_shared_memory"  # must stay the last tag
DEVICE_KERNEL_LAUNCH = 2  # calling_conv of a kernel (CallingConv::kDeviceKernelLaunch)
MIN_ARCH = 90
GRAPH_SUFFIX = "_in_graph"  # the graph PrimFuncs (relax_passes/separate_graph_kernels.py)
_GRAPH_KERNEL = re.compile(re.escape(GRAPH_SUFFIX) + r"_kernel(_\d+)?$")

_ASM = {name: f"""
__forceinline__ __device__ void {name}() {{
  asm volatile("{ptx}" ::: "memory");
}}
""" for name, ptx in (("tvm_lite_griddep_wait", "griddepcontrol.wait;"),
                      ("tvm_lite_griddep_launch", "griddepcontrol.launch_dependents;"))}


def _helper(name: str) -> tirx.Stmt:
    return tirx.Evaluate(T.cuda.func_call(name, source_code=_ASM[name]))


def supports(target) -> bool:
    """CUDA with an arch of sm_90 or newer (``griddepcontrol`` is PTX for sm_90+)."""
    if target is None or target.kind.name != "cuda":
        return False
    digits = "".join(ch for ch in str(target.attrs.get("arch", "")) if ch.isdigit())
    return digits != "" and int(digits) >= MIN_ARCH


def _first_statement(stmt: tirx.Stmt) -> tirx.Stmt:
    """``stmt`` with the two instructions before its first statement that is not a buffer
    declaration or a thread launch (the kernel body proper)."""
    if isinstance(stmt, tirx.SeqStmt):
        items = list(stmt.seq)
        i = next((i for i, s in enumerate(items) if not isinstance(s, tirx.DeclBuffer)),
                 len(items))
        if i == len(items):
            return tirx.SeqStmt(items + [_helper("tvm_lite_griddep_wait"),
                                         _helper("tvm_lite_griddep_launch")])
        items[i] = _first_statement(items[i])
        return tirx.SeqStmt(items)
    if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent":
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _first_statement(stmt.body),
                             stmt.span)
    return tirx.SeqStmt([_helper("tvm_lite_griddep_wait"), _helper("tvm_lite_griddep_launch"),
                         stmt])


def is_graph_kernel(name: str) -> bool:
    """Whether the kernel ``name`` is one of a PrimFunc ``SeparateGraphKernels`` set apart."""
    return _GRAPH_KERNEL.search(name) is not None


def _launch_params(params) -> list:
    tags = [str(t) for t in params]
    if tags and tags[-1] == DYN_SHARED_TAG:
        return tags[:-1] + [PDL_TAG, DYN_SHARED_TAG]
    return tags + [PDL_TAG]


@tvm.transform.module_pass(opt_level=0, name="LaunchDependentsEarly")
class LaunchDependentsEarly:
    """Every CUDA sm_90+ kernel of a device module (``graph_only``: every one of the CUDA-graph
    functions' PrimFuncs) waits for its predecessor at its first instruction, lets its successor
    launch right after, and is launched with programmatic dependent launch (module doc). Other
    functions and targets are left as they are."""

    def __init__(self, graph_only: bool = False):
        self.graph_only = graph_only

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mod.clone()
        for gv, func in list(mod.functions_items()):
            attrs = func.attrs or {}
            if (isinstance(func, tirx.PrimFunc)
                    and int(attrs.get("calling_conv", 0)) == DEVICE_KERNEL_LAUNCH
                    and supports(attrs.get("target"))
                    and "tirx.kernel_launch_params" in attrs
                    and PDL_TAG not in [str(t) for t in attrs["tirx.kernel_launch_params"]]
                    and (not self.graph_only or is_graph_kernel(
                        str(attrs.get("global_symbol", gv.name_hint))))):
                mod.update_func(gv, func.with_body(_first_statement(func.body)).with_attr(
                    "tirx.kernel_launch_params",
                    _launch_params(attrs["tirx.kernel_launch_params"])))
        return mod


__all__ = ["LaunchDependentsEarly", "PDL_TAG", "GRAPH_SUFFIX", "is_graph_kernel", "supports"]
