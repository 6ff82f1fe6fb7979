"""Decode attention, kernel by kernel, next to PyTorch's SDPA on the same GPU (GB/s of K/V).

    python -m tvm_lite.bench.attention [--shapes 9x3x64,32x8x64,8x1x256,14x2x64,32x8x128]
                                       [--contexts 512,2048,8192] [--json out.json]
                                       [--baseline-kernel a.py,b.py]

For each (heads, kv_heads, head_dim) and context ``m`` (fp16, one query token, the in-place cache
layout ``(m, kv_heads, head_dim)``, the model's merged-heads output) it times

* ``split-K``: tvm_lite's decode kernel for the CUDA profile (``schedules/gpu_attention_decode.py``:
  keys split across workgroups, the query heads of a kv head together, then a merge kernel);
* ``per-head``: the kernel it replaced (one workgroup per query head, ``gpu_attention.py``);
* ``SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` (``enable_gqa``) on K/V in its
  preferred ``(1, kv_heads, m, head_dim)`` layout;
* each ``--baseline-kernel`` file (another version of ``schedules/gpu_attention_decode.py``,
  e.g. a copy with one constant changed): the split-K kernel it builds, under the file's name;

and, as the floor any kernel reading these bytes stands on, ``copy``: a device-to-device copy of
K alone (``K+V / 2`` bytes read and as many written: the attention's traffic) over the same
rotated buffers, timed the same way. Issue 17's target, K+V bytes / time >= 50% of the copy
bandwidth, is a time (``target us`` = 2 K+V / copy bandwidth); where even the copy of the same
bytes takes longer than that, no kernel that reads them meets it on this GPU. (The copy writes
one destination again and again, which stays in L2: if anything it is timed fast.)

It checks the split-K output against an fp32 torch reference. Time is GPU kernel time per call
(``torch.profiler``, all kernels of a call summed) -- what the kernel costs inside a step whose
launches are queued ahead -- and, beside it, the wall time per call of back-to-back calls. K/V
are rotated over enough copies to exceed the L2 cache, so the bytes come from HBM. GB/s = K+V
bytes / kernel time, next to the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .kernels import (add_baseline_arguments, baseline_kernels, int_list, nvtx_name,
                      require_cuda_gpu)

SHAPES = ((9, 3, 64), (32, 8, 64), (8, 1, 256), (14, 2, 64), (32, 8, 128))
CONTEXTS = (512, 2048, 8192)
ROTATE_BYTES = 256 << 20  # K/V copies cycled through per case (> the H200's 50 MB L2)
MAX_COPIES = 256


def _kernels(heads: int, kv: int, d: int, target, baselines=()) -> dict:
    """{"split-K": PrimFunc, "per-head": PrimFunc, <baseline name>: PrimFunc ..} of this shape
    for the CUDA profile; ``baselines``: paths of other versions of ``gpu_attention_decode.py``,
    each built by the same rule with its ``decode_kernel`` (named for the file)."""
    from ..relax_passes.fuse_attention import attention_params, reference_kernel
    from ..schedules import gpu_attention
    from ..schedules.gpu_attention import Attention
    from .kernels import schedule_version

    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, False, True,
                         merged_heads=True, kv_squeezed=kv == 1)
    found = [("split-K", Attention().apply(reference_kernel(p), target, False).mod["main"]),
             ("per-head", gpu_attention.decode_kernel(p, gpu_attention.TILES["cuda"], 1024))]
    own = gpu_attention.split_decode_kernel
    for path in baselines:
        gpu_attention.split_decode_kernel = schedule_version(path).decode_kernel
        try:
            found.append((Path(path).stem,
                          Attention().apply(reference_kernel(p), target, False).mod["main"]))
        finally:
            gpu_attention.split_decode_kernel = own
    return {name: f.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", "attn")
            for name, f in found}


def _time(call, copies: int, iters: int) -> dict:
    """GPU kernel µs per call (torch.profiler; in all and per kernel name) and wall µs per call of
    ``call(i)``."""
    import torch

    from ..gpu_time import torch_kernels

    for i in range(min(copies, 8)):
        call(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(iters):
        call(i % copies)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters
    found, _, _ = torch_kernels(lambda: [call(i % copies) for i in range(iters)], iters)
    kernels = {name: k["us"] for name, k in found.items()}
    return {"gpu_us": sum(kernels.values()), "wall_us": wall * 1e6, "kernels": kernels}


def copy_bandwidth_torch(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy GB/s (bytes read + written), CUDA events."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def bench_case(heads, kv, d, contexts, built, iters: int = 200) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import tvm_ffi

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in contexts:
        kv_bytes = 2 * m * kv * d * 2
        copies = max(1, min(MAX_COPIES, -(-ROTATE_BYTES // kv_bytes)))
        shape = (m, d) if kv == 1 else (m, kv, d)
        ks = [torch.randn(shape, generator=g, device="cuda", dtype=torch.float16)
              for _ in range(copies)]
        vs = [torch.randn(shape, generator=g, device="cuda", dtype=torch.float16)
              for _ in range(copies)]
        q = torch.randn((1, heads, 1, d), generator=g, device="cuda", dtype=torch.float16)
        mask = torch.zeros((1, 1, 1, m), device="cuda", dtype=torch.float16)
        out = torch.empty((1, 1, heads * d), device="cuda", dtype=torch.float16)
        # SDPA's preferred layout: (1, KV, m, D), contiguous
        ks_t = [k.reshape(m, kv, d).permute(1, 0, 2).contiguous()[None] for k in ks]
        vs_t = [v.reshape(m, kv, d).permute(1, 0, 2).contiguous()[None] for v in vs]
        # fp32 reference of copy 0
        k32 = ks_t[0].float().repeat_interleave(heads // kv, dim=1)
        v32 = vs_t[0].float().repeat_interleave(heads // kv, dim=1)
        ref = torch.softmax(q.float() @ k32.transpose(-1, -2) * d ** -0.5, -1) @ v32
        ref = ref.reshape(1, 1, heads * d)
        tq, tmask, tout = (tvm_ffi.from_dlpack(x) for x in (q, mask, out))
        tk = [tvm_ffi.from_dlpack(x) for x in ks]
        tv = [tvm_ffi.from_dlpack(x) for x in vs]
        row = {"heads": heads, "kv_heads": kv, "head_dim": d, "context": m,
               "kv_bytes": kv_bytes, "copies": copies}
        for name, fn in built.items():
            fn(tq, tk[0], tv[0], tmask, tout)
            torch.cuda.synchronize()
            err = float((out.float() - ref).abs().max())
            with torch.cuda.nvtx.range(nvtx_name("decode", f"{heads}-{kv}-{d}", f"m{m}", name)):
                timed = _time(lambda i: fn(tq, tk[i], tv[i], tmask, tout), copies, iters)
            row[name] = dict(timed, max_abs_err=err)
        sdpa = lambda i: F.scaled_dot_product_attention(q, ks_t[i], vs_t[i],  # noqa: E731
                                                        enable_gqa=kv != heads)
        got = sdpa(0).reshape(1, 1, heads * d).float()
        row["SDPA"] = dict(_time(sdpa, copies, iters), max_abs_err=float((got - ref).abs().max()))
        dst = torch.empty_like(ks[0])
        row["copy"] = _time(lambda i: dst.copy_(ks[i]), copies, iters)
        for name in (*built, "SDPA", "copy"):
            us = row[name]["gpu_us"]  # 0 where no profiler could attach (under ncu)
            row[name]["gb_s"] = kv_bytes / (us * 1e-6) / 1e9 if us else float("nan")
        rows.append(row)
        del ks, vs, ks_t, vs_t
        torch.cuda.empty_cache()
    return rows


def run(shapes=SHAPES, contexts=CONTEXTS, progress=print, baselines=()) -> dict:
    import tvm

    from ..target import parse_target

    target = parse_target("cuda -arch=sm_90")
    copy = copy_bandwidth_torch()
    progress(f"copy bandwidth {copy:.0f} GB/s")
    result = {"copy_gb_s": copy, "rows": [], "baselines": [Path(b).stem for b in baselines]}
    for heads, kv, d in shapes:
        t0 = time.perf_counter()
        built = {}
        kernels = _kernels(heads, kv, d, target, baselines)
        for name, f in kernels.items():
            ex = tvm.compile(tvm.IRModule({"attn": f}), target=target)
            built[name] = ex["attn"]
        same = [Path(b).stem for b in baselines
                if kernels[Path(b).stem].script() == kernels["split-K"].script()]
        if same:  # (a constant that does not apply to this shape, or a sed that did not match)
            progress(f"({heads},{kv},{d}): {', '.join(same)} build the same kernel as split-K")
        progress(f"({heads},{kv},{d}) compiled in {time.perf_counter() - t0:.0f} s")
        rows = bench_case(heads, kv, d, contexts, built)
        result["rows"] += rows
        for r in rows:
            progress(format_row(r, copy, result["baselines"]))
    return result


NAMES = ("split-K", "per-head", "SDPA")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def target_us(kv_bytes: int, copy_gb_s: float) -> float:
    """Issue 17's decode-attention target as a time: K+V bytes at 50% of the copy bandwidth."""
    return kv_bytes / (0.5 * copy_gb_s * 1e9) * 1e6


def format_row(r: dict, copy: float, baselines=()) -> str:
    cells = [f"({r['heads']},{r['kv_heads']},{r['head_dim']})", str(r["context"]),
             f"{r['kv_bytes'] / 1e6:.2f}"]
    for n in NAMES:
        x = r[n]
        cells.append(f"{x['gpu_us']:.1f} us / {x['wall_us']:.1f} us / {x['gb_s']:.0f} GB/s "
                     f"({100 * x['gb_s'] / copy:.0f}%)")
    cells.append(f"{_ratio(r['SDPA']['gpu_us'], r['split-K']['gpu_us']):.2f}x")
    cells.append(f"{r['split-K']['max_abs_err']:.1e}")
    cells.append(f"{target_us(r['kv_bytes'], copy):.2f}")
    if "copy" in r:  # (rows of runs before the copy column have none)
        x = r["copy"]
        cells.append(f"{x['gpu_us']:.1f} us ({100 * x['gb_s'] / copy:.0f}%)")
    else:
        cells.append("--")
    for b in baselines:  # each baseline: GPU us, SDPA / it, its error
        x = r[b]
        cells.append(f"{x['gpu_us']:.1f} us, {_ratio(r['SDPA']['gpu_us'], x['gpu_us']):.2f}x, "
                     f"{x['max_abs_err']:.1e}")
    return "| " + " | ".join(cells) + " |"


def format_table(result: dict) -> str:
    bases = result.get("baselines", [])
    head = ("| (H, KV, D) | context | K+V MB | split-K: GPU / wall / GB/s (% copy) | "
            "per-head (before) | SDPA | SDPA / split-K | split-K max err | target us (50%) | "
            "copy of the same bytes: GPU (% copy) |"
            + "".join(f" {b}: GPU, SDPA / it, err |" for b in bases))
    lines = [f"copy bandwidth {result['copy_gb_s']:.0f} GB/s", head,
             "|" + "---|" * (10 + len(bases))]
    lines += [format_row(r, result["copy_gb_s"], bases) for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.attention",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    ap.add_argument("--contexts", type=int_list, default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--json", default=None)
    add_baseline_arguments(ap, "gpu_attention_decode", "maskkv:MASK_WITH_KV=True")
    args = ap.parse_args(argv)
    baselines = baseline_kernels(ap, args, "gpu_attention_decode")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for h, kv, d in shapes:
        if h % kv:
            raise SystemExit(f"bench.attention: {h} heads are not a multiple of {kv} kv heads")
    require_cuda_gpu("bench.attention")
    result = run(shapes, args.contexts, baselines=baselines)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
