"""Decode GEMV on GPUs: ``y[1, N] = x[1, K] @ W[K, N]`` for fp16 weights and 4-bit dequant weights.

In decode the token dim is bound to 1 (``split_prefill_decode``), so the rule keys on ``M == 1``
statically. Such a kernel is memory bound: each weight byte is read once, so the goal is the
device's copy bandwidth. The weights are stored ``[K, N]`` (``N`` contiguous: torch's layout, and
the 4-bit format's ``codes: uint16[K/4, N]``, see :mod:`tvm_lite.quant.format`), which makes the
reduction run along memory's slow axis. The schedule::

    workgroup (blockIdx.x: N / (tn * vec) column tiles, blockIdx.y: ks splits of K)
      thread (threadIdx.x = tn along N, threadIdx.y = tk along K)
        for each of the thread's kg quantization groups (G rows = G/4 packed words):
          scale/zero[group, n0:n0+vec], x[G rows]   -> registers (once per group)
          for the G/4 words (unrolled):
            codes[word, n0:n0+vec]                  -> registers (one 16-byte load on CUDA)
            for the 4 codes of the word (unrolled: constant shifts), for vec columns:
              acc[c] += x[k] * ((as_half((w >> 4i) & 0xF | 0x6400) - zero) * scale)
        acc -> cross-thread sum over threadIdx.y (shuffles on CUDA, local memory on Adreno/Mali)
            -> y, or, when K is split over workgroups, partial[ks, N], which a second small kernel
               sums; the epilogue (residual add, SiLU gate ...) runs in the kernel that writes y

* Loads are coalesced: the ``tn`` threads of a wave read ``tn * vec`` consecutive words of one
  packed row; ``vec`` comes from the profile's vector width (at most 16 bytes a load).
* Dequantization is the two bitwise ops (AND, OR) in registers, per the format.
* Enough workgroups: when ``N / (tn * vec)`` column tiles would leave compute units idle (a 2B
  model's k/v projection has one), ``K`` is split over ``ks`` workgroups, the smallest split
  that reaches ``profile.gemv_min_workgroups``.
* fp16 (and fp32) weights take the same schedule without the dequant.

Measured on an H200 (``tvm-lite bench-kernels``): fp16 weights stream at the copy bandwidth
(the 1 GB Gemma lm_head: 104% of a device-to-device copy, counted read+write); E0M4 through this
per-weight schedule reaches 55% there and ~34% on the 21 MB MLP matrices: the per-weight
arithmetic (shift, AND/OR, subtract, two multiplies, on scalar halves) and not memory bounds it.
A 2-lane vectorization of that expression (``profile.gemv_lanes = 2``) does not help (TVM's CUDA
codegen prints it lane by lane). So where the profile sets ``gemv_half2_rows`` (``cuda``) a 4-bit
matmul with fp16 activations gets the packed kernel of :mod:`.gpu_gemv_half2` instead (two
columns per 32-bit word, one HSUB2 + one HFMA2 per two weights, the scale applied per fp16
partial of ``gemv_half2_rows`` rows; same thread shape, from :meth:`GPUDecodeGEMV.plan`);
everything else -- fp16/fp32 weights, fp32 activations, producers fused before the matmul,
OpenCL -- takes the schedule below.

The rule takes a function whose single reduction block (``matmul`` or Relax's ``T_matmul``)
multiplies a vector by a ``[K, N]`` weight -- read directly, or produced by a ``dequantize``
block -- plus injective producers (inlined) and an injective epilogue. Anything else is left to
the next rule.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

from ..convention import NORM_ROW_STAT_BLOCK  # a norm's row statistic (fuse_gemv_prologue.py)
from .profiles import GPUProfile, fit_to_target

DEQUANT_BLOCK = "dequantize"
CODES_PER_WORD = 4
MAX_VECTOR_BITS = 128  # widest vector load: 16 bytes (uint4 / half8 / float4)
MIN_THREADS_N = 4  # threads of a GEMV workgroup along N: 4 x 16-byte loads fill two 32-byte sectors
# A GEMV that computes its input row in a prologue (the decode step's RMSNorm before q/k/v and
# gate/up) stages that row once per workgroup. Where the one-pass plan already has enough
# workgroups, PROLOGUE_KS > 1 takes instead PROLOGUE_TN threads along N and K in PROLOGUE_KS
# splits: each workgroup stages a K/PROLOGUE_KS slice of the row, not all of it, for wider
# column tiles -- on profiles with ``gemv_prologue_split`` (CUDA; the phones' are untimed).
# Per kernel on an H100 (thirty-second session, bench.gemv_plans): Gemma-2B's
# gate/up with its norm 23.40 us -> 20.50 (16 x 8), Llama-1B's 12.39 -> 12.11 (that one has
# too few tiles to be taken); without the norm the same plans gain nothing (17.59 / 17.63).
# Whole step (thirty-third session, results/issue17_gemma_whole_step_switches_h100_s33.json):
# Gemma-2B's decode step as CUDA graphs 1.117 -> 1.086 ms; the prefill unchanged.
PROLOGUE_TN = 16
PROLOGUE_KS = 8  # 1: off


def _int(e) -> int | None:
    return int(e) if isinstance(e, tirx.IntImm) else None


def _largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """Largest d <= limit with n % d == 0 and d % multiple_of == 0 (at least 1)."""
    for d in range(min(limit, n), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 1


def _power_of_two_divisor(n: int, limit: int) -> int:
    d = 1
    while d * 2 <= limit and n % (d * 2) == 0:
        d *= 2
    return d


def reduce_loops(sch: s_tir.Schedule, block) -> list:
    """The loops of ``block`` that bind its reduction iterators."""
    stmt = sch.get(block)
    realize = sch.get(sch.get_loops(block)[-1]).body
    while not isinstance(realize, s_tir.SBlockRealize):
        realize = realize.body
    loops = sch.get_loops(block)
    found = []
    for iv, value in zip(stmt.iter_vars, realize.iter_values):
        if iv.iter_type != tirx.IterVar.CommReduce:
            continue
        used = tirx.analysis.undefined_vars(value)
        for lp in loops:
            var = sch.get(lp).loop_var
            if any(u.same_as(var) for u in used) and not any(sch.get(lp).same_as(sch.get(f)) for f in found):
                found.append(lp)
    return found


def check_all_bound(sch: s_tir.Schedule) -> None:
    """Raise :class:`MatchError` unless every block runs under a GPU thread binding (a block
    left at the root would not compile for a GPU, or would run as a serial kernel)."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    for blk in blocks:
        loops = sch.get_loops(blk)
        if not any(sch.get(lp).thread_binding is not None for lp in loops):
            raise MatchError(f"block '{sch.get(blk).name_hint}' is not bound to GPU threads")


def _writes_intermediate(sch: s_tir.Schedule, block) -> bool:
    """Whether ``block`` writes a buffer the function allocates (not one of its outputs)."""
    buf = sch.get(block).writes[0].source
    root = sch.get(sch.get_sblock("root"))
    return any(b.same_as(buf) for b in root.alloc_buffers)


def _has_root(sch) -> bool:
    body = sch.mod["main"].body
    return isinstance(body, s_tir.stmt.SBlockRealize) and body.block.name_hint == "root"


class MatchError(Exception):
    """The function is not a decode GEMV this rule schedules."""


# packed 4-bit kernels tried before the generic schedule: ``kernel(func, target, profile, plan)
# -> (schedule, plan)``, raising MatchError where they do not apply. gpu_gemv_half2 (which builds
# on this module's matching) registers its kernel here when ``tvm_lite.schedules`` is imported.
PACKED_KERNELS: list = []


def match_matmul(sch: s_tir.Schedule, decode: bool):
    """The blocks of ``x[..., M, K] @ W[K, N]``:
    ``(main, dequant_or_None, producers, epilogues, m, n, k)``.

    ``decode=True`` asks for ``M == 1`` (every leading dim statically 1), ``decode=False`` for
    anything else. Raises :class:`MatchError` with the reason when the function does not fit."""
    infos = normalize_prim_func(sch)
    if infos is None:
        raise MatchError("not a normalizable block function")
    reductions = [b for b in infos if b.is_reduction()]
    row_stats = [b for b in reductions if sch.get(b.block_rv).name_hint == NORM_ROW_STAT_BLOCK]
    if row_stats and not decode:
        raise MatchError("a norm prologue (its row statistic) is decode-only")
    reductions = [b for b in reductions if b not in row_stats]
    if len(reductions) != 1:
        raise MatchError(f"{len(reductions)} reduction blocks")
    main = reductions[0].block_rv
    stmt = sch.get(main)
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(reduce) != 1 or not spatial:
        raise MatchError("needs spatial dims and one reduction dim")
    m_is_one = all(_int(iv.dom.extent) == 1 for iv in spatial[:-1])
    if decode and not m_is_one:
        raise MatchError("leading dims are not statically 1 (not a decode GEMV)")
    if not decode and m_is_one:
        raise MatchError("M == 1: a decode GEMV, not a GEMM")
    if not decode and len(spatial) < 2:
        raise MatchError("needs [M, N] outputs")
    n, k = _int(spatial[-1].dom.extent), _int(reduce[0].dom.extent)
    if n is None or k is None:
        raise MatchError("N and K must be static")
    kv, nv = reduce[0].var, spatial[-1].var
    # the weight: a [K, N] read (a buffer or the dequantize block's output), N the fast axis
    dequant = None
    weight_ok = False
    for region in stmt.reads:
        idx = [r.min for r in region.region]
        if len(idx) == 2 and idx[0].same_as(kv) and idx[1].same_as(nv):
            weight_ok = True
    if not weight_ok:
        raise MatchError("no [k, n] weight read (W[N, K] layouts go to the stock GEMV)")
    producers, epilogues = [], []
    feeds_main = _feeders(sch, main)
    for info in infos:
        if info.block_rv.same_as(main) or sch.get(info.block_rv).same_as(stmt):
            continue
        name = sch.get(info.block_rv).name_hint
        if name == DEQUANT_BLOCK:
            dequant = info.block_rv
        elif any(info is r for r in row_stats):
            producers.append(info.block_rv)
        elif not info.is_injective():
            raise MatchError(f"block '{name}' is neither injective nor the matmul")
        elif name in feeds_main:  # (through other producers too: slices before an activation)
            producers.append(info.block_rv)
        else:
            epilogues.append(info.block_rv)
    m = spatial[-2].dom.extent if len(spatial) > 1 else 1
    return main, dequant, producers, epilogues, m, n, k


def _feeders(sch: s_tir.Schedule, block) -> set:
    """Names of the blocks ``block`` reads from, directly or through other blocks."""
    seen, todo = set(), [block]
    while todo:
        for p in sch.get_producers(todo.pop()):
            name = sch.get(p).name_hint
            if name not in seen:
                seen.add(name)
                todo.append(p)
    return seen


def match_gemv(sch: s_tir.Schedule):
    """:func:`match_matmul` for decode: ``(main, dequant, producers, epilogues, n, k)``."""
    main, dequant, producers, epilogues, _, n, k = match_matmul(sch, decode=True)
    return main, dequant, producers, epilogues, n, k


def _weight_bytes(sch: s_tir.Schedule, main, dequant) -> int:
    """Bytes of one weight as loaded: a packed uint16 word, or the dtype of a plain weight."""
    if dequant is not None:
        return 2
    for region in sch.get(main).reads:
        if len(region.region) == 2:
            return max(1, tvm.DataType(str(region.source.ty.dtype)).bits // 8)
    return 2


def _group_size(sch: s_tir.Schedule, dequant, k: int) -> int:
    """The quantization group of a dequant kernel (``K / scale rows``), 32 if there is none."""
    if dequant is not None:
        for region in sch.get(dequant).reads:
            shape = getattr(region.source.ty, "shape", None)
            if region.source.name == "scale" and shape is not None and len(shape) == 2:
                rows = _int(shape[0])
                if rows and k % rows == 0:
                    return k // rows
    return 32


class GPUDecodeGEMV(dl.ScheduleRule):
    """Decode GEMV (``M == 1``) of fp16 or 4-bit dequant weights, shaped by a GPU profile."""

    def __init__(self, profile: GPUProfile, forced: tuple[int, int] | None = None):
        self.profile = profile
        self.vector_lanes = profile.gemv_lanes
        self.forced = forced  # (tn, ks) forced on every GEMV's plan (sweeps: bench.gemv_plans)

    def plan(self, n: int, k: int, word_bytes: int = 2, target=None, group_size: int = 32,
             bytes_read: int | None = None, prologue: bool = False) -> dict:
        """Thread/split shape for an ``N x K`` GEMV.

        ``K`` is cut into ``ks`` workgroup splits x ``tk`` threads x ``kg`` groups x ``wpg``
        packed words (one quantization group: its scale/zero is loaded once) x 4 codes.

        One kernel where a second does not pay: the workgroup keeps its thread count but gives
        fewer threads to ``N`` (down to :data:`MIN_THREADS_N`) and more to ``K``, so narrower
        column tiles make more workgroups. ``K`` is split over workgroups (partial sums, then a
        second kernel that adds them) only when the time the one-pass grid loses to too few
        workgroups, ``bytes / min(copy, tiles x workgroup GB/s)``, exceeds the profile's cost of
        one more kernel. ``bytes_read``: the weight bytes (default: packed 4-bit words).
        ``prologue``: the kernel computes its input row (:data:`PROLOGUE_KS`)."""
        p = fit_to_target(self.profile, target) if target is not None else self.profile
        vec = _power_of_two_divisor(n, max(1, p.vector_bytes // word_bytes))
        if k % CODES_PER_WORD:
            raise MatchError(f"K={k} is not a multiple of {CODES_PER_WORD}")
        words = k // CODES_PER_WORD
        wpg = group_size // CODES_PER_WORD if group_size % CODES_PER_WORD == 0 else 1
        if words % wpg:
            wpg = 1
        groups = words // wpg
        threads = min(p.max_threads, p.gemv_threads_n * p.gemv_threads_k)
        nbytes = bytes_read if bytes_read is not None else words * n * word_bytes

        def seconds(workgroups: int, kernels: int) -> float:
            gbps = min(p.copy_gbps, workgroups * p.gemv_workgroup_gbps)
            return nbytes / (gbps * 1e3) + (kernels - 1) * p.launch_us  # in µs

        def shape(tn: int, ks: int) -> dict:
            tk = _largest_divisor(groups // ks, max(1, threads // tn))
            return {"vec": vec, "tn": tn, "tk": tk, "ks": ks, "kg": groups // (tk * ks), "wpg": wpg}

        if self.forced is not None:
            tn, ks = self.forced
            if (n // vec) % tn or groups % ks:
                raise MatchError(f"forced tn={tn}, ks={ks} do not divide N={n} / K={k}")
            return shape(tn, ks)
        tn = _power_of_two_divisor(n // vec, p.gemv_threads_n)
        while n // (vec * tn) < p.gemv_min_workgroups and tn > MIN_THREADS_N and tn % 2 == 0:
            tn //= 2  # narrower tiles, more of them
        tiles = n // (vec * tn)
        best = shape(tn, 1)
        if tiles >= p.gemv_min_workgroups:
            if (prologue and p.gemv_prologue_split and PROLOGUE_KS > 1
                    and (n // vec) % PROLOGUE_TN == 0 and groups % PROLOGUE_KS == 0):
                return shape(PROLOGUE_TN, PROLOGUE_KS)
            return best
        # split K over workgroups (each thread keeps at least one group) with the full-width
        # tile; the smallest split that fills the device (measured on the H200: a 2048 x 256
        # GEMV takes 6 us split 32 ways, 22 us in one workgroup of the old shape)
        wide = _power_of_two_divisor(n // vec, p.gemv_threads_n)
        wide_tiles = n // (vec * wide)
        per_thread = groups // _largest_divisor(groups, max(1, threads // wide))
        ks = 1
        for d in range(2, min(per_thread, 32) + 1):
            if per_thread % d == 0:
                ks = d
                if wide_tiles * d >= p.gemv_min_workgroups:
                    break
        if ks > 1 and seconds(wide_tiles * ks, 2) < seconds(tiles, 1):
            return shape(wide, ks)
        return best

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or "gpu" not in target.keys:
            return None
        sch = s_tir.Schedule(func)
        try:
            main, dequant, producers, epilogues, n, k = match_gemv(sch)
            word = _weight_bytes(sch, main, dequant)
            plan = self.plan(n, k, word, target, _group_size(sch, dequant, k),
                             bytes_read=n * (k // CODES_PER_WORD if dequant is not None else k) * word,
                             prologue=bool(producers))
        except MatchError:
            return None
        if dequant is not None and self.profile.gemv_half2_rows > 0:
            # the packed kernels where one applies (gpu_gemv_half2: CUDA, fp16 x), else the generic
            for packed in PACKED_KERNELS:
                try:
                    return packed(func, target, self.profile, plan)[0]
                except MatchError:
                    pass
        try:
            return self._schedule(sch, main, dequant, producers, epilogues, plan)
        except MatchError:  # a shape the schedule cannot express: the next rule takes it
            return None

    def _schedule(self, sch, main, dequant, producers, epilogues, plan):
        vec, tn, tk, ks = plan["vec"], plan["tn"], plan["tk"], plan["ks"]
        kg, wpg = plan["kg"], plan["wpg"]
        if dequant is not None:
            sch.compute_inline(dequant)
        # the prologue: a row statistic (a norm's sum of squares) is reduced by each workgroup,
        # the producers the matmul reads (the activation, the normalized row) are computed once
        # per group of K into registers, anything before them is inlined into those
        row_stats = [b for b in producers if sch.get(b).name_hint == NORM_ROW_STAT_BLOCK]
        direct = [b for b in producers if b not in row_stats and any(
            sch.get(c).same_as(sch.get(main)) for c in sch.get_consumers(b))]
        for blk in producers:
            if blk not in row_stats and blk not in direct:
                sch.compute_inline(blk)
        *lead, n_loop, k_loop = sch.get_loops(main)
        n_loop = sch.fuse(*lead, n_loop) if lead else n_loop
        bx, tx, vn = sch.split(n_loop, [None, tn, vec])
        if ks > 1:
            kso, ty, ko, kw, ki = sch.split(k_loop, [ks, tk, kg, wpg, CODES_PER_WORD])
            sch.reorder(kso, bx, tx, ty, ko, kw, ki, vn)
        else:
            ty, ko, kw, ki = sch.split(k_loop, [tk, kg, wpg, CODES_PER_WORD])
            sch.reorder(bx, tx, ty, ko, kw, ki, vn)

        if ks > 1:  # partial[ks, N] in global memory, summed by a second kernel
            partial = sch.rfactor(kso, factor_axis=0)
            inner = sch.rfactor(sch.get_loops(partial)[3], factor_axis=0)  # the ty loop
            kso, bx, tx, ty, ko, kw, ki, vn = sch.get_loops(inner)
            sch.bind(kso, "blockIdx.y")
            writeback = partial
        else:
            inner = sch.rfactor(ty, factor_axis=0)
            bx, tx, ty, ko, kw, ki, vn = sch.get_loops(inner)[-7:]
            writeback = main
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.set_scope(inner, 0, "local")

        # registers: per group, its scale/zero row and x[32]; per word, the packed codes (a vector
        # load of ``vec`` columns)
        computed = []
        for blk in direct:
            try:
                sch.compute_at(blk, ko, preserve_unit_loops=True)
            except s_tir.ScheduleError:  # (not per K group: read where it is used, as before)
                sch.compute_inline(blk)
                continue
            sch.set_scope(blk, 0, "local")
            computed.append(sch.get(blk).writes[0].source)
        n_reads = len(sch.get(inner).reads)
        out_buf = sch.get(inner).writes[0].source
        for i in range(n_reads):
            buf = sch.get(inner).reads[i].source
            if buf.same_as(out_buf) or any(buf.same_as(c) for c in computed):
                continue
            per_word = len(sch.get(inner).reads[i].region) == 2 and buf.name not in ("scale", "zero")
            cache = sch.cache_read(inner, i, "local")
            sch.compute_at(cache, kw if per_word else ko, preserve_unit_loops=True)
            last = sch.get_loops(cache)[-1]
            extent = _int(sch.get(last).extent)
            if extent not in (None, 1):  # vector loads of at most 16 bytes
                bits = tvm.DataType(str(buf.ty.dtype)).bits
                lanes = _power_of_two_divisor(extent, max(1, MAX_VECTOR_BITS // bits))
                if lanes < extent:
                    outer, last = sch.split(last, [None, lanes])
                    sch.unroll(outer)
                sch.vectorize(last)
        sch.unroll(kw)
        sch.unroll(ki)
        if self.vector_lanes > 1 and vec % self.vector_lanes == 0:
            vo, vi = sch.split(vn, [None, self.vector_lanes])
            sch.unroll(vo)
            sch.vectorize(vi)
        else:
            sch.unroll(vn)
        sch.decompose_reduction(inner, ko)

        # the cross-thread sum over threadIdx.y, per output column of this thread
        sch.reverse_compute_at(writeback, tx, preserve_unit_loops=True)
        (red,) = reduce_loops(sch, writeback)
        depth = [sch.get(lp).same_as(sch.get(tx)) for lp in sch.get_loops(inner)].index(True) + 1
        inner_spatial = [lp for lp in sch.get_loops(writeback)[depth:]
                         if not sch.get(lp).same_as(sch.get(red))]
        sch.reorder(*inner_spatial, red)
        sch.bind(red, "threadIdx.y")
        if ks > 1:
            (red,) = reduce_loops(sch, main)
            spatial = [lp for lp in sch.get_loops(main) if not sch.get(lp).same_as(sch.get(red))]
            sch.reorder(*spatial, red)
            fused = sch.fuse(*spatial)
            fbx, ftx = sch.split(fused, [None, min(256, self.profile.max_threads)])
            sch.bind(fbx, "blockIdx.x")
            sch.bind(ftx, "threadIdx.x")
            anchor = ftx
        else:
            anchor = tx
        for epi in epilogues:  # in order: a chain (sigmoid, then multiply) stays in order
            sch.reverse_compute_at(epi, anchor, preserve_unit_loops=True)
        # results that only feed the epilogue live in registers, not in global memory
        for blk in [main if ks > 1 else writeback, *epilogues]:
            if _writes_intermediate(sch, blk):
                sch.set_scope(blk, 0, "local")
        for blk in row_stats:  # a cross-thread sum by the workgroup's threads, into shared memory
            self._reduce_in_workgroup(sch, blk, bx, tn, tk)
        check_all_bound(sch)
        return sch

    @staticmethod
    def _reduce_in_workgroup(sch, block, bx, tn, tk):
        sch.compute_at(block, bx, preserve_unit_loops=True)
        (red,) = reduce_loops(sch, block)
        _, ry, rx = sch.split(red, [None, tk, tn])
        sch.bind(ry, "threadIdx.y")
        sch.bind(rx, "threadIdx.x")
        sch.set_scope(block, 0, "shared")


__all__ = ["GPUDecodeGEMV", "match_gemv", "match_matmul", "MatchError", "reduce_loops"]
