"""The fused norm kernels on a CUDA GPU: vectors a thread against the columns layout.

    python -m tvm_lite.bench.norm [--widths 576,2048,2304] [--rows 1,256,2048] [--json out.json]

For each row width ``D`` (SmolLM2's 576, Llama's and Gemma-2B's 2048, Gemma-2's 2304) and row
count (a decode step's 1, a 256-token chunk, a 2048-token prompt), fp16, it times
``add_rms_norm`` (``FuseAddRMSNorm``'s kernel: outputs the normalized rows and the residual sum)
as ``schedules/fused_norm.py`` builds it for the CUDA profile, with ``VECTOR_LOADS`` on (each
thread one 16-byte vector of each addend) and off (the columns layout the other profiles keep),
and ``torch``'s fp16 ``x + r`` followed by ``torch.nn.functional.rms_norm`` beside them (two
kernels). GPU time per call from ``torch.profiler`` (all kernels of a call summed); inputs are
rotated over enough copies to exceed the L2 cache. GB/s: the bytes the kernel must move (two
addends and the weight read, two outputs written) over that time. Each is checked against an
fp32 torch reference (max error over the largest value).
"""

from __future__ import annotations

import argparse
import json

from .kernels import int_list, markdown_table, require_cuda_gpu

WIDTHS = (576, 2048, 2304)
ROWS = (1, 256, 2048)
ROTATE_BYTES = 256 << 20


def norm_kernel(d: int, dtype: str = "float16", add: bool = True, gemma: bool = False):
    """``add_rms_norm`` (outputs ``(out, sum)``) or, without ``add``, ``rms_norm`` over
    ``(1, n, d)`` rows, as ``FuseAddRMSNorm`` builds them (fp32 statistics, the row scaled in
    fp32; Gemma's ``1 + w``)."""
    import tvm
    from tvm import relax, tirx

    from ..relax_passes.fuse_add_rms_norm import _kernel

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((1, n, d), dtype))
    r = relax.Var("r", relax.TensorType((1, n, d), dtype)) if add else None
    w = relax.Var("w", relax.TensorType((d,), dtype))
    func, _ = _kernel(x, r, w, gemma, 1e-5, "float32", dtype)
    return func["add_rms_norm"] if isinstance(func, tvm.IRModule) else func


def build_norm(func, profile=None, vector: bool | None = None):
    """``func`` scheduled by :class:`FusedRMSNorm` for ``profile`` (default CUDA's) and compiled
    for ``cuda -arch=sm_90``; ``vector`` sets ``VECTOR_LOADS`` for this build (None: as it is)."""
    import tvm

    from ..schedules import fused_norm
    from ..schedules.profiles import CUDA
    from ..target import parse_target

    target = parse_target("cuda -arch=sm_90")
    own = fused_norm.VECTOR_LOADS
    fused_norm.VECTOR_LOADS = own if vector is None else vector
    try:
        sch = fused_norm.FusedRMSNorm(profile or CUDA).apply(func, target, False)
    finally:
        fused_norm.VECTOR_LOADS = own
    mod = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target)


def bench(widths=WIDTHS, rows=ROWS, progress=print, iters: int = 100) -> list[dict]:
    import numpy as np
    import torch
    import tvm_ffi

    from ..gpu_time import torch_kernels

    out_rows = []
    for d in widths:
        fns = {name: build_norm(norm_kernel(d), vector=on)["main"]
               for name, on in (("vectors", True), ("columns", False))}
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(d, generator=g, device="cuda") * 0.5).half()
        for m in rows:
            nbytes = 4 * m * d * 2 + d * 2  # x, r read; out, total written; the weight
            copies = max(1, min(64, -(-ROTATE_BYTES // (2 * m * d * 2))))
            xs = [torch.randn((1, m, d), generator=g, device="cuda").half() for _ in range(copies)]
            rs = [torch.randn((1, m, d), generator=g, device="cuda").half() for _ in range(copies)]
            out, total = torch.empty_like(xs[0]), torch.empty_like(xs[0])
            s = (xs[0] + rs[0]).float()
            ref = (s * torch.rsqrt((s * s).mean(-1, keepdim=True) + 1e-5) * w.float())
            row = {"width": d, "rows": m, "bytes": nbytes}
            tw, to, tt = (tvm_ffi.from_dlpack(a) for a in (w, out, total))
            tx = [tvm_ffi.from_dlpack(a) for a in xs]
            tr = [tvm_ffi.from_dlpack(a) for a in rs]
            calls = {name: (lambda i, f=f: f(tx[i], tr[i], tw, to, tt)) for name, f in fns.items()}
            calls["torch"] = lambda i: torch.nn.functional.rms_norm(xs[i] + rs[i], (d,), w, 1e-5)
            for name, call in calls.items():
                got = call(0)
                got = (out if got is None else got).float()
                err = float((got - ref).abs().max() / ref.abs().max())
                for i in range(min(copies, 4)):
                    call(i)
                found, _, _ = torch_kernels(lambda: [call(i % copies) for i in range(iters)], iters)
                us = sum(k["us"] for k in found.values())
                row[name] = {"gpu_us": us, "gb_s": nbytes / (us * 1e-6) / 1e9, "rel_err": err,
                             "kernels": len(found)}
            progress(format_row(row))
            out_rows.append(row)
            del xs, rs
            torch.cuda.empty_cache()
    return out_rows


def format_row(r: dict) -> str:
    cells = [str(r["width"]), str(r["rows"]), f"{r['bytes'] / 1e6:.2f}"]
    for name in ("vectors", "columns", "torch"):
        x = r[name]
        cells.append(f"{x['gpu_us']:.2f} us / {x['gb_s']:.0f} GB/s")
    cells.append(f"{r['columns']['gpu_us'] / r['vectors']['gpu_us']:.2f}x")
    cells.append(f"{max(r[n]['rel_err'] for n in ('vectors', 'columns')):.1e}")
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict]) -> str:
    head = ("| D | rows | MB moved | vectors (`VECTOR_LOADS`, the default) | columns | "
            "torch add + rms_norm | columns / vectors | max rel err |")
    return markdown_table(head, [format_row(r) for r in rows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.norm",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int_list, default=",".join(map(str, WIDTHS)))
    ap.add_argument("--rows", type=int_list, default=",".join(map(str, ROWS)))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    widths = args.widths
    rows = args.rows
    require_cuda_gpu("bench.norm")
    result = bench(widths, rows)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": result}, f, indent=1)


if __name__ == "__main__":
    main()
