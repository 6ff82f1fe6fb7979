"""What ``gpu_slice`` buys (``tvm_lite/gpu_slice.py``): the longest single kernel and the longest
uninterrupted submission of a long prefill, without and with slicing.

    python -m tvm_lite.bench.gpu_slice ARTIFACT --device cuda [--tokens 2048 --slices 16,64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..engine import Engine
from ..gpu_slice import PRIORITIES, is_kernel
from .generation import format_table, prompt_ids
from .kernels import int_list


def kernel_times(engine, ids) -> list[tuple[str, float]]:
    """Run ``engine``'s prefill over ``ids`` in a fresh session with a sync around every kernel:
    each kernel's own time (launch included). Slower than a normal run; for profiling only."""
    sync, times = engine.sync, []
    state = {}

    def instrument(func, name, before_run, ret_value, *args):
        if is_kernel(name):
            sync()
            if before_run:
                state["t0"] = time.perf_counter()
            else:
                times.append((name, time.perf_counter() - state["t0"]))
        return 0

    with engine.instrumented(instrument):
        next(engine.tokens(engine.new_session(), ids))
    return times


def profile_prefill(engine, n_tokens: int, gpu_slice: int | None, repeats: int = 3) -> dict:
    """A prefill of ``n_tokens`` real-text tokens through the engine's generation loop, with
    ``engine`` as configured (its ``prefill_chunk``) and ``gpu_slice`` kernels between flushes
    (None: no slicing): the longest single kernel, the longest uninterrupted submission, how many
    there were, and the prefill's time (median over ``repeats``; the first run warms up)."""
    ids = prompt_ids(engine, n_tokens)
    runs = []
    with engine.submissions(gpu_slice):
        next(engine.tokens(engine.new_session(), ids))  # warm-up
    for _ in range(repeats):
        with engine.submissions(gpu_slice) as record:
            seconds = next(engine.tokens(engine.new_session(), ids)).seconds
        runs.append((seconds, record))
    total, record = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    per_kernel = kernel_times(engine, ids)
    name, longest_kernel = max(per_kernel, key=lambda t: t[1])
    return {
        "tokens": n_tokens, "prefill_chunk": engine.prefill_chunk, "gpu_slice": gpu_slice,
        "prefill_ms": total * 1e3, "prefill_tok_s": n_tokens / total,
        "submissions": len(record.seconds), "longest_submission_ms": record.longest_s * 1e3,
        "median_submission_ms": float(np.median(record.seconds)) * 1e3 if record.seconds else 0.0,
        "kernels": len(per_kernel), "longest_kernel_ms": longest_kernel * 1e3,
        "longest_kernel": name,
    }


def main(argv=None) -> int:
    """``python -m tvm_lite.bench.gpu_slice ARTIFACT --device cuda``: the longest kernel and the
    longest uninterrupted submission of a long prefill, without and with slicing, as a table,
    and each setting's prefill time over one call's (``x_one_call``: the whole model's cost of a
    prompt in chunks)."""
    p = argparse.ArgumentParser(prog="python -m tvm_lite.bench.gpu_slice", description=main.__doc__)
    p.add_argument("artifact")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length")
    p.add_argument("--slices", type=int_list, default="16,64",
                   help="gpu_slice values (kernels between flushes)")
    p.add_argument("--chunk", type=int, default=256, help="prefill_chunk with slicing (tokens)")
    p.add_argument("--priority", default="normal", choices=PRIORITIES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ctx = args.tokens + 8
    rows = []
    whole = Engine(args.artifact, args.device, max_context=ctx, buckets=None,
                   prefill_chunk=args.tokens, priority=args.priority)
    rows.append({"setting": f"one call of {args.tokens} tokens, no slicing",
                 **profile_prefill(whole, args.tokens, None, args.repeats)})
    del whole
    sliced = Engine(args.artifact, args.device, max_context=ctx, buckets=None,
                    prefill_chunk=args.chunk, priority=args.priority)
    rows.append({"setting": f"chunks of {args.chunk}, no slicing",
                 **profile_prefill(sliced, args.tokens, None, args.repeats)})
    for n in args.slices:
        rows.append({"setting": f"chunks of {args.chunk}, gpu_slice={n}",
                     **profile_prefill(sliced, args.tokens, n, args.repeats)})
    rows[0]["priority"] = sliced.priority
    for row in rows:  # issue 16: a prompt in chunks should cost <= 1.3x one call
        row["x_one_call"] = row["prefill_ms"] / rows[0]["prefill_ms"]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    cols = ["setting", "prefill_ms", "x_one_call", "submissions", "longest_submission_ms",
            "median_submission_ms", "longest_kernel_ms", "longest_kernel"]
    print(format_table(rows, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
