"""CPU decode GEMVs, weights as exported (``W[K, N]``) vs panel-major (``relax_passes/
pack_weight_panels.py``), fp32 and E0M4, SmolLM2-135M's shapes, interleaved.

    python -m tvm_lite.bench.cpu_gemv [--target llvm] [--rounds 7]

Each kernel is built with tvm_lite's CPU rules and called over enough copies of its weights to
exceed the last-level cache (``--rotate-mb``), so every call streams its weights from memory as a
decode step does; the kernels of one shape alternate call batch by call batch, medians of
``--rounds`` batches. GB/s counts the weight bytes (codes, scales and zeros for E0M4).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # q/o, k/v, gate/up, down, lm_head


def _plain_matmul(k: int, n: int):
    from tvm import te

    x = te.placeholder((1, 1, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((1, 1, n), lambda b, i, j: te.sum(x[b, i, r] * w[r, j], axis=r), name="matmul")
    return te.create_prim_func([x, w, y])


def _build(func, target):
    import tvm
    from tvm.s_tir import dlight as dl

    from tvm_lite import schedules

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        mod = dl.ApplyDefaultSchedule(*schedules.rules_for(target))(mod)
        return tvm.compile(mod, target=target)["main"]


def cases(k: int, n: int, target, rng) -> dict:
    """{label: (kernel, weight arrays)} for one shape (E0M4 but for the lm_head, kept fp32)."""
    from tvm_lite.quant import kernels
    from tvm_lite.quant.rtn import rtn
    from tvm_lite.relax_passes.pack_weight_panels import pack_panels
    from tvm_lite.schedules.cpu_target import weight_panel

    panel = weight_panel(target)
    w = rng.standard_normal((k, n)).astype("float32")
    out = {"fp32 [K, N]": (_build(_plain_matmul(k, n), target), [w]),
           "fp32 panels": (_build(kernels.panel_matmul_func([1, 1], k, n, panel), target),
                           [pack_panels(w, panel)])}
    if n < 49152:
        arrays = list(rtn(w, "e0m4", 32).arrays().values())
        out["e0m4 [K, N]"] = (_build(kernels.matmul_func("e0m4", [1, 1], k, n, 32), target), arrays)
        out["e0m4 panels"] = (_build(kernels.matmul_func("e0m4", [1, 1], k, n, 32, panel=panel),
                                     target), [pack_panels(a, panel) for a in arrays])
    return out


def run(target="llvm", rounds: int = 7, rotate_mb: float = 96, calls: int = 20) -> list[dict]:
    import tvm

    from tvm_lite.target import parse_target

    tgt = parse_target(target)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in SHAPES:
        x = tvm.runtime.tensor(rng.standard_normal((1, 1, k)).astype("float32"))
        built = {}
        for label, (func, arrays) in cases(k, n, tgt, rng).items():
            nbytes = sum(a.nbytes for a in arrays)
            copies = [[tvm.runtime.tensor(a) for a in arrays]
                      for _ in range(max(1, int(rotate_mb * 1e6 // nbytes)))]
            built[label] = (func, nbytes, copies, tvm.runtime.empty((1, 1, n), "float32"))
        times = {label: [] for label in built}
        for _ in range(rounds):
            for label, (func, nbytes, copies, out) in built.items():
                count = max(len(copies), calls)
                t0 = time.perf_counter()
                for i in range(count):
                    func(x, *copies[i % len(copies)], out)
                times[label].append((time.perf_counter() - t0) / count)
        for label, (func, nbytes, copies, out) in built.items():
            t = float(np.median(times[label]))
            rows.append({"shape": f"{k}x{n}", "kernel": label, "us": t * 1e6,
                         "GB/s": nbytes / t / 1e9, "MB": nbytes / 1e6})
    return rows


def main(argv=None) -> None:
    from .generation import format_table

    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.cpu_gemv", description=__doc__)
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rotate-mb", type=float, default=96, help="weight copies cycled through")
    args = ap.parse_args(argv)
    rows = run(args.target, args.rounds, args.rotate_mb)
    print(format_table(rows, ["shape", "kernel", "MB", "us", "GB/s"]))


if __name__ == "__main__":
    main()
