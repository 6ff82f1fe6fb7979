"""Decode GEMV thread shapes swept on the GPU, weights too many to stay in L2.

``python -m tvm_lite.bench.gemv_plans [--model llama-3.2-1b|gemma-2b|smollm2-135m]
[--plans 4x1,4x8,...] [--json FILE]``

For a model's decode GEMVs (default Llama-1B's; the shapes of ``bench.prefill.GEMM_MODELS``;
E0M4, fp16 ``x``, ``M = 1``) each plan -- ``TNxKS``: threads along ``N``, splits of ``K``
(summed in the same kernel by the last workgroup of a column tile) -- is built, checked
against numpy on a column slice, and timed on ``COPIES`` sets of weights called in
turn (more bytes than the H200's 50 MB L2, as in a real step, where every layer's weights are
new); the GPU time per call is the kernels' own time from torch.profiler's CUDA activity. The
first row of each layer is the rule's own plan (``default``). The layers whose input is a
normalized row (q/k/v, gate/up) are timed twice: as plain GEMVs, and with the RMSNorm as the
kernel's prologue (``prologue = norm``), the kernel the decode step runs.

Measured on the H200 (``results/issue17_gemv_split_sweep_s15.json``): the rule's plan was the
fastest or within 9% on every layer (o 4.41 us against 4.05 for 4x8, q/k/v 4.66 against 4.40,
down 7.25 against 6.81 for 16x8; gate/up 7.69 us, every split slower). Gains that small, alone,
did not justify another plan; the rule's plan stands. (That run had no prologue rows: in the
step, with its norm, the gate/up GEMV took 10.4 us.)
"""

from __future__ import annotations

import json
import re

import numpy as np


def layers_for(model: str) -> list[tuple[int, int, str]]:
    """``[(K, N, layer)]``: a model's four decode GEMVs as the step runs them (q, k and v merged,
    gate and up merged), shapes from :data:`tvm_lite.bench.prefill.GEMM_MODELS`."""
    from tvm_lite.bench.prefill import GEMM_MODELS

    hidden, heads, kv, hd, inter = GEMM_MODELS[model]
    return [(heads * hd, hidden, "o"), (hidden, (heads + 2 * kv) * hd, "q/k/v"),
            (inter, hidden, "down"), (hidden, 2 * inter, "gate/up")]


LAYERS = layers_for("llama-3.2-1b")
NORM_LAYERS = ("q/k/v", "gate/up")  # their input is a normalized row: timed with it fused too
PLANS = ("4x2", "4x4", "4x8", "8x4", "8x8", "16x8", "32x8")
COPIES = 24  # weight sets called in turn (Llama-1B's gate/up: 24 x 17 MB)
ROUNDS = 8
EPS = 1e-5  # the norm's epsilon in norm_dequant_gemv


def norm_dequant_gemv(k: int, n: int, gemma: bool = False, residual: bool = False):
    """``y = RMSNorm(s) @ W`` in fp16 as Llama's fp16 exports spell it (the row normalized in fp32,
    cast back, times the weight), W 4-bit (E0M4 g32). ``gemma``: as Gemma's spell it (times
    ``1 + w`` in fp32, then cast back). ``residual``: ``s`` is ``x + r``, returned too."""
    from tvm import relax

    from tvm_lite.quant.kernels import matmul_func

    bb = relax.BlockBuilder()
    rows = [relax.Var(v, relax.TensorType((1, 1, k), "float16"))
            for v in (("x", "r") if residual else ("s",))]
    w = relax.Var("w", relax.TensorType((k,), "float16"))
    codes = relax.Var("codes", relax.TensorType((k // 4, n), "uint16"))
    scale = relax.Var("scale", relax.TensorType((k // 32, n), "float16"))
    zero = relax.Var("zero", relax.TensorType((k // 32, n), "float16"))
    op = relax.op
    with bb.function("decode", [*rows, w, codes, scale, zero]):
        with bb.dataflow():
            s = bb.emit(op.add(*rows)) if residual else rows[0]
            sf = bb.emit(op.astype(s, "float32"))
            m = bb.emit(op.mean(op.power(sf, relax.const(2.0, "float32")), axis=[-1], keepdims=True))
            inv = bb.emit(op.rsqrt(op.add(m, relax.const(EPS, "float32"))))
            if gemma:
                w1 = op.add(op.astype(w, "float32"), relax.const(1.0, "float32"))
                h = bb.emit(op.astype(bb.emit(op.multiply(op.multiply(sf, inv), w1)), "float16"))
            else:
                h = bb.emit(op.multiply(w, op.astype(op.multiply(sf, inv), "float16")))
            gv = bb.add_func(matmul_func("e0m4", [1, 1], k, n, 32, "float16"), "e0m4_matmul")
            y = bb.emit(relax.call_tir(gv, [h, codes, scale, zero],
                                       relax.TensorType((1, 1, n), "float16")))
            out = bb.emit_output(relax.Tuple([y, s]) if residual else y)
        bb.emit_func_output(out)
    return bb.get()


def lower_gemv_prologue(mod, gpu: bool = True) -> tuple:
    """``mod`` through the pipeline's fusions (phase 1) and phase 2 up to the GEMV prologues, as
    ``compile_model`` runs them: ``(module, the number of producer/GEMV pairs fused)``."""
    import tvm
    from tvm import relax

    from tvm_lite.pipeline import gemv_prologue_passes
    from tvm_lite.relax_passes import FuseAddRMSNorm, FuseGEMVPrologue, FuseSiluMul

    mod = FuseSiluMul()(FuseAddRMSNorm(norm_before_gemv=gpu)(mod))
    seq = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
           relax.transform.FuseOps(), relax.transform.FuseTIR()]
    mod = tvm.transform.Sequential(seq)(mod)
    count = 0
    for p in gemv_prologue_passes(gpu):
        mod = p(mod)
        count += p.count if isinstance(p, FuseGEMVPrologue) else 0
    return mod, count


def norm_gemv_func(k: int, n: int, gemma: bool = False):
    """The fused RMSNorm + E0M4 GEMV PrimFunc the pipeline makes of Llama's fp16 norm before a
    projection (``gemma``: Gemma's, times ``1 + w``; params: the row ``s``, the norm weight,
    codes, scale, zero, the output)."""
    from tvm import relax, tirx

    mod, fused = lower_gemv_prologue(norm_dequant_gemv(k, n, gemma=gemma))
    (func,) = [f for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("fused")]
    assert fused >= 1 and len(func.params) == 6, (fused, len(func.params))
    # the params in the order the bench passes them (Gemma's fusion puts the norm weight first)
    calls = []
    relax.analysis.post_order_visit(mod["decode"].body, lambda e: calls.append(e) if (
        isinstance(e, relax.Call) and e.op.name == "relax.call_tir") else None)
    names = [a.name for a in calls[0].args[1].fields]
    order = [names.index(v) for v in ("s", "w", "codes", "scale", "zero")] + [5]
    func = tirx.PrimFunc([func.params[i] for i in order], func.body, func.ret_type, func.attrs)
    return func.with_attr("global_symbol", "main")


def _norm_row(s: np.ndarray, w: np.ndarray, gemma: bool = False) -> np.ndarray:
    """What the fused kernel multiplies by W: Llama's fp16 RMSNorm, rounded where it rounds
    (``gemma``: Gemma's, ``1 + w`` in fp32, one rounding at the end)."""
    sf = s.astype(np.float32).reshape(-1)
    if gemma:
        h = sf / np.sqrt((sf * sf).mean() + EPS) * (w.astype(np.float32) + 1)
        return h.astype(np.float16).reshape(1, 1, -1)
    h = (sf / np.sqrt((sf * sf).mean() + EPS)).astype(np.float16).astype(np.float32)
    return (h * w.astype(np.float32)).astype(np.float16).reshape(1, 1, -1)


def sweep(plans=PLANS, layers=LAYERS, progress=print, gemma: bool = False) -> list[dict]:
    """A row per (layer, prologue, plan): the rule's plan first, then ``plans``; the layers whose
    input is a normalized row (q/k/v, gate/up) also with the RMSNorm as the kernel's prologue
    (``prologue="norm"``; ``gemma``: Gemma's norm), as the decode step runs them."""
    import torch
    import tvm
    from torch.profiler import ProfilerActivity, profile
    from tqdm import tqdm

    from tvm_lite.bench.kernels import build, kernel_func, random_half, reference, weights
    from tvm_lite.schedules import gpu_profile, rules_for
    from tvm_lite.schedules.gpu_gemv import GPUDecodeGEMV
    from tvm_lite.target import local_cuda_target, parse_target

    target = parse_target(local_cuda_target())
    cuda = gpu_profile("cuda")
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    rows = []
    todo = [(layer, prologue, plan) for layer in layers
            for prologue in ("none", "norm")[:1 + (layer[2] in NORM_LAYERS)]
            for plan in (None, *plans)]
    bar = tqdm(todo, desc="gemv plans", unit="plan")
    sets = {}
    for (k, n, name), prologue, plan in bar:
        if (k, n) not in sets:
            sets.clear()
            host = [weights("e0m4", k, n, rng) for _ in range(COPIES)]
            sets[(k, n)] = (host, [[tvm.runtime.tensor(a, dev) for a in s.values()] for s in host])
        host, on_dev = sets[(k, n)]
        forced = tuple(int(v) for v in plan.split("x")) if plan else None
        rule = GPUDecodeGEMV(cuda, forced=forced)
        func = (norm_gemv_func(k, n, gemma) if prologue == "norm"
                else kernel_func("e0m4", [1, 1], k, n))
        with target:
            sch = rule.apply(func, target, False)
        if sch is None:
            progress(f"{name} {prologue} {plan}: the plan does not divide the layer")
            continue
        f = build(func, target, [rule, *rules_for(target)])["main"]
        row = random_half((1, 1, k), rng)
        lead = [row]
        x = row
        if prologue == "norm":
            norm_w = random_half((k,), rng)
            lead = [row, norm_w]
            x = _norm_row(row, norm_w, gemma)
        lead = [tvm.runtime.tensor(a, dev) for a in lead]
        out = tvm.runtime.empty((1, 1, n), "float16", dev)
        for s in on_dev[:3]:
            f(*lead, *s, out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ROUNDS):
                for s in on_dev:
                    f(*lead, *s, out)
            torch.cuda.synchronize()
        cols = min(n, 512)
        ref = reference("e0m4", x, host[-1], k, cols)
        got = out.numpy().reshape(-1, n)[:, :cols].astype(np.float32)
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        us = sum(e.device_time for e in kernels) / (ROUNDS * COPIES)
        nbytes = sum(a.nbytes for a in host[0].values())
        shape = rule.plan(n, k, target=target, prologue=prologue == "norm")
        rows.append(dict(layer=name, K=k, N=n, prologue=prologue, plan=plan or "default",
                         shape=shape, us=us, tb_s=nbytes / us / 1e6,
                         kernels=len({e.name for e in kernels}),
                         err=float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))))
        bar.set_postfix_str(f"{name} {prologue} {plan or 'default'} {us:.2f} us")
    return rows


def format_table(rows) -> str:
    lines = ["| layer KxN | prologue | plan (tn x ks) | tn / tk / ks | workgroups | us | TB/s | err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        groups = r["N"] // (s["vec"] * s["tn"]) * s["ks"]
        lines.append(f"| {r['layer']} {r['K']}x{r['N']} | {r.get('prologue', 'none')} | "
                     f"{r['plan']} | {s['tn']} / {s['tk']} / "
                     f"{s['ks']} | {groups} | {r['us']:.2f} | {r['tb_s']:.2f} | {r['err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.gemv_plans", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from tvm_lite.bench.prefill import GEMM_MODELS

    ap.add_argument("--model", default="llama-3.2-1b", choices=sorted(GEMM_MODELS),
                    help="whose decode GEMVs (default: Llama-3.2-1B's)")
    ap.add_argument("--plans", default=",".join(PLANS), help="TNxKS plans besides the rule's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    plans = tuple(p for p in args.plans.split(",") if p)
    bad = [p for p in plans if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", p)]
    if bad:
        ap.error(f"--plans: {', '.join(bad)} is not TNxKS (threads along N x splits of K, "
                 "e.g. 4x8)")
    from tvm_lite.bench.kernels import require_cuda_gpu

    require_cuda_gpu("bench.gemv_plans")
    rows = sweep(plans, layers_for(args.model), gemma=args.model.startswith("gemma"))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
