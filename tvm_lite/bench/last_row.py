"""What ``prefill_last`` buys: a prefill that computes the last row's logits alone.

One engine, one artifact, the same prompts, the last row's logits read back either way:
``Engine.forward(session, ids, last_only=True)`` through ``prefill`` (every row's logits
computed, as before this function existed; what a perplexity evaluation still runs) against the
same call through ``prefill_last`` (the model's row-local tail -- the last layer's o-projection
and MLP, the final norm, the lm_head -- on the last real row only; what generation and
``prefill_step`` run). Interleaved repeats, medians; the greedy token of both must agree.

    python -m tvm_lite.bench.last_row [ARTIFACT] [--target llvm] [--lengths 100,500] [--json F]

Without an artifact it compiles the default model (SmolLM2-135M) for ``--target``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tqdm import tqdm

from .kernels import int_list


def bench(engine, lengths, repeats: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in tqdm(lengths, desc="prompt lengths", leave=False):
        ids = rng.integers(100, 20000, n).tolist()
        times = {"all rows": [], "last row": []}
        tokens = {}
        for _ in range(repeats):
            for name, last_row in (("all rows", False), ("last row", True)):
                engine.runner.last_row_prefill = last_row  # which function forward calls
                session = engine.new_session()
                t0 = time.perf_counter()
                logits = engine.forward(session, ids, last_only=True)
                times[name].append(time.perf_counter() - t0)
                tokens[name] = int(np.argmax(logits[-1]))
        engine.runner.last_row_prefill = True
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"tokens": n, "all rows ms": med["all rows"] * 1e3,
                     "last row ms": med["last row"] * 1e3,
                     "speedup": med["all rows"] / med["last row"],
                     "same token": tokens["all rows"] == tokens["last row"]})
    return rows


def main(argv=None):
    from tvm_lite.artifact import compile_model
    from tvm_lite.engine import Engine
    from tvm_lite.export import export_onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--lengths", type=int_list, default="100,500")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    lengths = args.lengths
    path = args.artifact or compile_model(export_onnx(), args.target)
    engine = Engine(path, max_context=max(lengths) + 8, buckets=(), prefill_chunk=max(lengths))
    if not engine.runner.last_row_prefill:
        raise SystemExit(f"{path} has no prefill_last (built before it, or kv_cache='copy')")
    rows = bench(engine, lengths, args.repeats)
    print("| prompt tokens | prefill, all rows' logits (ms) | prefill_last (ms) | speedup | "
          "same greedy token |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['all rows ms']:.1f} | {r['last row ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['same token']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
