"""A list-scheduling model of one prefill attention call's grid, without a GPU: what the order
of the workgroups and a prompt's key splits should buy (``LONGEST_FIRST_ACROSS_HEADS`` and
``PROMPT_SPLITS`` in ``schedules/gpu_attention_prefill.py``).

Each workgroup's time is the key tiles it walks (up to the causal bound of its last row, as the
tensor-core kernel's tiles are) plus ``fixed`` tiles of its own work; ``slots`` workgroups run
at once, and a freed slot takes the next workgroup in launch order (``blockIdx.x`` fastest, then
y, then the split on z). An empty split costs nothing. What a GPU adds is left out: workgroups
sharing an SM slow each other, and a split costs its partials and their merge. A model, not a
measurement: the bench (``bench.prefill --parts attention --switch ...``) says what the H200
does.

    python -m tvm_lite.bench.grid_model [--lengths 512,2048] [--slots 264,396]
"""

from __future__ import annotations

import argparse
import heapq
import math

from .kernels import int_list

FIXED = 0.5  # a workgroup's own work (Q, the causal check, the epilogue), in key tiles


def row_tile_work(heads: int, kv_heads: int, n: int, rows: int = 64, keys: int = 64) -> list:
    """Key tiles each row tile walks in a causal prompt of ``n`` tokens (rows: flattened (query
    position, GQA head) pairs, as the tensor-core kernel tiles them)."""
    G = heads // kv_heads
    tiles = -(-n * G // rows)
    return [math.ceil((min(n - 1, (bq * rows + rows - 1) // G) + 1) / keys) for bq in range(tiles)]


def launch_order(kv_heads: int, work: list, heads_fastest: bool) -> list:
    """The (kv head, row tile) pairs in launch order, each kv head's row tiles last-first (the
    tree's ``bq = nb - 1 - bqr``); ``heads_fastest``: the kv head is blockIdx.x."""
    nb = len(work)
    if heads_fastest:
        return [(h, nb - 1 - b) for b in range(nb) for h in range(kv_heads)]
    return [(h, nb - 1 - b) for h in range(kv_heads) for b in range(nb)]


def makespan(heads: int, kv_heads: int, n: int, slots: int, heads_fastest: bool = False,
             splits: int = 1, fixed: float = FIXED, rows: int = 64, keys: int = 64) -> float:
    """The call's length in key tiles: list scheduling of its workgroups on ``slots``, each row
    tile's key tiles split ``splits`` ways (even pieces, as the kernel's)."""
    work = row_tile_work(heads, kv_heads, n, rows, keys)
    order = launch_order(kv_heads, work, heads_fastest)
    times = []
    for sp in range(splits):
        for _, bq in order:
            per = -(-work[bq] // splits)
            piece = max(0, min(work[bq], (sp + 1) * per) - sp * per)
            times.append(piece + fixed if piece else 0.0)
    free, end = [0.0] * slots, 0.0
    for t in times:
        start = heapq.heappop(free)
        end = max(end, start + t)
        heapq.heappush(free, start + t)
    return end


def table(shapes: dict, lengths, slots) -> list[dict]:
    """Per shape, length and slot count: the tree's order against longest-first across heads
    and two prompt splits (speed-ups over the tree's order)."""
    out = []
    for name, (heads, kv, _) in shapes.items():
        for n in lengths:
            for s in slots:
                base = makespan(heads, kv, n, s)
                out.append(dict(shape=name, n=n, slots=s, workgroups=kv * len(
                    row_tile_work(heads, kv, n)), tree=base,
                    longest_first=base / makespan(heads, kv, n, s, heads_fastest=True),
                    splits2=base / makespan(heads, kv, n, s, splits=2)))
    return out


def main(argv=None) -> None:
    from .prefill import ATTENTION_SHAPES

    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.grid_model",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int_list, default="512,2048")
    ap.add_argument("--slots", type=int_list, default="264,396",
                    help="resident workgroups (2 or 3 a SM of the H200's 132)")
    args = ap.parse_args(argv)
    rows = table(ATTENTION_SHAPES, args.lengths, args.slots)
    print("| shape | n | slots | workgroups | tree (key tiles) | longest first across heads "
          "| 2 prompt splits |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['n']} | {r['slots']} | {r['workgroups']} | {r['tree']:.1f} "
              f"| {r['longest_first']:.2f}x | {r['splits2']:.2f}x |")


if __name__ == "__main__":
    main()
