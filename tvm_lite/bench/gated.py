"""The gated MLP's gate+up GEMM storing ``act(gate) * up``, against the GEMM and activation apart.

    python -m tvm_lite.bench.gated [--shapes llama-3.2-1b,gemma-2b] [--rows 256,512,2048]
                                   [--json out.json]

For each model shape's gate+up projection (SmolLM2-135M: K 576, 2 x 1536 columns, SiLU;
Llama-3.2-1B: 2048, 2 x 8192, SiLU; Gemma-2B: 2048, 2 x 16384, tanh-GELU) and prompt length, E0M4
weights (RTN layout, group 32) and fp16 activations, on a CUDA GPU (built for ``cuda
-arch=sm_90a`` with tvm_lite's rules, planned by prompt length as the pipeline plans them):

* **apart** -- what the pipeline runs without the gated epilogue's fusion: the GEMM writing
  all ``2N`` columns, then the activation kernel reading them back (the interleaved layout's);
* **fused** -- the GEMM storing ``act(gate) * up`` itself (``FuseGatedEpilogue``: ``N`` columns
  written, one kernel);
* **torch** -- ``x @ W`` (the dequantized weight in fp16, the halves layout), then
  ``act(gate) * up`` (SiLU, or GELU with ``approximate="tanh"``).

GPU time per call from ``torch.profiler`` (every kernel of a call summed, over ``iters`` calls).
Each output is checked against an fp32 reference of the same rounding (max error over the
largest value).
"""

from __future__ import annotations

import argparse
import json

from .kernels import int_list, markdown_table, require_cuda_gpu

SHAPES = {"smollm2-135m": (576, 1536, "silu"), "llama-3.2-1b": (2048, 8192, "silu"),
          "gemma-2b": (2048, 16384, "gelu")}
ROWS = (256, 512, 2048)
TARGET = "cuda -arch=sm_90a"


def build_kernels(k: int, n: int, act: str) -> dict:
    """``{"gemm", "activation", "fused"}``: the compiled kernels of one shape (``main`` each),
    planned by prompt length (symbolic rows)."""
    from tvm import tirx

    from ..schedules import rules_for
    from ..target import parse_target
    from .kernels import build, gated_gemm_func

    target = parse_target(TARGET)
    rows = tirx.Var("n", "int64")
    gemm, activation = gated_gemm_func("e0m4", [1, rows], k, n, act, fused=False)
    fused = gated_gemm_func("e0m4", [1, rows], k, n, act)
    return {name: build(func, target, rules_for(target))["main"]
            for name, func in (("gemm", gemm), ("activation", activation), ("fused", fused))}


def reference(y, n: int, act: str):
    """``act(gate) * up`` of the GEMM output ``y`` (fp32 ``[m, 2n]``, gate and up interleaved
    in blocks of ``GATE_BLOCK``) with the pipeline's rounding: ``y`` stored as fp16, the
    activation in fp32 cast to fp16, times up in fp16."""
    import torch

    from ..convention import GATE_BLOCK

    blocks = y.half().reshape(y.shape[0], n // GATE_BLOCK, 2, GATE_BLOCK)
    gate, up = blocks[:, :, 0].reshape(-1, n).float(), blocks[:, :, 1].reshape(-1, n)
    a = torch.nn.functional.silu(gate) if act == "silu" else \
        torch.nn.functional.gelu(gate, approximate="tanh")
    return (a.half() * up).float()


def bench(shapes=tuple(SHAPES), rows=ROWS, progress=print, iters: int = 20) -> list[dict]:
    import numpy as np
    import torch
    import tvm_ffi

    from ..convention import GATE_BLOCK
    from ..gpu_time import torch_kernels
    from ..quant.format import dequantize
    from .kernels import GROUP_SIZE, weights

    out_rows = []
    for shape in shapes:
        k, n, act = SHAPES[shape]
        fns = build_kernels(k, n, act)
        arrays = weights("e0m4", k, 2 * n, np.random.default_rng(0))
        w = dequantize("e0m4", arrays["codes"], arrays["scale"], arrays.get("zero"), k,
                       GROUP_SIZE)
        packed = [tvm_ffi.from_dlpack(torch.from_numpy(np.ascontiguousarray(a)).cuda())
                  for a in arrays.values()]
        wt = torch.from_numpy(w.astype(np.float16)).cuda()
        # the halves layout for torch: gate's columns then up's
        halves = wt.reshape(k, n // GATE_BLOCK, 2, GATE_BLOCK).permute(0, 2, 1, 3).reshape(k, 2 * n)
        torch_act = torch.nn.functional.silu if act == "silu" else \
            (lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
        g = torch.Generator(device="cuda").manual_seed(0)
        for m in rows:
            x = (torch.randn((1, m, k), generator=g, device="cuda") * 0.5).half()
            y = torch.empty((1, m, 2 * n), device="cuda", dtype=torch.float16)
            out = torch.empty((1, m, n), device="cuda", dtype=torch.float16)
            ref = reference(x.reshape(m, k).float() @ wt.float(), n, act)
            tx, ty, to = (tvm_ffi.from_dlpack(a) for a in (x, y, out))

            def torch_call():
                gate, up = (x @ halves).chunk(2, dim=-1)
                return torch_act(gate) * up

            calls = {"apart": lambda: (fns["gemm"](tx, *packed, ty), fns["activation"](ty, to)),
                     "fused": lambda: fns["fused"](tx, *packed, to), "torch": torch_call}
            row = {"shape": shape, "k": k, "n": n, "act": act, "rows": m,
                   "tflop": 2 * m * k * 2 * n / 1e12}
            for name, call in calls.items():
                got = call()
                got = (out if name != "torch" else got).reshape(m, n).float()
                err = float((got - ref).abs().max() / ref.abs().max())
                call()
                found, _, _ = torch_kernels(lambda call=call: [call() for _ in range(iters)],
                                            iters)
                us = sum(v["us"] for v in found.values())
                row[name] = {"gpu_us": us, "tflop_s": row["tflop"] / (us * 1e-6),
                             "rel_err": err, "kernels": len(found)}
            progress(format_row(row))
            out_rows.append(row)
            del x, y, out
            torch.cuda.empty_cache()
    return out_rows


def format_row(r: dict) -> str:
    cells = [r["shape"], str(r["rows"])]
    for name in ("apart", "fused", "torch"):
        x = r[name]
        cells.append(f"{x['gpu_us']:.1f} us / {x['tflop_s']:.0f} TFLOP/s")
    cells.append(f"{r['apart']['gpu_us'] - r['fused']['gpu_us']:.1f}")
    cells.append(f"{r['torch']['gpu_us'] / r['fused']['gpu_us']:.2f}x")
    cells.append(f"{max(r[n]['rel_err'] for n in ('apart', 'fused')):.1e}")
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict]) -> str:
    head = ("| shape | rows | GEMM + activation kernel | fused (gated epilogue) | torch matmul + "
            "act * up | us saved | fused vs torch | max rel err |")
    return markdown_table(head, [format_row(r) for r in rows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.gated",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--rows", type=int_list, default=",".join(map(str, ROWS)))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    rows = args.rows
    require_cuda_gpu("bench.gated")
    result = bench(shapes, rows)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": result}, f, indent=1)


if __name__ == "__main__":
    main()
