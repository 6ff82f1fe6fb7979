"""Sliding-window attention on the GPU: the ring kernels next to full-length caches + window mask.

For a window layer (fp16; Gemma-3-1B's attention shape, 4 query heads and 1 kv head of 256,
window 512, and a Mistral-like 32 x 8 x 128 with window 4096) on one CUDA device, per context:

* **decode**: ``attention_ring_decode`` on a ring of ``window`` rows (the new row written first,
  flash-decoding over the live window) against ``attention_decode`` on a full-length cache of
  ``context`` rows with the export's window mask (``(1, 1, 1, context)``);
* **prefill**: a chunk of ``n`` tokens after ``past``: ``attention_ring_prefill`` (key tiles below
  the window and above the diagonal skipped) against ``attention_prefill`` on the full-length
  cache with the window mask (it skips only the tiles above the diagonal).

Both kernels get the same history, so their outputs must agree (max abs difference reported,
first call). Times: medians of ``time_evaluator`` repeats (kernel launches included; the ring
kernels' repeated calls rewrite the same ring slots).

    python -m tvm_lite.bench.window [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .kernels import require_cuda_gpu

# name: (heads, kv_heads, head_dim, window)
SHAPES = {"gemma-3-1b local layer": (4, 1, 256, 512), "mistral-like": (32, 8, 128, 4096)}
DECODE_CONTEXTS = (512, 4096, 16384)
PREFILL_CASES = ((2048, 0), (2048, 6144))  # (chunk n, past)


def _kernel(p: dict, target):
    import tvm

    from tvm_lite.relax_passes.fuse_attention import reference_kernel
    from tvm_lite.schedules.gpu_attention import Attention

    func = Attention().apply(reference_kernel(p), target, False).mod["main"]
    func = func.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def bench_case(heads: int, kv: int, d: int, window: int, n: int, past: int, target, dev) -> dict:
    import tvm

    from tvm_lite.bench.kernels import median_seconds
    from tvm_lite.relax_passes.fuse_attention import attention_params

    rng = np.random.default_rng(0)
    m, decode = past + n, n == 1
    keys, values = (rng.standard_normal((m, kv, d)).astype("float16") for _ in range(2))
    q = rng.standard_normal((1, heads, n, d)).astype("float16")
    qpos, kpos = past + np.arange(n)[:, None], np.arange(m)[None]
    allowed = (kpos <= qpos) & (kpos > qpos - window)
    mask = np.where(allowed, 0, np.finfo("float16").min).astype("float16")[None, None]
    squeeze = (lambda a: a[:, 0]) if kv == 1 else (lambda a: a)
    ring = np.zeros((2, window, kv, d), "float16")
    for a in range(max(0, past - window), past):
        ring[:, a % window] = keys[a], values[a]
    new = [x[past:].transpose(1, 0, 2)[None].copy() for x in (keys, values)]
    out_shape = (1, n, heads * d)
    common = dict(heads=heads, kv_heads=kv, head_dim=d, dtype="float16", scale=d ** -0.5,
                  mask_dtype="float16", mask_heads=False, mask_rows=not decode, decode=decode,
                  merged_heads=True, kv_squeezed=kv == 1)
    t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    row = {"context": m, "n": n, "past": past, "window": window}
    outs = {}
    for name, p, args in (
            ("ring", attention_params(**common, window=window),
             [t(q), t(squeeze(ring[0])), t(squeeze(ring[1])), t(new[0]), t(new[1]), past]),
            ("full-length + mask", attention_params(**common),
             [t(q), t(squeeze(keys)), t(squeeze(values)), t(mask)])):
        ex = _kernel(p, target)
        out = tvm.runtime.empty(out_shape, "float16", dev)
        ex["main"](*args, out)
        outs[name] = out.numpy().astype("float32")
        row[f"{name} ms"] = median_seconds(ex, dev, [*args, out]) * 1e3
    row["max abs diff"] = float(np.abs(outs["ring"] - outs["full-length + mask"]).max())
    row["ring / full-length"] = row["full-length + mask ms"] / row["ring ms"]
    return row


def main(argv=None):
    import tvm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    require_cuda_gpu("bench.window")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    dev = tvm.cuda(0)
    rows = []
    print("| shape | phase | n | past | ring ms | full-length + mask ms | speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (heads, kv, d, window) in SHAPES.items():
        cases = [(1, ctx - 1) for ctx in DECODE_CONTEXTS] + list(PREFILL_CASES)
        for n, past in cases:
            r = bench_case(heads, kv, d, window, n, past, target, dev)
            r["shape"] = name
            rows.append(r)
            print(f"| {name} (W {window}) | {'decode' if n == 1 else 'prefill'} | {n} | {past} | "
                  f"{r['ring ms']:.3f} | {r['full-length + mask ms']:.3f} | "
                  f"{r['ring / full-length']:.2f}x | {r['max abs diff']:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
