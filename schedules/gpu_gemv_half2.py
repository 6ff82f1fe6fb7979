"""Decode GEMV of 4-bit weights with packed half2 arithmetic (CUDA): about 2 ALU ops a weight.

The generic dequant GEMV (:mod:`.gpu_gemv`) computes every weight on its own scalar half --
shift, AND, OR, reinterpret, subtract ``c``, multiply ``s``, then the multiply-add -- and TVM's
CUDA codegen prints ``float16x2`` arithmetic lane by lane, so vectorizing that expression does
not give packed instructions. This kernel is written for two columns per 32-bit register
instead, and replaces :class:`.gpu_gemv.GPUDecodeGEMV`'s schedule when the profile asks for it
(``GPUProfile.gemv_half2_rows > 0``: the ``cuda`` profile) and the function fits (below).

The bit trick, on 32 bits
-------------------------
``codes: uint16[K/4, N]`` (:mod:`tvm_lite.quant.format`), so a 32-bit load of
``codes[j, n:n+2]`` holds the 4 codes of rows ``4j..4j+3`` for *two* columns, ``n`` in the low
half (little-endian). For code ``i`` of 4::

    h2 = ((w32 >> 4i) & 0x000F000F) | 0x64006400     (one LOP3 after the shift; none for i = 0)
       = half2(1024 + q[4j+i, n], 1024 + q[4j+i, n+1])

and the E0M4 weight is ``(h - c) * s`` with ``c = 1024 + z`` exact in fp16; int4 is the same
with ``c = 1024 + 8`` (``(q - 8) * s``), so both formats share the kernel.

Scale out of the sum: per group of ``G`` rows (one ``s``, ``c`` per column),
``sum_k x_k (h_k - c) s = s * sum_k x_k (h_k - c)``. ``h - c`` is exact (integers in
``[-15, 15]``), so per two weights the inner loop is one ``HSUB2`` and one ``HFMA2`` into a
half2 partial sum; every ``R = gemv_half2_rows`` rows the partial is widened to fp32 and
multiplied by ``s`` into the fp32 accumulator (``acc += s * partial``: a few ops per ``R`` rows).
Per two weights: 1 LOP3 + 3/4 shift + 1 HSUB2 + 1 HFMA2 (+ the broadcast of ``x_k``, shared by
all the thread's columns) -- ~2 ops a weight instead of ~6.

The packed operations are small ``__device__`` helpers in CUDA C (``HELPERS``) called through
``T.cuda.func_call`` with ``uint32`` carriers: a ``float16x2``-typed extern call would be printed
lane by lane again.

Loop nest (the same thread shape as :class:`.gpu_gemv.GPUDecodeGEMV`'s ``plan``)::

    blockIdx.x: N / (tn * vec) column tiles      blockIdx.y: ks splits of K
      threadIdx.y = tk along K, threadIdx.x = tn along N (vec columns = vec/2 pairs each)
        for each of the thread's kg groups:
          s, c of the group's vec columns        -> registers (16-byte loads)
          for each of the G/R partials:
            part[vec/2] = 0 (half2)
            for the R/4 words (unrolled):
              codes[word, n0:n0+vec]             -> vec/2 uint32 (one 16-byte load)
              x[4 rows]                          -> 2 uint32 (one 8-byte load)
              for the 4 codes, for the vec/2 pairs (unrolled):
                part[p] = hfma2(hsub2(h2(w[p] >> 4i), c2[p]), x2_i, part[p])
            acc[2p], acc[2p+1] += s * float(part[p])          (fp32)
        acc -> shared [tk, tn*vec], summed over tk by the workgroup's threads
            -> y = epilogue(sum), or, when ks > 1, partial[ks, N] in global memory; the
               workgroup that finishes its column tile last (a ticket: ``atomicInc`` on a
               zero-initialised ``__device__`` slot that wraps back to 0) sums the ks partials
               and applies the epilogue -- one kernel, where the generic schedule launches a
               second (Llama-1B's and Gemma-2B's down projections: one kernel a layer fewer)

Accuracy: the only new rounding is the fp16 partial (``R`` products, each exact up to one
rounding of ``(h - c) * x``). The partial is unscaled, up to ``15 * R * max|x|``: it cannot
overflow fp16 while ``max|x| <= 65504 / (15 R)`` (136 at ``R = 32``, 273 at ``R = 16``); typical
partials are far smaller (random signs). A numpy emulation of this arithmetic (fp16 partials
rounded once per HFMA2, fp32 scale and sum) against the format's fp16 weights in fp64, random
codes/zeros, ``s`` in [0.01, 0.03], ``x ~ N(0, 1..4)`` with 8 outliers of 40x: RMS error 6-8e-4
and max error <= 1.0e-3 of ``max|y|`` for K = 2048 and 16384 (R = 16: 6e-4), the same order as
rounding ``y`` to fp16 (the generic fp16 kernel accumulates all of K in fp16). ``emulate=True``
(:func:`kernel_source`) runs this kernel's own TIR on the CPU; ``tests/test_gpu_schedules.py``
checks it against numpy (< 5e-3 of ``max|y|``).

What the kernel takes, and what falls back to the generic schedule
------------------------------------------------------------------
* a decode dequant matmul (``dequantize`` + ``matmul`` blocks, E0M4 or int4, ``M == 1``) with
  **fp16 activations** ``x``; fp32 activations (today's fp32 exports) keep the generic
  schedule, whose fp32 accumulation they were written for;
* an **injective epilogue** (a residual add, SiLU * up, a cast ...) fused after the matmul: it
  is rebuilt on the final sum (the blocks inlined into the last one, whose expression is
  evaluated per column, the matmul value substituted), so it stays in the kernel;
* **producers** before the matmul (e.g. AWQ's input scale fused in): the generic schedule;
* ``N`` even with an even vector width, ``K`` a multiple of the group, ``G`` a multiple of ``R``
  (or ``R`` shrinks to ``G``); anything else: the generic schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import Call, TensorLoad
from tvm.script import from_source
from tvm.script import tirx as T

from ..convention import GATE_BLOCK, NORM_ROW_STAT_BLOCK
from .cuda_mma import HELPERS as _MMA_HELPERS
from .gpu_gemv import CODES_PER_WORD, PACKED_KERNELS, MatchError, _int, match_gemv

E0M4_ZERO_NONE = 0x64086408  # half2(1032, 1032): int4's zero (8) under the 1024 exponent

# The packed-half2 helpers, one CUDA function each (the codegen emits each source once per
# name). Carriers are uint32: two fp16 lanes, the low lane = the even column.
HELPERS = {
    "tvm_lite_dq_hfma2": r"""
__forceinline__ __device__ unsigned tvm_lite_dq_hfma2(unsigned w, unsigned c2, unsigned x2,
                                                      unsigned acc) {
  // h2 = (w & 0x000F000F) | 0x64006400 = half2(1024 + q_lo, 1024 + q_hi): one LOP3
  unsigned h;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(h) : "r"(w), "r"(0x000F000Fu), "r"(0x64006400u));
  // acc2 += (h2 - c2) * x2: HSUB2 (exact) + HFMA2
  __half2 d = __hsub2(*reinterpret_cast<__half2*>(&h), *reinterpret_cast<__half2*>(&c2));
  __half2 r = __hfma2(d, *reinterpret_cast<__half2*>(&x2), *reinterpret_cast<__half2*>(&acc));
  return *reinterpret_cast<unsigned*>(&r);
}
""",
    "tvm_lite_half2_bcast": r"""
__forceinline__ __device__ unsigned tvm_lite_half2_bcast(unsigned v, unsigned sel) {
  return __byte_perm(v, 0u, sel);  // sel 0x1010: the low half twice, 0x3232: the high half
}
""",
    "tvm_lite_warp_sum": r"""
__forceinline__ __device__ float tvm_lite_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
""",
    # a 16-byte load issued before the prologue's barriers: ptxas sinks plain (and .nc) loads of
    # read-only data past them to their first use, one or two in flight a warp; a strong
    # (relaxed, GPU-scope) load is not moved across a barrier
    "tvm_lite_ldg_v4_early": r"""
__forceinline__ __device__ uint4 tvm_lite_ldg_v4_early(const void* p) {
  uint4 r;
#if __CUDA_ARCH__ >= 700
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
#else
  r = *reinterpret_cast<const uint4*>(p);
#endif
  return r;
}
""",
    "tvm_lite_half2_lo": r"""
__forceinline__ __device__ float tvm_lite_half2_lo(unsigned v) {
  return __low2float(*reinterpret_cast<__half2*>(&v));
}
""",
    "tvm_lite_half2_hi": r"""
__forceinline__ __device__ float tvm_lite_half2_hi(unsigned v) {
  return __high2float(*reinterpret_cast<__half2*>(&v));
}
""",
}


# Split-K in one kernel: every workgroup of a column tile writes its fp32 partials, then takes a
# ticket; the one that takes the last ticket sums the partials and applies the epilogue. The
# tickets are a zero-initialised __device__ array of the module (one slot per column tile, shared
# by all kernels: kernels of one stream run one after another) that ``atomicInc`` wraps back to 0
# at the last ticket, so every launch finds its slots at 0 and leaves them so. (Each loaded
# library has its own array: an Engine loads its own, so two engines never share slots; one
# loaded library must not run these kernels on two streams at once.)
SPLIT_TICKETS = 4096
HELPERS["tvm_lite_split_last"] = r"""
__device__ unsigned tvm_lite_split_tickets[%d];
__forceinline__ __device__ int tvm_lite_split_last(unsigned slot, unsigned splits) {
  // every thread of the workgroup calls this after writing its partials; one thread fences
  // (the barrier orders the others' stores before its fence: fences are cumulative) instead of
  // each thread waiting on a sequentially consistent __threadfence()
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    asm volatile("fence.acq_rel.gpu;" ::: "memory");  // release: the workgroup's partials
    last = atomicInc(&tvm_lite_split_tickets[slot], splits - 1) == splits - 1;
    asm volatile("fence.acq_rel.gpu;" ::: "memory");  // acquire: the other workgroups' partials
  }
  __syncthreads();
  return last;
}
""" % SPLIT_TICKETS
HELPERS["tvm_lite_ldcg_f32"] = r"""
__forceinline__ __device__ float tvm_lite_ldcg_f32(const float* p) {
  return __ldcg(p);  // from L2: another SM's partial (this SM's L1 may hold an older line)
}
"""


HELPERS["tvm_lite_pack_half2"] = _MMA_HELPERS["tvm_lite_pack_half2"]  # the same source: one copy


@dataclass
class Half2Plan:
    """What the template needs: the matmul's roles and sizes, and the thread shape."""

    fmt: str
    k: int
    n: int
    group: int
    rows: int  # R: rows per fp16 partial
    vec: int
    tn: int
    tk: int
    ks: int
    kg: int
    out_dtype: str  # dtype the matmul value has before the epilogue
    roles: dict  # "x" (no prologue), "codes", "scale", "zero", "out" -> param index
    prologue: bool = False  # x is computed by the kernel (staged in shared memory)
    row_stat: bool = False  # ... from a row statistic (a norm's sum of squares) it reduces first


def _loads(expr) -> list:
    found = []

    def visit(value, visitor):
        found.append(value)
        visitor.default_visit(value)

    tvm_ffi.structural_visit(expr, [(TensorLoad, visit)])
    return found


def _rewrite(root, node_type, fn):
    """``root`` with every ``node_type`` node ``v`` replaced by ``fn(v)`` (children first
    left alone where ``fn`` returns a value; ``None`` recurses into ``v``)."""
    def mutate(value, mutator):
        new = fn(value)
        return mutator.default_mutate(value) if new is None else new

    return tvm_ffi.structural_mutate(root, [(node_type, mutate)])


def dequant_roles(sch, dequant):
    """``(fmt, codes, scale, zero_or_None)`` buffers from the dequantize block's expression:
    ``((h - zero) * scale)`` for E0M4, ``(float(q) - 8) * scale`` for int4 (see
    :func:`tvm_lite.quant.kernels.dequant_expr`), possibly under a cast."""
    value = sch.get(dequant).body.value
    while isinstance(value, tirx.Cast):
        value = value.value
    if not isinstance(value, tirx.Mul) or not isinstance(value.b, TensorLoad) \
            or not isinstance(value.a, tirx.Sub):
        raise MatchError("dequantize block is not (h - c) * s")
    scale = value.b.source
    sub = value.a
    codes = [ld.source for ld in _loads(sub.a) if str(ld.source.dtype) == "uint16"]
    if len(codes) != 1:
        raise MatchError("dequantize block reads no single uint16 code buffer")
    if isinstance(sub.b, TensorLoad):
        return "e0m4", codes[0], scale, sub.b.source
    if isinstance(sub.b, tirx.FloatImm) and float(sub.b.value) == 8.0:
        return "int4", codes[0], scale, None
    raise MatchError("unknown zero in the dequantize block")


def param_index(func, buf) -> int:
    for i, prm in enumerate(func.params):
        if prm.same_as(buf):
            return i
    raise MatchError(f"buffer '{buf.name}' is not a parameter")


def output_role(func, sch, epilogues: list, out_buf) -> tuple:
    """(the index of the parameter a kernel writes, the epilogue block it ends with or None): the
    elementwise epilogue blocks after the matmul are inlined into the last one, whose output is
    the kernel's; without epilogues, the matmul's own output."""
    if not epilogues:
        return param_index(func, out_buf), None
    for blk in epilogues[:-1]:
        sch.compute_inline(blk)
    final = epilogues[-1]
    return param_index(func, sch.get(final).writes[0].source), final


SHARED_BYTES = 48 * 1024  # what a CUDA workgroup may use without opting in


def _store_at_iters(block) -> tuple:
    """``(k, others)``: the iterator a producer block stores at along the row's last axis and
    its other iterators, checking that its one store is elementwise (each index an iterator or
    0, the last one an iterator); raises MatchError otherwise."""
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        raise MatchError(f"producer block '{block.name_hint}' is not a single store")
    iters = [iv.var for iv in block.iter_vars]
    last = store.indices[-1] if len(store.indices) else None
    k = next((v for v in iters if last is not None and last.same_as(v)), None)
    if k is None or not all(_int(i) == 0 or any(i.same_as(v) for v in iters)
                            for i in store.indices):
        raise MatchError(f"producer block '{block.name_hint}' does not store at its iterators")
    return k, [v for v in iters if not v.same_as(k)]


def match_prologue(func, sch, producers: list, x) -> dict:
    """The producers of ``x`` as expressions the packed kernel evaluates while staging ``x``:
    ``{"value": (expr, k_var, other_iters), "row_stat": (term, k_var, other_iters, buf) or
    None}`` -- ``x[.., k] = value`` and, for a norm, ``stat = sum_k term`` read by ``value``.
    The producers before the one that writes ``x`` are inlined into it; only a norm's row
    statistic (:data:`NORM_ROW_STAT_BLOCK`) may reduce."""
    stats = [b for b in producers if sch.get(b).name_hint == NORM_ROW_STAT_BLOCK]
    rest = [b for b in producers if b not in stats]
    direct = [b for b in rest if sch.get(b).writes[0].source.same_as(x)]
    if len(stats) > 1 or len(direct) != 1:
        raise MatchError("prologue is not one producer of x (and a row statistic)")
    for blk in rest:
        if blk is not direct[0]:
            sch.compute_inline(blk)
    block = sch.get(direct[0])
    k, others = _store_at_iters(block)
    out = {"value": (block.body.value, k, others), "row_stat": None}
    if stats:
        stat = sch.get(stats[0])
        store = stat.body
        red = [iv.var for iv in stat.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        other = [iv.var for iv in stat.iter_vars if iv.iter_type != tirx.IterVar.CommReduce]
        buf = store.buffer
        value = store.value
        if len(red) != 1 or not isinstance(value, tirx.Add) or not (
                isinstance(value.a, TensorLoad) and value.a.source.same_as(buf)):
            raise MatchError("row statistic is not a sum")
        out["row_stat"] = (value.b, red[0], other, buf)
    params = list(func.params)
    for expr in [out["value"][0]] + ([out["row_stat"][0]] if stats else []):
        for ld in _loads(expr):
            if not (any(ld.source.same_as(p) for p in params) or (
                    stats and ld.source.same_as(out["row_stat"][3]))):
                raise MatchError(f"prologue reads '{ld.source.name}', not a parameter")
    return out


def match_half2(func, sch, profile, plan: dict):
    """The :class:`Half2Plan` of ``func`` (raises :class:`MatchError` where the kernel does not
    apply; see the module docstring), the final epilogue block (or None) and the prologue
    (:func:`match_prologue`, or None)."""
    rows = profile.gemv_half2_rows
    if rows <= 0:
        raise MatchError("the profile has no half2 GEMV")
    if any(_int(d) is None for prm in func.params for d in prm.shape):
        raise MatchError("a parameter of symbolic shape (the template declares static ones)")
    main, dequant, producers, epilogues, n, k = match_gemv(sch)
    if dequant is None:
        raise MatchError("not a dequant matmul")
    fmt, codes, scale, zero = dequant_roles(sch, dequant)
    # x: the main block's other read
    dq_out = sch.get(dequant).writes[0].source
    out_buf = sch.get(main).writes[0].source
    xs = [r.source for r in sch.get(main).reads
          if not r.source.same_as(dq_out) and not r.source.same_as(out_buf)]
    if len(xs) != 1 or str(xs[0].dtype) != "float16":
        raise MatchError("needs fp16 activations")
    x = xs[0]
    prologue = match_prologue(func, sch, producers, x) if producers else None
    if any(_int(d) not in (1, None) for d in x.shape[:-1]) or _int(x.shape[-1]) != k:
        raise MatchError("x is not [1.., K]")
    ng = _int(scale.shape[0])
    if not ng or k % ng:
        raise MatchError("K is not a whole number of groups")
    group = k // ng
    if _int(codes.shape[0]) * CODES_PER_WORD != k or _int(codes.shape[1]) != n:
        raise MatchError("codes are not [K/4, N]")
    rows = min(rows, group)
    if group % rows or rows % CODES_PER_WORD:
        raise MatchError(f"group {group} is not a multiple of {rows} rows")
    vec = plan["vec"]
    if vec < 2 or vec % 2 or n % vec:
        raise MatchError("needs an even vector of columns")
    if plan["wpg"] * CODES_PER_WORD != group:
        raise MatchError("plan does not follow the groups")
    roles = {"codes": param_index(func, codes), "scale": param_index(func, scale)}
    if prologue is None:
        roles["x"] = param_index(func, x)
    elif k // plan["ks"] * 2 + plan["tk"] * plan["tn"] * (vec + 1) * 4 > SHARED_BYTES:
        raise MatchError("the staged row does not fit in shared memory: generic schedule")
    if zero is not None:
        roles["zero"] = param_index(func, zero)
    roles["out"], final = output_role(func, sch, epilogues, out_buf)
    return Half2Plan(fmt=fmt, k=k, n=n, group=group, rows=rows, vec=vec, tn=plan["tn"],
                     tk=plan["tk"], ks=plan["ks"], kg=plan["kg"],
                     out_dtype=str(out_buf.dtype), roles=roles, prologue=prologue is not None,
                     row_stat=bool(prologue and prologue["row_stat"] is not None)), final, prologue


def _shape(buf) -> str:
    dims = ", ".join(f"T.int64({int(d)})" if str(d.ty.dtype) == "int64" else str(int(d))
                     for d in buf.shape)
    return f"({dims},)"


def _emulated(name: str, args: list) -> str:
    """The helper ``name`` as plain TIR on uint32 carriers (``emulate=True``: the CPU runs the
    kernel's indexing and arithmetic; fp16 FMA as an fp32 multiply-add rounded to fp16)."""
    def lane(v, i):
        part = v if i == 0 else f"T.shift_right({v}, T.uint32(16))"
        return f'T.reinterpret("float16", T.Cast("uint16", T.bitwise_and({part}, T.uint32(0xFFFF))))'

    def pack(lo, hi):
        return (f'T.bitwise_or(T.Cast("uint32", T.reinterpret("uint16", {lo})), '
                f'T.shift_left(T.Cast("uint32", T.reinterpret("uint16", {hi})), T.uint32(16)))')

    if name == "tvm_lite_dq_hfma2":
        w, c2, x2, acc = args
        h = f"T.bitwise_or(T.bitwise_and({w}, T.uint32(0x000F000F)), T.uint32(0x64006400))"
        f32 = 'T.Cast("float32", {})'.format
        lanes = [f'T.Cast("float16", {f32(f"{lane(h, i)} - {lane(c2, i)}")} * {f32(lane(x2, i))} '
                 f'+ {f32(lane(acc, i))})' for i in (0, 1)]
        return pack(*lanes)
    if name == "tvm_lite_half2_bcast":
        v, sel = args  # sel: "0x1010" (low half) or "0x3232" (high half)
        half = f"T.if_then_else({sel} == T.uint32(0x1010), T.bitwise_and({v}, T.uint32(0xFFFF)), " \
               f"T.shift_right({v}, T.uint32(16)))"
        return f"({half} * T.uint32(0x10001))"
    if name == "tvm_lite_pack_half2":
        lo, hi = (f'T.Cast("uint32", T.reinterpret("uint16", T.Cast("float16", {v})))' for v in args)
        return f"T.bitwise_or({lo}, T.shift_left({hi}, T.uint32(16)))"
    if name in ("tvm_lite_half2_lo", "tvm_lite_half2_hi"):
        return f'T.Cast("float32", {lane(args[0], 0 if name.endswith("lo") else 1)})'
    raise ValueError(name)


def _staging(p: Half2Plan, kw: int, tk: int, tn: int, emulate: bool, call) -> str:
    """The prologue's TVMScript: the workgroup's threads reduce the row statistic over all of
    ``K`` (each its share, summed within each warp by shuffles, then every thread sums the
    warps' sums from shared memory: a serial sum of every thread's share cost each thread
    256 shared loads in the GEMVs of Llama-1B's shape), then compute
    the ``kw`` rows of ``x`` this split reads into ``xs32`` (two fp16 a word). The expressions
    are markers that :func:`attach_prologue` replaces: ``__tvm_lite_row_stat__(k)`` (the sum's
    term at ``k``) and ``__tvm_lite_prologue__(k, stat)`` (``x[k]``). ``emulate``: loop nests
    before the thread loops (indent 12) instead of inside them (indent 20)."""
    nth, k = tk * tn, p.k
    tid = "(ty * %d + tx)" % tn

    def term(i):
        return f'T.call_extern("float32", "__tvm_lite_row_stat__", {i})'

    def value(i):
        return f'T.call_extern("float32", "__tvm_lite_prologue__", {i}, ss[0])'

    pair = f"(it * {nth} + {tid})"
    row = f"(by * {kw} + {pair} * 2)"
    pack = call("tvm_lite_pack_half2", [value(row), value(f"{row} + 1")])
    scope = "" if emulate else ', scope="shared"'
    local = "" if emulate else ', scope="local"'
    lines = [f'xs32 = T.alloc_buffer(({kw // 2},), "uint32"{scope})',
             f'ss = T.alloc_buffer((1,), "float32"{local})', "ss[0] = T.float32(0)"]
    threads = [f"for ty in T.serial({tk}):", f"    for tx in T.serial({tn}):"] if emulate else []
    pad = "        " if emulate else ""
    if p.row_stat:  # (a thread's share in a register: no shared-memory hazard in its loop)
        acc = "ssp[%s]" % tid if emulate else "ss[0]"
        lines += [f'ssp = T.alloc_buffer(({nth},), "float32"{scope})', *threads,
                  f"{pad}{acc} = T.float32(0)",
                  f"{pad}for it in T.serial({-(-k // nth)}):",
                  f"{pad}    if it * {nth} + {tid} < {k}:",
                  f"{pad}        {acc} = {acc} + {term(f'it * {nth} + {tid}')}"]
        if emulate:
            lines += [f"for t in T.serial({nth}):", "    ss[0] = ss[0] + ssp[t]"]
        elif nth % 32 == 0:  # each warp's sum by shuffles, then one share a warp
            lines += [f"ss[0] = {call('tvm_lite_warp_sum', ['ss[0]'], 'float32')}",
                      f"if {tid} % 32 == 0:", f"    ssp[{tid} // 32] = ss[0]",
                      "ss[0] = T.float32(0)", 'T.tvm_storage_sync("shared")',
                      f"for t in T.unroll({nth // 32}):", "    ss[0] = ss[0] + ssp[t]"]
        else:
            lines += [f"ssp[{tid}] = ss[0]", "ss[0] = T.float32(0)", 'T.tvm_storage_sync("shared")',
                      f"for t in T.serial({nth}):", "    ss[0] = ss[0] + ssp[t]"]
    lines += [*threads, f"{pad}for it in T.serial({-(-(kw // 2) // nth)}):",
              f"{pad}    if {pair} < {kw // 2}:",
              f"{pad}        xs32[{pair}] = {pack}"]
    if not emulate:
        lines.append('T.tvm_storage_sync("shared")')
    indent = " " * (12 if emulate else 20)
    return "".join(f"{indent}{line}\n" for line in lines)


def kernel_source(func, p: Half2Plan, emulate: bool = False) -> str:
    """TVMScript of the packed kernel with ``func``'s signature. Its final store writes the
    matmul value through ``__tvm_lite_epilogue__(v)``, which :func:`attach_epilogue` replaces.
    Index expressions are spelled out where used (a named value in TVMScript would become a
    buffer). ``emulate``: the same kernel for the CPU -- helpers as plain TIR, thread loops
    serial, the workgroup's two phases (per-thread sums, then the sum over threadIdx.y) as two
    loop nests -- to check its indexing and numerics without a GPU."""
    names = [f"p{i}" for i in range(len(func.params))]
    decls = ", ".join(f"{nm}: T.Buffer({_shape(prm)}, \"{prm.dtype}\")"
                      for nm, prm in zip(names, func.params))
    codes, scale, out = (names[p.roles[r]] for r in ("codes", "scale", "out"))
    out_rank = len(func.params[p.roles["out"]].shape)
    K, N, G, R, VEC = p.k, p.n, p.group, p.rows, p.vec
    PAIRS, TN, TK, KS, KG = VEC // 2, p.tn, p.tk, p.ks, p.kg
    NT, WPG = N // (TN * VEC), G // CODES_PER_WORD
    cols = TN * VEC  # columns of one workgroup
    sums = -(-cols // (TK * TN))  # columns each thread sums over threadIdx.y at the end
    col2 = f"(bx * {cols // 2} + tx * {PAIRS})"  # the thread's first column pair
    grp_at = lambda g: f"((by * {TK} + ty) * {KG} + {g})"  # noqa: E731 (its group g: scale/zero row)
    word_at = lambda g, r: f"({grp_at(g)} * {WPG} + {r} * {R // 4} + j)"  # noqa: E731 (codes row)
    grp, word = grp_at("g"), word_at("g", "r")
    col = f"(cc * {TK * TN} + ty * {TN} + tx)"  # a column of the tile it sums at the end

    def call(name, args, ret="uint32"):
        if emulate:
            return _emulated(name, args)
        return (f'T.cuda.func_call("{name}", {", ".join(args)}, source_code=HELPERS["{name}"], '
                f'return_type="{ret}")')

    def out_at(n):
        idx = ", ".join(["0"] * (out_rank - 1) + [n])
        return f'{out}[{idx}] = T.call_extern("float32", "__tvm_lite_epilogue__", tot[0])'

    KW = K // KS  # the rows of x one workgroup reads
    if p.prologue:  # x staged by the workgroup: xs32 in shared memory, the split's rows only
        x_decl = ""
        load_x = f"xw[T.Ramp(0, 1, 2)] = xs32[T.Ramp(({word} - by * {KW // 4}) * 2, 1, 2)]"
    else:
        x_decl = f'x32 = T.decl_buffer(({K // 2},), "uint32", data={names[p.roles["x"]]}.data)'
        load_x = f"xw[T.Ramp(0, 1, 2)] = x32[T.Ramp({word} * 2, 1, 2)]"
    x2 = call("tvm_lite_half2_bcast", ["xw[i // 2]", "T.if_then_else(i % 2 == 0, T.uint32(0x1010), "
              "T.uint32(0x3232))"])
    fma = call("tvm_lite_dq_hfma2", [f"T.shift_right(w[j * {PAIRS} + c], T.uint32(4 * i))", "c2[c]", x2,
                                     "part[c]"])
    lo, hi = (lambda v: call("tvm_lite_half2_lo", [v], "float32")), \
        (lambda v: call("tvm_lite_half2_hi", [v], "float32"))
    if "zero" in p.roles:
        zero_decl = (f'zero32 = T.decl_buffer(({K // G}, {N // 2}), "uint32", '
                     f'data={names[p.roles["zero"]]}.data)')
        load_c2 = lambda g: f"c2[T.Ramp(0, 1, {PAIRS})] = zero32[{grp_at(g)}, T.Ramp({col2}, 1, {PAIRS})]"  # noqa: E731
    else:  # int4: c = 1024 + 8 in both lanes
        zero_decl = ""
        load_c2 = lambda g: f"c2[T.Ramp(0, 1, {PAIRS})] = T.Broadcast(T.uint32({E0M4_ZERO_NONE}), {PAIRS})"  # noqa: E731
    load_s2 = lambda g: f"s2[T.Ramp(0, 1, {PAIRS})] = scale32[{grp_at(g)}, T.Ramp({col2}, 1, {PAIRS})]"  # noqa: E731
    load_w = lambda g, r: (f"w[T.Ramp(j * {PAIRS}, 1, {PAIRS})] = "  # noqa: E731
                           f"codes32[{word_at(g, r)}, T.Ramp({col2}, 1, {PAIRS})]")
    # A thread of one group and one partial (Llama-1B's and Gemma-2B's GEMVs) issues all its
    # weight loads before the prologue: they are in flight while the workgroup stages x
    prefetch = p.prologue and not emulate and KG == 1 and G // R == 1 and PAIRS == 4
    early = lambda buf, row: call("tvm_lite_ldg_v4_early",  # noqa: E731
                                  [f"T.address_of({buf}[{row}, {col2}])"], "uint32x4")
    regs = (f'w = T.alloc_buffer(({PAIRS * R // 4},), "uint32", scope="local")\n'
            f'c2 = T.alloc_buffer(({PAIRS},), "uint32", scope="local")\n'
            f's2 = T.alloc_buffer(({PAIRS},), "uint32", scope="local")\n')
    pre = ""
    if prefetch:
        c2 = (f"c2[T.Ramp(0, 1, 4)] = {early('zero32', grp_at(0))}" if "zero" in p.roles
              else load_c2(0))
        pre = "".join(" " * 20 + ln + "\n" for ln in (
            *regs.splitlines(), f"s2[T.Ramp(0, 1, 4)] = {early('scale32', grp_at(0))}", c2,
            f"for j in T.unroll({R // 4}):",
            f"    w[T.Ramp(j * 4, 1, 4)] = {early('codes32', word_at(0, 0))}"))
        regs = ""
    stage = _staging(p, KW, TK, TN, emulate, call) if p.prologue else ""
    guard = f"{col} < {cols}" if sums * TK * TN != cols else "True"
    write = out_at(f"bx * {cols} + {col}") if KS == 1 else f"ws[by, bx * {cols} + {col}] = tot[0]"
    vl = min(4, VEC)  # float4 stores into shared memory
    if emulate:
        red = f'red = T.alloc_buffer(({TK}, {cols}), "float32")'
        threads = f"            for ty in T.serial({TK}):\n                for tx in T.serial({TN}):\n"
        head = (f"    for bx in T.serial({NT}):\n        for by in T.serial({KS}):\n"
                f"            {red}\n{stage}{threads}")
        stage = ""  # (before the thread loops, above)
        middle = threads + '                    tot = T.alloc_buffer((1,), "float32", scope="local")\n'
    else:
        head = (f'    for bx in T.thread_binding({NT}, thread="blockIdx.x"):\n'
                f'        for by in T.thread_binding({KS}, thread="blockIdx.y"):\n'
                f'            for ty in T.thread_binding({TK}, thread="threadIdx.y"):\n'
                f'                for tx in T.thread_binding({TN}, thread="threadIdx.x"):\n'
                f'                    red = T.alloc_buffer(({TK}, {cols}), "float32", scope="shared")\n')
        middle = '                    T.tvm_storage_sync("shared")\n'
    src = f'''
@T.prim_func(private=True)
def gemv_half2({decls}):
    T.func_attr({{"tirx.noalias": True}})
    {x_decl}
    codes32 = T.decl_buffer(({K // 4}, {N // 2}), "uint32", data={codes}.data)
    scale32 = T.decl_buffer(({K // G}, {N // 2}), "uint32", data={scale}.data)
    {zero_decl}
    ws = T.alloc_buffer(({KS}, {N}), "float32", scope="global")
{head}{pre}{stage}                    acc = T.alloc_buffer(({VEC},), "float32", scope="local")
                    part = T.alloc_buffer(({PAIRS},), "uint32", scope="local")
{"".join(" " * 20 + ln + chr(10) for ln in regs.splitlines())}                    xw = T.alloc_buffer((2,), "uint32", scope="local")
                    tot = T.alloc_buffer((1,), "float32", scope="local")
                    last = T.alloc_buffer((1,), "int32", scope="local")
                    for c in T.unroll({VEC}):
                        acc[c] = T.float32(0)
                    for g in T.serial({KG}):
                        {"T.evaluate(0)" if prefetch else load_s2("g")}
                        {"T.evaluate(0)" if prefetch else load_c2("g")}
                        for r in T.serial({G // R}):
                            for c in T.unroll({PAIRS}):
                                part[c] = T.uint32(0)
                            for j in T.unroll({R // 4}):
                                {"T.evaluate(0)" if prefetch else load_w("g", "r")}
                                {load_x}
                                for i in T.unroll(4):
                                    for c in T.unroll({PAIRS}):
                                        part[c] = {fma}
                            for c in T.unroll({PAIRS}):
                                acc[c * 2] = acc[c * 2] + {lo("part[c]")} * {lo("s2[c]")}
                                acc[c * 2 + 1] = acc[c * 2 + 1] + {hi("part[c]")} * {hi("s2[c]")}
                    for h in T.unroll({VEC // vl}):
                        red[ty, T.Ramp(tx * {VEC} + h * {vl}, 1, {vl})] = acc[T.Ramp(h * {vl}, 1, {vl})]
{middle}                    for cc in T.serial({sums}):
                        if {guard}:
                            tot[0] = T.float32(0)
                            for t in T.unroll({TK}):
                                tot[0] = tot[0] + red[t, {col}]
                            {write}
'''
    if KS > 1:  # the last workgroup of the column tile sums the partials, applies the epilogue
        if NT > SPLIT_TICKETS:
            raise MatchError(f"{NT} column tiles split over K: more than {SPLIT_TICKETS} tickets")
        at = f"bx * {cols} + {col}"
        if emulate:  # serial workgroups: the last split is the last to arrive
            src += threads.replace("            for", "            if by == %d:\n" % (KS - 1)
                                   + "                for", 1).replace(
                "                for tx", "                    for tx")
            src += '                        tot = T.alloc_buffer((1,), "float32", scope="local")\n'
            pad, part = " " * 24, f"ws[s, {at}]"
        else:
            src += (f'                    last[0] = {call("tvm_lite_split_last", ["T.uint32(bx)", f"T.uint32({KS})"], "int32")}\n'
                    f"                    if last[0] == 1:\n")
            pad, part = " " * 24, call("tvm_lite_ldcg_f32", [f"T.address_of(ws[s, {at}])"], "float32")
        src += f'''{pad}for cc in T.serial({sums}):
{pad}    if {guard}:
{pad}        tot[0] = T.float32(0)
{pad}        for s in T.serial({KS}):
{pad}            tot[0] = tot[0] + {part}
{pad}        {out_at(at)}
'''
    return src


def _same_index(a, b) -> bool:
    return a.same_as(b) or (_int(a) is not None and _int(a) == _int(b))


GATED = "__tvm_lite_gated__"  # the marker of a gated store: (gate accumulator, up accumulator)
# output columns (and rows) a gated epilogue's reads are checked at: both halves of two blocks
_GATED_COLS = (0, 1, GATE_BLOCK - 1, GATE_BLOCK, GATE_BLOCK + 1, 3 * GATE_BLOCK - 1)
_GATED_ROWS = (0, 5)


def _value_at(expr, env: dict) -> int | None:
    """``expr`` with its variables bound by ``env`` (name -> value; any other variable 4096),
    as an int, or None if it does not fold to one."""
    bound = _rewrite(expr, tirx.Var, lambda v: tirx.const(env.get(v.name, 4096), v.ty.dtype))
    return _int(tvm.sym.Analyzer().simplify(bound))


def gated_role(load, store_indices) -> str | None:
    """``"gate"`` or ``"up"`` if ``load`` (of the matmul's output, in an epilogue block that
    stores at ``store_indices``: 0 or an iterator each, the last two the row and the output
    column) reads the interleaved layout (``relax_passes/merge_shared_input_projections.py``):
    at output row ``r``, column ``j``, the matmul's row ``r`` and column ``(j // B) * 2B + j %
    B`` (gate) or that ``+ B`` (up), ``B = GATE_BLOCK``; else None. Checked at sample points
    (the expressions FuseTIR leaves are reshapes and slices of any form)."""
    role = None
    last = len(store_indices) - 1
    for r in _GATED_ROWS:
        for j in _GATED_COLS:
            env = {e.name: (j if p == last else r if p == last - 1 else 0)
                   for p, e in enumerate(store_indices) if isinstance(e, tirx.Var)}
            idx = [_value_at(e, env) for e in load.indices]
            if None in idx or idx[:-2] != [0] * (len(idx) - 2) or idx[-2] != r:
                return None
            base = (j // GATE_BLOCK) * 2 * GATE_BLOCK + j % GATE_BLOCK
            here = "gate" if idx[-1] == base else "up" if idx[-1] == base + GATE_BLOCK else None
            if here is None or role not in (None, here):
                return None
            role = here
    return role


def gated_epilogue(sch, final_block, matmul_buf) -> bool:
    """The final epilogue block computes its output from the matmul's output only, through one
    gate read and one up read of the interleaved layout (:func:`gated_role`): a gated MLP's
    activation (``relax_passes/fuse_gated_epilogue.py``)."""
    if final_block is None:
        return False
    block = sch.get(final_block)
    store = block.body
    if not isinstance(store, tirx.BufferStore) or len(store.indices) < 2:
        return False
    iters = [iv.var for iv in block.iter_vars]
    if not all(_int(i) == 0 or any(i.same_as(v) for v in iters) for i in store.indices) \
            or not all(isinstance(i, tirx.Var) for i in store.indices[-2:]):
        return False
    loads = _loads(store.value)
    if not loads or not all(ld.source.same_as(matmul_buf) for ld in loads):
        return False
    return {gated_role(ld, store.indices) for ld in loads} == {"gate", "up"}


def attach_epilogue(kernel, func, sch, out_dtype: str, final_block, matmul_buf):
    """Replace ``kernel``'s ``out[idx] = __tvm_lite_epilogue__(v)`` stores by the real output
    expression: ``v`` cast to the matmul's dtype ``out_dtype``, or the final epilogue block's
    value with the matmul's output read replaced by it and the block's iterators bound to
    ``idx`` (the block must be elementwise: its store and its matmul reads at its iterators).
    A gated store, ``buf[idx] = __tvm_lite_gated__(g, u)`` (:data:`GATED`; any buffer: a
    kernel may gather its outputs in registers first), takes the block's value with its gate
    read replaced by ``g`` and its up read by ``u`` (:func:`gated_epilogue`).
    ``kernel`` has ``func``'s signature (parameters in the same order)."""
    bufmap = list(zip(func.params, kernel.params))
    if final_block is not None:
        block = sch.get(final_block)
        store = block.body
        if not isinstance(store, tirx.BufferStore):
            raise MatchError("epilogue block is not a single store")
        iters = [iv.var for iv in block.iter_vars]
        for idx in store.indices:
            if _int(idx) != 0 and not any(idx.same_as(v) for v in iters):
                raise MatchError("epilogue store is not at its iterators")
        template = store.value
    else:
        template, iters = None, []

    def gated(stmt, v):
        """``stmt`` storing the template with its gate and up reads replaced by the marker's
        two accumulators (as the matmul's dtype: what the unfused GEMM would have stored)."""
        if template is None:
            raise MatchError("a gated store without an epilogue block")
        acc = {"gate": tirx.Cast(out_dtype, v.args[1]), "up": tirx.Cast(out_dtype, v.args[2])}

        def swap(e):
            role = gated_role(e, store.indices) if e.source.same_as(matmul_buf) else None
            if role is None:
                raise MatchError(f"gated epilogue reads '{e.source.name}' off the interleaved "
                                 "layout")
            return acc[role]

        value = _rewrite(template, TensorLoad, swap)
        used = []  # (list.append returns None: every variable is visited, nothing replaced)
        _rewrite(value, tirx.Var, used.append)
        if any(u.same_as(i) for u in used for i in iters):
            raise MatchError("gated epilogue depends on its iterators besides its two reads")
        out = stmt.buffer
        if str(value.ty.dtype) != str(out.dtype):
            value = tirx.Cast(str(out.dtype), value)
        return tirx.BufferStore(out, value, stmt.indices)

    def rewrite(stmt):
        if not isinstance(stmt, tirx.BufferStore):
            return None
        v = stmt.value
        while isinstance(v, tirx.Cast):  # the parser casts the float32 marker to y's dtype
            v = v.value
        if isinstance(v, Call) and v.op.name == "tirx.call_extern" and v.args[0].value == GATED:
            return gated(stmt, v)
        if not (isinstance(v, Call) and v.op.name == "tirx.call_extern"
                and v.args[0].value == "__tvm_lite_epilogue__"):
            return None
        value = tirx.Cast(out_dtype, v.args[1])
        if template is not None:
            if len(stmt.indices) != len(store.indices):
                raise MatchError("epilogue writes a buffer of another rank")
            vmap = {var: tirx.const(0, var.ty.dtype) for var in iters}
            for mine, theirs in zip(stmt.indices, store.indices):
                for var in iters:
                    if theirs.same_as(var):
                        vmap[var] = tirx.Cast(var.ty.dtype, mine)

            def swap(e):
                if e.source.same_as(matmul_buf):
                    if len(e.indices) != len(store.indices) or not all(
                            _same_index(a, b) for a, b in zip(e.indices, store.indices)):
                        raise MatchError("epilogue reads the matmul off its own element")
                    return value
                for old, new in bufmap:
                    if old.same_as(e.source):
                        return tirx.BufferLoad(new, list(e.indices))
                raise MatchError(f"epilogue reads '{e.source.name}', not a parameter")

            expr = _rewrite(template, TensorLoad, swap)
            value = _rewrite(expr, tirx.Var, lambda v: next(
                (new for old, new in vmap.items() if old.same_as(v)), None))
        out = stmt.buffer
        if str(value.ty.dtype) != str(out.dtype):
            value = tirx.Cast(str(out.dtype), value)
        return tirx.BufferStore(out, value, stmt.indices)

    body = _rewrite(kernel.body, tirx.BufferStore, rewrite)
    return kernel.with_body(body)


def attach_prologue(kernel, func, prologue: dict):
    """Replace ``kernel``'s prologue markers (:func:`_staging`) by the producers' expressions:
    ``__tvm_lite_row_stat__(k)`` by the row statistic's term and ``__tvm_lite_prologue__(k, s)``
    by ``x[k]`` (the statistic's buffer read as ``s``), at row ``k`` (their other iterators at
    0), reading ``kernel``'s parameters where they read ``func``'s."""
    bufmap = list(zip(func.params, kernel.params))
    stat_buf = prologue["row_stat"][3] if prologue["row_stat"] is not None else None

    def instantiate(expr, k_var, others, k, stat):
        def load(e):
            if stat_buf is not None and e.source.same_as(stat_buf):
                return stat
            for old, new in bufmap:
                if old.same_as(e.source):
                    return None if new.same_as(e.source) else tirx.BufferLoad(new, list(e.indices))
            raise MatchError(f"prologue reads '{e.source.name}', not a parameter")

        expr = _rewrite(expr, TensorLoad, load)
        vmap = {k_var: tirx.Cast(k_var.ty.dtype, k)}
        vmap.update({v: tirx.const(0, v.ty.dtype) for v in others})
        expr = _rewrite(expr, tirx.Var, lambda v: next(
            (new for old, new in vmap.items() if old.same_as(v)), None))
        return tirx.Cast("float32", expr)

    def marker(call):
        if not (isinstance(call, Call) and call.op.name == "tirx.call_extern"):
            return None
        name = call.args[0].value
        if name == "__tvm_lite_prologue__":
            expr, k_var, others = prologue["value"]
            return instantiate(expr, k_var, others, call.args[1], call.args[2])
        if name == "__tvm_lite_row_stat__":
            expr, k_var, others, _ = prologue["row_stat"]
            return instantiate(expr, k_var, others, call.args[1], None)
        return None

    return kernel.with_body(_rewrite(kernel.body, Call, marker))


def half2_kernel(func, target, profile, plan: dict, emulate: bool = False):
    """``(schedule, Half2Plan)``: the packed kernel for ``func`` as a
    :class:`tvm.s_tir.Schedule`, or raise :class:`MatchError` when it does not apply.
    ``emulate``: the CPU version (see :func:`kernel_source`), whatever the target."""
    if not emulate and target.kind.name != "cuda":
        raise MatchError("packed half2 helpers are CUDA C")
    sch = s_tir.Schedule(func)
    func = sch.mod["main"]
    p, final, prologue = match_half2(func, sch, profile, plan)
    kernel = from_source(kernel_source(func, p, emulate), extra_vars={"T": T, "HELPERS": HELPERS})
    if prologue is not None:
        kernel = attach_prologue(kernel, func, prologue)
    kernel = attach_epilogue(kernel, func, sch, p.out_dtype, final,
                             sch.get(match_gemv(sch)[0]).writes[0].source)
    attrs = {k: v for k, v in func.attrs.items()} if func.attrs is not None else {}
    kernel = kernel.with_attrs({**attrs, "tvm_lite.gemv": "gemv_half2"})  # what bench-kernels reports
    return s_tir.Schedule(kernel), p


PACKED_KERNELS.append(half2_kernel)

__all__ = ["half2_kernel", "match_half2", "match_prologue", "kernel_source", "Half2Plan", "HELPERS",
           "attach_epilogue", "attach_prologue",
           "dequant_roles", "param_index"]
