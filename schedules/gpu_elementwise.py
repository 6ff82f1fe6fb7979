"""Injective GPU kernels with a vector of elements a thread (the prefill's SiLU product, ...).

DLight's ``Fallback`` gives every output element its own thread: a 2-byte load per operand for
fp16, 1,024 threads a workgroup. In Llama-1B's 512-token prefill on the H200 the SiLU product
takes 13.4 us a layer for 24 MB (1.8 TB/s; ``results/issue17_profile_llama1b_s14.json``). This
rule takes such a kernel when every block inlines into one spatial block whose innermost output
dim is a static multiple of the profile's vector width and every access moves one element along
its last dim per step of that dim, with no per-lane select: the dim is split into
``vector_bytes`` vectors (8 fp16: 16-byte loads and stores), the rest fused and bound to
``THREADS`` threads a workgroup. (The K/V append's rotate-half selects its partner per lane:
vectorized, TVM's CUDA codegen gathers or does not compile, so it stays with ``Fallback`` --
unless it is built over the halves of a row, ``fuse_kv_append.PAIRED_HALVES``, which
:class:`GPUKVAppendHalves` schedules in vectors.)

On in the CUDA profile (``GPUProfile.vector_elementwise``): in Llama-1B's 512-token prefill on
the H200 the SiLU product went 13.65 -> 5.40 us a layer (fp32 math, 4 lanes), the step's GPU
time 5.003 -> 4.767 ms with the deep GEMM change of the same run (``python -m tvm_lite.profile
--shapes llama-3.2-1b``; ``results/issue16_profile_llama1b_base_s15.json`` against
``..._deepws_vec_s15.json``). Off on Adreno, Mali and the generic GPU until timed on one.
Anything it does not take goes on to ``Fallback``.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

from .gpu_gemv import _int
from .profiles import GPUProfile, fit_to_target

THREADS = 256  # threads a workgroup
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}


def _uses(expr, var) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(tirx.Var, lambda v: found.append(v.same_as(var)))],
                            order="post")
    return any(found)


def _widest_bytes(block, ignore_index_casts: bool = False) -> int | None:
    """Bytes of the widest scalar the block loads, stores or casts to (None: one this rule does
    not size). The vector is cut to it: 16 bytes of the widest type a thread. (TVM's CUDA
    codegen has no 8-lane fp32 vector -- it emits ``make_ulonglong4`` with 8 floats, which nvcc
    rejects -- so an fp16 SiLU computed in fp32 takes 4 lanes, not 8.) ``ignore_index_casts``:
    a cast of an integer expression that loads nothing (the paired K/V append's sign, ``2 j -
    1``, the same in every lane) does not size the vector."""
    dtypes = {str(x.source.dtype) for r in (block.reads, block.writes) for x in r}

    def loads(expr) -> bool:
        found = []
        tvm_ffi.structural_walk(expr, [(tvm.ir.expr.TensorLoad, lambda _: found.append(1))],
                                order="post")
        return bool(found)

    def cast(node):
        dtypes.add(str(node.ty.dtype))
        if ignore_index_casts and "int" in str(node.value.ty.dtype) and not loads(node.value):
            return
        dtypes.add(str(node.value.ty.dtype))

    tvm_ffi.structural_walk(block.body, [(tirx.Cast, cast)], order="post")
    sizes = [_BYTES.get(d) for d in dtypes]
    return None if None in sizes else max(sizes)


def _contiguous(block, var) -> bool:
    """Whether every access of ``block`` moves one element along its last dim per step of
    ``var`` (``var``, ``var + c`` or ``var - c`` there, ``var`` nowhere else), with no
    ``if_then_else`` or select: what TVM's CUDA codegen turns into plain vector loads. (A gather
    or a per-lane select would be vectorized element by element, or not compile.)"""
    ok = [True]

    def access(node):
        *lead, last = node.indices
        if any(_uses(i, var) for i in lead):
            ok[0] = False
        elif not (last.same_as(var) or (isinstance(last, (tirx.Add, tirx.Sub))
                                        and last.a.same_as(var) and not _uses(last.b, var))
                  or (isinstance(last, tirx.Add) and last.b.same_as(var)
                      and not _uses(last.a, var))):
            ok[0] = False

    def call(node):
        if str(getattr(node.op, "name", "")).endswith("if_then_else"):
            ok[0] = False

    def select(_node):
        ok[0] = False

    tvm_ffi.structural_walk(block.body, [(tvm.ir.expr.TensorLoad, access), (tirx.BufferStore, access),
                                         (tvm.ir.expr.Call, call), (tirx.Select, select)],
                            order="post")
    return ok[0]


def in_vectors(sch, loops, vec: int):
    """``sch`` with the innermost of ``loops`` in vectors of ``vec`` and the rest fused over
    :data:`THREADS` threads a workgroup."""
    io, ii = sch.split(loops[-1], factors=[None, vec])
    bx, tx = sch.split(sch.fuse(*loops[:-1], io), factors=[None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(ii)
    return sch


class GPUVectorElementwise(dl.ScheduleRule):
    """One injective block (after inlining): the innermost dim in vectors, the rest over threads."""

    def __init__(self, profile: GPUProfile):
        self.profile = profile

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or "gpu" not in target.keys:
            return None
        p = fit_to_target(self.profile, target)
        if not p.vector_elementwise:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1 or infos[0].dom_kind().strip("S") != "":
            return None  # not one spatial block
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if not loops or any(sch.get(lp).thread_binding is not None for lp in loops):
            return None
        size = _widest_bytes(sch.get(block))
        if size is None:
            return None
        vec = max(1, p.vector_bytes // size)
        inner = _int(sch.get(loops[-1]).extent)
        if vec < 2 or inner is None or inner % vec:
            return None
        last = infos[0].iters[-1]  # normal form: the block's last iter is the innermost loop
        if not sch.get(last.loop_rv).same_as(sch.get(loops[-1])) \
                or not _contiguous(sch.get(block), last.var):
            return None
        return in_vectors(sch, loops, vec)


class GPUKVAppendHalves(dl.ScheduleRule):
    """The K/V append whose loop runs over the two halves of a rotated row
    (``relax_passes.fuse_kv_append.PAIRED_HALVES``: loops row, head, half, column in the half;
    every access moves along the column, no per-lane select). :class:`GPUVectorElementwise`
    does not take it: DLight's normal form fuses head, half and column into one iterator (their
    indices are affine), across which the rotate-half partner is no longer contiguous. This rule
    schedules the kernel's own loops: the column in vectors of ``vector_bytes`` (8 fp16), the
    rest fused over :data:`THREADS` threads a workgroup."""

    def __init__(self, profile: GPUProfile):
        self.profile = profile

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or "gpu" not in target.keys:
            return None
        attrs = func.attrs or {}
        if str(attrs.get("tvm_lite.fused", "")) != "kv_append" or not attrs.get("tvm_lite.halves"):
            return None
        p = fit_to_target(self.profile, target)
        if not p.vector_elementwise:
            return None
        sch = s_tir.Schedule(func)
        block = sch.get_sblock("kv_append")
        loops = sch.get_loops(block)
        size = _widest_bytes(sch.get(block), ignore_index_casts=True)
        inner = _int(sch.get(loops[-1]).extent)
        vec = max(1, p.vector_bytes // size) if size else 1
        if len(loops) != 4 or vec < 2 or inner is None or inner % vec:
            return None
        return in_vectors(sch, loops, vec)


__all__ = ["GPUVectorElementwise", "GPUKVAppendHalves", "THREADS"]
