"""Decode GEMV thread shapes swept on the GPU, weights too many to stay in L2.

``python -m tvm_lite.bench.gemv_plans [--plans 4x1,4x8,...] [--json FILE]``

For Llama-1B's decode GEMVs (E0M4, fp16 ``x``, ``M = 1``) each plan -- ``TNxKS``: threads along
``N``, splits of ``K`` (summed in the same kernel by the last workgroup of a column tile) -- is
built, checked against numpy on a column slice, and timed on ``COPIES`` sets of weights called in
turn (more bytes than the H200's 50 MB L2, as in a real step, where every layer's weights are
new); the GPU time per call is the kernels' own time from torch.profiler's CUDA activity. The
first row of each layer is the rule's own plan (``default``).

Measured on the H200 (``results/issue17_gemv_split_sweep_s15.json``): the rule's plan was the
fastest or within 9% on every layer (o 4.41 us against 4.05 for 4x8, q/k/v 4.66 against 4.40,
down 7.25 against 6.81 for 16x8; gate/up 7.69 us, every split slower). Gains that small, alone,
did not justify another plan; the rule's plan stands.
"""

from __future__ import annotations

import json

import numpy as np

LAYERS = [(2048, 2048, "o"), (2048, 3072, "q/k/v"), (8192, 2048, "down"), (2048, 16384, "gate/up")]
PLANS = ("4x2", "4x4", "4x8", "8x4", "8x8", "16x8", "32x8")
COPIES = 24  # weight sets called in turn (Llama-1B's gate/up: 24 x 17 MB)
ROUNDS = 8


def sweep(plans=PLANS, layers=LAYERS, progress=print) -> list[dict]:
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
    todo = [(layer, plan) for layer in layers for plan in (None, *plans)]
    bar = tqdm(todo, desc="gemv plans", unit="plan")
    sets = {}
    for (k, n, name), plan in bar:
        if (k, n) not in sets:
            sets.clear()
            host = [weights("e0m4", k, n, rng) for _ in range(COPIES)]
            sets[(k, n)] = (host, [[tvm.runtime.tensor(a, dev) for a in s.values()] for s in host])
        host, on_dev = sets[(k, n)]
        forced = tuple(int(v) for v in plan.split("x")) if plan else None
        rule = GPUDecodeGEMV(cuda, forced=forced)
        func = kernel_func("e0m4", [1, 1], k, n)
        with target:
            sch = rule.apply(func, target, False)
        if sch is None:
            progress(f"{name} {plan}: the plan does not divide the layer")
            continue
        f = build(func, target, [rule, *rules_for(target)])["main"]
        x = tvm.runtime.tensor(random_half((1, 1, k), rng), dev)
        out = tvm.runtime.empty((1, 1, n), "float16", dev)
        for s in on_dev[:3]:
            f(x, *s, out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ROUNDS):
                for s in on_dev:
                    f(x, *s, out)
            torch.cuda.synchronize()
        cols = min(n, 512)
        ref = reference("e0m4", x.numpy(), host[-1], k, cols)
        got = out.numpy().reshape(-1, n)[:, :cols].astype(np.float32)
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        us = sum(e.device_time for e in kernels) / (ROUNDS * COPIES)
        nbytes = sum(a.nbytes for a in host[0].values())
        shape = rule.plan(n, k, target=target)
        rows.append(dict(layer=name, K=k, N=n, plan=plan or "default", shape=shape, us=us,
                         tb_s=nbytes / us / 1e6, kernels=len({e.name for e in kernels}),
                         err=float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))))
        bar.set_postfix_str(f"{name} {plan or 'default'} {us:.2f} us")
    return rows


def format_table(rows) -> str:
    lines = ["| layer KxN | plan (tn x ks) | tn / tk / ks | workgroups | us | TB/s | err |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        groups = r["N"] // (s["vec"] * s["tn"]) * s["ks"]
        lines.append(f"| {r['layer']} {r['K']}x{r['N']} | {r['plan']} | {s['tn']} / {s['tk']} / "
                     f"{s['ks']} | {groups} | {r['us']:.2f} | {r['tb_s']:.2f} | {r['err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.gemv_plans", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default=",".join(PLANS), help="TNxKS plans besides the rule's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = sweep(tuple(p for p in args.plans.split(",") if p))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
