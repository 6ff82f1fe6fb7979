"""CPU rule for weight matmuls ``Y[..., i, j] = sum_k X[..., i, k] * W[k, j]`` (+ one elementwise
epilogue such as ``silu(Y) * up``): the prefill GEMM (``i`` symbolic or > 1) and the decode GEMV
(``i`` = 1), torch's ``x @ W`` layout with ``W: [K, N]`` (a weight, 2-D).

GEMM (prefill), in the GotoBLAS/BLIS shape:

* ``N`` is cut into panels of ``gemm_cols`` columns (2 vector registers), one parallel task each;
* the task copies its weight panel ``W[:, cols]`` into a contiguous ``[K, cols]`` buffer first
  (packed once per task at run time, then read from L1/L2 by every row tile: the rows of ``W``
  are ``4 N`` bytes apart, so without it a panel's rows fall into a few cache sets and one page
  each);
* the rows of ``X`` go ``gemm_rows`` (6) at a time through a micro-kernel whose 6 x 2 vector
  accumulators stay in registers over the whole ``K`` loop (one weight row of the panel loaded,
  each of the 6 activations broadcast, 12 FMAs per ``k``);
* the symbolic ``M`` is padded to a multiple of 6 (``pad_einsum``: ``X`` is copied once into a
  zero-padded buffer, the output tile is written back under ``i < M``), so no bound check runs
  inside the micro-kernel.

GEMV (decode): one task per ``gemv_cols`` (4 vectors) of output columns, accumulated in
registers over ``K``; each ``k`` streams a contiguous row segment of ``W``.

Panel-major weights (``W[N / P, K, P]``, what ``relax_passes/pack_weight_panels.py`` makes of
every weight of a CPU build, ``P`` = ``gemm_cols``): a task's columns are exactly one panel, a
contiguous ``K x P`` block. The GEMV then streams each thread's half of the weight front to back
(no ``P``-float pieces of rows ``4N`` bytes apart), and the GEMM reads its panel in place (no
copy at run time).

The epilogue (SiLU·up, ...) runs on the register tile before it is stored.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from .cpu import prepare

PANEL_BLOCK = "panel_weight"  # a panel-major weight's read (tvm_lite.quant.kernels.panel_matmul_func)
# The scope of the register tiles (accumulators, a GEMV's dequantized weights). On the CPU a
# "global" buffer under 1 KB that a task allocates becomes a stack slot, which LLVM keeps in
# registers; a "local" one is a TVMBackendAllocWorkspace/FreeWorkspace call pair into the runtime
# per task (thousands per decode step).
TILE_SCOPE = "global"
from .cpu_target import cpu_tiles


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def panel_width(sch, block) -> int | None:
    """``P`` if ``block`` (a weight's unpack or dequantize block) reads a panel-major weight
    ``T[j // P, r, j % P]``, else None. (With ``N == P`` the indices simplify to
    ``T[0, r, j]``.)"""
    for read in sch.get(block).reads:
        region = read.region
        if len(region) != 3:
            continue
        first, middle, last = (r.min for r in region)
        if isinstance(first, tirx.FloorDiv) and isinstance(last, tirx.FloorMod) \
                and isinstance(last.b, tirx.IntImm) and isinstance(first.b, tirx.IntImm) \
                and int(first.b) == int(last.b) and first.a.same_as(last.a):
            return int(last.b)
        if isinstance(first, tirx.IntImm) and int(read.source.shape[0]) == 1 \
                and not isinstance(middle, tirx.IntImm) and isinstance(last, tirx.Var):
            return int(read.source.shape[2])
    return None


def _is_weight(read, k_var, j_var) -> bool:
    """A read of the weight ``W[k, j]`` (a panel-major weight is read through its unpack block,
    which the rules inline only once the loops are tiled)."""
    def is_var(expr, var):
        return isinstance(expr, tirx.Var) and expr.same_as(var)

    region = read.region
    return len(region) == 2 and is_var(region[0].min, k_var) and is_var(region[1].min, j_var)


def match_weight_matmul(sch, infos):
    """``(main, epilogue, rows)`` if the function is ``X @ W`` with a 2-D weight ``W[k, j]`` (and
    at most one elementwise consumer), else None. ``rows``: the extent of ``i`` (None when
    symbolic; 1 when DLight's normalization dropped a unit ``i``)."""
    reductions = [b for b in infos if b.is_reduction()]
    if len(reductions) != 1 or infos[0] is not reductions[0] or len(infos) > 2:
        return None
    info = reductions[0]
    kinds = info.dom_kind()
    if not kinds.endswith("SR") or kinds.count("R") != 1:
        return None
    block = sch.get(info.block_rv)
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    iters = [iv.var for iv in block.iter_vars]
    j_var, k_var = iters[-2:]
    i_var = iters[-3] if len(iters) >= 3 else None

    def is_var(expr, var):
        return var is not None and isinstance(expr, tirx.Var) and expr.same_as(var)

    out = block.writes[0].region
    if not is_var(out[-1].min, j_var):
        return None
    weights = [r for r in block.reads if _is_weight(r, k_var, j_var)]
    acts = [r for r in block.reads if is_var(r.region[-1].min, k_var) and r not in weights]
    if len(weights) != 1 or len(acts) != 1:
        return None
    loops = sch.get_loops(info.block_rv)
    has_rows = len(out) >= 2 and is_var(out[-2].min, i_var) and is_var(acts[0].region[-2].min, i_var)
    lead = loops[:-3] if has_rows else loops[:-2]
    if any(_extent(sch, loop) != 1 for loop in lead):  # batch dims of 1 only
        return None
    rows = _extent(sch, loops[-3]) if has_rows else 1
    epilogue = None
    if len(infos) == 2:
        if not infos[1].is_injective():
            return None
        epilogue = infos[1].block_rv
    return info.block_rv, epilogue, rows


def _vectorize_tail(sch, block, lanes: int) -> None:
    """Vectorize the innermost loop of ``block`` by ``lanes`` (when it divides it)."""
    loop = sch.get_loops(block)[-1]
    extent = _extent(sch, loop)
    if extent and extent % lanes == 0:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


def _accumulate_in_registers(sch, main, epilogue, at) -> object:
    """The output tile of ``main`` in a tile buffer; the store (or the epilogue) under ``at``.
    Returns the block that writes the function's output."""
    if epilogue is None:
        store = sch.cache_write(main, 0, TILE_SCOPE)
        sch.reverse_compute_at(store, at)
        return store
    sch.set_scope(main, 0, TILE_SCOPE)
    sch.reverse_compute_at(epilogue, at)
    return epilogue


def _dequant_panel(sch, dequant, at, tiles, codes_per_word: int = 4) -> None:
    """The ``dequantize`` block (4-bit codes -> weights) computed under ``at`` for the columns
    there: the codes of one packed word unrolled (constant shifts), the columns in vectors."""
    sch.compute_at(dequant, at)
    loops = sch.get_loops(dequant)
    below = loops[[sch.get(loop).same_as(sch.get(at)) for loop in loops].index(True) + 1:]
    dn = below[-1]
    if len(below) == 2:  # a panel of k rows: the codes of a word unrolled
        extent = _extent(sch, below[0])
        if extent and extent % codes_per_word == 0:
            sch.unroll(sch.split(below[0], [None, codes_per_word])[1])
    n = _extent(sch, dn)
    if n and n % tiles.lanes == 0:
        dv, dl_ = sch.split(dn, [None, tiles.lanes])
        sch.unroll(dv)
        sch.vectorize(dl_)


def _columns(n: int | None, panel: int | None, choices) -> int | None:
    """The output columns of one task: the weight's panel if it has one, else the first of
    ``choices`` that divides ``n``."""
    if n is None:
        return None
    if panel:
        return panel if n % panel == 0 else None
    return next((c for c in choices if n % c == 0), None)


def schedule_gemm(sch, main, epilogue, tiles, dequant=None, panel=None, unpack=None) -> bool:
    """The prefill GEMM (module doc). ``dequant``: the 4-bit weights' dequantize block;
    ``panel``: the weight's panel width, ``unpack`` the block that reads it (inlined here)."""
    rows, lanes = tiles.gemm_rows, tiles.lanes
    *batch, i, j, k = sch.get_loops(main)
    cols = _columns(_extent(sch, j), panel, (tiles.gemm_cols, lanes))
    if cols is None or cols % lanes:
        return False
    sch.pad_einsum(main, [1] * len(batch) + [rows, 1, 1])  # (before the panel read is inlined:
    if unpack is not None:                                  #  pad_einsum takes plain indices)
        sch.compute_inline(unpack)
    padded_x = [b for b in sch.get_producers(main) if dequant is None
                or not sch.get(b).same_as(sch.get(dequant))]
    out_copy = sch.get_consumers(main)
    if epilogue is not None and out_copy and not sch.get(out_copy[0]).same_as(sch.get(epilogue)):
        sch.compute_inline(out_copy[0])  # the epilogue reads the padded tile
        out_copy = []
    elif epilogue is not None:
        out_copy = []
    for pad in padded_x:  # X copied once into its zero-padded buffer, in parallel over rows
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:-1]))
        _vectorize_tail(sch, pad, lanes)
    *batch, i, j, k = sch.get_loops(main)
    i = sch.fuse(*batch, i) if batch else i
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, cols])
    sch.reorder(jo, io, k, ii, ji)
    jv, jl = sch.split(ji, [None, lanes])
    sch.parallel(jo)
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jl)
    if dequant is not None:  # W[:, cols] dequantized once per task into the packed panel
        _dequant_panel(sch, dequant, jo, tiles)
    elif not panel:  # W[:, cols] packed once per task (a panel-major W is one already)
        block = sch.get(main)
        weight_index = next(idx for idx, r in enumerate(block.reads) if len(r.source.shape) == 2)
        panel = sch.cache_read(main, weight_index, "global")
        sch.compute_at(panel, jo)
        _vectorize_tail(sch, panel, lanes)
    store = _accumulate_in_registers(sch, main, epilogue, io)
    if out_copy:  # write the register tile straight to the output, under i < M
        sch.reverse_compute_inline(out_copy[0])
    _vectorize_tail(sch, store, lanes)
    sch.decompose_reduction(main, k)
    return True


def schedule_gemv(sch, main, epilogue, tiles, dequant=None, panel=None, unpack=None,
                  codes_per_word: int = 4) -> bool:
    """The decode GEMV (module doc); arguments as :func:`schedule_gemm`'s."""
    lanes = tiles.lanes
    if unpack is not None:
        sch.compute_inline(unpack)
    *lead, j, k = sch.get_loops(main)
    cols = _columns(_extent(sch, j), panel, (tiles.gemv_cols, 2 * lanes, lanes))
    if cols is None or cols % lanes:
        return False
    jo, ji = sch.split(j, [None, cols])
    if dequant is not None:  # k by packed words: the 4 codes of a word unrolled
        ko, ki = sch.split(k, [None, codes_per_word])
        sch.reorder(jo, *lead, ko, ki, ji)
        k = ko
    else:
        sch.reorder(jo, *lead, k, ji)
    jv, jl = sch.split(ji, [None, lanes])
    sch.parallel(jo)
    sch.unroll(jv)
    sch.vectorize(jl)
    if dequant is not None:  # the task's weights of one k, dequantized in registers
        sch.set_scope(dequant, 0, TILE_SCOPE)
        _dequant_panel(sch, dequant, ki, tiles)
        sch.unroll(ki)
    store = _accumulate_in_registers(sch, main, epilogue, jo)
    _vectorize_tail(sch, store, lanes)
    sch.decompose_reduction(main, k)
    return True


class CPUWeightMatmul(dl.ScheduleRule):
    """``X @ W`` with a 2-D weight: the register-tiled GEMM when ``M`` is symbolic or > 1, the
    streaming GEMV when ``M`` = 1."""

    def apply(self, func, target, _tunable):
        prepared = prepare(func, target, keep=(PANEL_BLOCK,))
        if prepared is None:
            return None
        sch, infos = prepared
        matched = match_weight_matmul(sch, infos)
        if matched is None:
            return None
        main, epilogue, rows = matched
        unpack = next((b for b in sch.get_producers(main)
                       if sch.get(b).name_hint == PANEL_BLOCK), None)
        tiles = cpu_tiles(target)
        schedule = schedule_gemv if rows == 1 else schedule_gemm
        try:
            panel = panel_width(sch, unpack) if unpack is not None else None
            return sch if schedule(sch, main, epilogue, tiles, panel=panel, unpack=unpack) \
                else None
        except s_tir.ScheduleError:  # a shape the tiles do not fit
            return None


__all__ = ["CPUWeightMatmul", "match_weight_matmul", "panel_width"]
