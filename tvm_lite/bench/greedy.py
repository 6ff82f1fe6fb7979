"""The greedy token's kernel on a GPU, with and without ``GPUScalarReduction``.

    TVM_CUDA_COMPILE_MODE=nvcc python -m tvm_lite.bench.greedy [--target "cuda -arch=sm_90"] [--vocab 49152]

Builds ``greedy_token`` (``relax_passes/add_step_helpers.py``: the argmax of one row of logits,
one reduction of (index, value) pairs) twice for the target: with tvm_lite's GPU rules as they
are, and without ``GPUScalarReduction`` (DLight's own rules then take it). Checks both against
numpy (a tie included) and prints the median time of a call; ``--vocab 256000`` is the Gemma
shape (issue 17: <= 10 us). On the H200 (vocab 49,152, fp16), when the argmax was a max and a
first-index reduction (two kernels): 2,649 us without the rule (gpu.Fallback, one thread over
the row), 44 us with it. The argmax now (up to 128 slices side by side, then their maxima):
3.2 us of GPU time a call at vocab 256,000 (the ``GPU us per call`` column, torch.profiler).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..gpu_time import init_torch_cuda
from .kernels import require_cuda_gpu


def _gpu_us(call, dev, calls: int) -> float | None:
    """Kernel time per call on a CUDA device, from torch.profiler's CUDA activity (which records
    TVM's kernels too); None without torch's CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if dev.dlpack_device_type() != 2 or not torch.cuda.is_available():  # 2: kDLCUDA
        return None
    from ..gpu_time import torch_kernels

    kernels, _, _ = torch_kernels(lambda: [call() for _ in range(calls)], calls)
    return sum(k["us"] for k in kernels.values())


def bench(target: str = "cuda -arch=sm_90", device: str = "cuda", vocab: int = 49152,
          calls: int = 50) -> list[dict]:
    if device == "cuda":
        init_torch_cuda()  # first, as tvm_lite.profile does (without it the GPU-time column stays empty)
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from tvm_lite import schedules
    from tvm_lite.convention import GREEDY_TOKEN
    from tvm_lite.relax_passes.add_step_helpers import add_greedy_token
    from tvm_lite.schedules.gpu_scalar_reduction import GPUScalarReduction
    from tvm_lite.target import parse_target

    bb = relax.BlockBuilder()
    add_greedy_token(bb, vocab, "float16")
    mod = bb.get()
    tgt = parse_target(target)
    dev = tvm.device(device, 0)
    x = np.random.default_rng(0).standard_normal((1, 4, vocab)).astype("float16")
    x[0, 3, 7] = x[0, 3, vocab - 9] = 30  # a tie: the first index wins, as in numpy
    xs = tvm.runtime.tensor(x, dev)
    rules = schedules.rules_for(tgt)
    rows = []
    for name, use in (("without GPUScalarReduction",
                       [r for r in rules if not isinstance(r, GPUScalarReduction)]),
                      ("GPUScalarReduction", rules)):
        with tgt:
            built = tvm.transform.Sequential([
                relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(), relax.transform.FuseTIR(),
                dl.ApplyDefaultSchedule(*use)])(mod)
            vm = relax.VirtualMachine(tvm.compile(built, target=tgt), dev)
        f = vm[GREEDY_TOKEN]
        got = [int(f(xs, tvm.runtime.ShapeTuple([i])).numpy()[0]) for i in range(4)]
        for _ in range(5):
            f(xs, tvm.runtime.ShapeTuple([3]))
        dev.sync()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            f(xs, tvm.runtime.ShapeTuple([3]))
            dev.sync()
            times.append(time.perf_counter() - t0)
        rows.append({"schedule": name, "us per call (median)": float(np.median(times) * 1e6),
                     "min us": float(min(times) * 1e6),
                     "GPU us per call": _gpu_us(lambda: f(xs, tvm.runtime.ShapeTuple([3])),
                                                dev, calls),
                     "argmax = numpy": got == [int(np.argmax(x[0, i])) for i in range(4)]})
    return rows


def main(argv=None) -> int:
    from .generation import format_table

    p = argparse.ArgumentParser(prog="python -m tvm_lite.bench.greedy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="cuda -arch=sm_90")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, default=49152)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        require_cuda_gpu("bench.greedy")
    rows = bench(args.target, args.device, args.vocab)
    print(format_table(rows, list(rows[0])))
    return 0 if all(r["argmax = numpy"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
