"""CPU (LLVM) schedule rules: multi-core and vectorized loops for the whole-model CPU build.

TVM's default CPU pipeline schedules nothing (every kernel is a scalar loop nest on one core), and
DLight's CPU GEMV rule only takes weights laid out ``[N, K]``; torch exports ``x @ W`` with
``W: [K, N]``. These two rules are the CPU side of tvm_lite's schedules: CI runs whole models
through them.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.target import Target

from .cpu_target import cpu_tiles

VECTOR_LANES = 16  # fp32 lanes per inner tile of CPUMatmul (batched products; AVX2 splits it)
PARALLEL_MIN_WORK = 16384  # a static loop nest with fewer iterations runs on one thread


def _is_cpu(target: Target) -> bool:
    return target.kind.name in ("llvm", "c")


def prepare(func, target, keep=()):
    """A schedule of ``func`` with injective producers inlined (but the blocks named in ``keep``),
    and its other blocks; None if the rule does not apply (not a CPU target, or a function DLight
    cannot analyze)."""
    if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    return sch, try_inline(sch, [b for b in infos if sch.get(b.block_rv).name_hint not in keep])


class CPUMatmul(dl.ScheduleRule):
    """``C[..., i, j] += A[..., i, k] * B[..., k, j]``: parallel over column tiles, the reduction
    loop outside a vectorized column tile, so ``B`` is streamed row by row (contiguous)."""

    def apply(self, func, target, _tunable):
        prepared = prepare(func, target)
        if prepared is None:
            return None
        sch, infos = prepared
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or infos[0] is not reductions[0]:
            return None
        info = reductions[0]
        kinds = info.dom_kind()
        # spatial..., j, k  (exactly one reduction axis, last)
        if not kinds.endswith("SR") or kinds.count("R") != 1:
            return None
        block = info.block_rv
        loops = sch.get_loops(block)
        if len(loops) != len(kinds):
            return None
        *outer, j, k = loops
        # j must index the innermost dim of the output and of one input (contiguous rows of B)
        write = sch.get(block).writes[0]
        j_var = sch.get(block).iter_vars[len(kinds) - 2].var
        last_index = write.region[-1].min
        if not (isinstance(last_index, tirx.Var) and last_index.same_as(j_var)):
            return None
        jo, ji = sch.split(j, [None, VECTOR_LANES])
        sch.reorder(jo, *outer, k, ji)
        sch.parallel(jo)
        sch.vectorize(ji)
        sch.decompose_reduction(block, k)
        for epilogue in infos[1:]:
            try:  # (an epilogue that cannot move under the tile runs after the matmul)
                sch.reverse_compute_at(epilogue.block_rv, jo)
            except s_tir.ScheduleError:
                pass
        return sch


class CPUParallel(dl.ScheduleRule):
    """Everything else: inline what can be inlined; per block, the innermost loop of an
    elementwise block vectorized, and the leading spatial loops run in parallel when there is
    enough work to pay for waking the thread pool (``PARALLEL_MIN_WORK`` iterations: a decode
    step's norms and rotaries over one row stay on the calling thread; a parallel region costs a
    few microseconds and waits for its slowest thread)."""

    def apply(self, func, target, _tunable):
        prepared = prepare(func, target)
        if prepared is None:
            return None
        sch, infos = prepared
        lanes = cpu_tiles(target).lanes
        for info in infos:
            block = info.block_rv
            kinds = info.dom_kind()
            loops = sch.get_loops(block)
            if len(loops) != len(kinds):
                continue
            lead = []
            for loop, kind in zip(loops, kinds):
                if kind != "S":
                    break
                lead.append(loop)
            if not lead:
                continue
            work = _static_work(sch, loops)
            last = sch.get(loops[-1]).extent
            if len(lead) == len(loops) and isinstance(last, tirx.IntImm) \
                    and int(last) % lanes == 0:  # elementwise: the innermost loop in vectors
                outer, inner = sch.split(lead[-1], [None, lanes])
                sch.vectorize(inner)
                lead[-1] = outer
            if work is None or work >= PARALLEL_MIN_WORK:
                sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
        return sch


def _static_work(sch, loops) -> int | None:
    """The iterations of a loop nest, or None if one extent is symbolic."""
    work = 1
    for loop in loops:
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return None
        work *= int(extent)
    return work
