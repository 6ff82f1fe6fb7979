"""Kernels a greedy decode step launches, counted in the build of a real model shape (no GPU).

    python -m tvm_lite.bench.kernel_count --shapes llama-3.2-1b,gemma-2b [--target "cuda -arch=sm_90"]

Each shape of :data:`tvm_lite.bench.models.SHAPES` is built twice with random weights, E0M4 and
fp16 activations (as ``bench.models`` builds ``tvm_lite-e0m4``), with 1 and with 2 layers: the
kernels of a layer are the difference, and the rest are launched once a step. A one-by-one greedy
step runs ``step_inputs``, ``decode`` and ``greedy_token``; the whole step of the full model is
``layers x per layer + once``. Counts come from the build (``tvm_lite.profile.kernel_launches``:
the PrimFunc calls of each function, each expanded to its device kernels), so no device is
needed; on CUDA ``tvm-lite profile`` counts the same launches at run time. Issue 17's target is
``8 x layers + 6``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STEP_FUNCTIONS = ("step_inputs", "decode", "greedy_token")
LAYER_COUNTS = (1, 2)


def count_shape(shape: str, target: str, work_dir, progress=print) -> dict:
    """{"per_layer", "once", "layers", "step", "target", "kernels": {layers: {function: {..}}}}."""
    import tvm_lite

    from ..export import export_onnx
    from ..profile import kernel_launches
    from ..quant.quantize import quantize_module, tokenizer_of
    from ..target import parse_target
    from ..tune import weights_as_built
    from . import models

    kernels = {}
    for layers in LAYER_COUNTS:
        name = f"{shape}-{layers}-layers"
        models.SHAPES.setdefault(name, dict(models.SHAPES[shape], num_hidden_layers=layers))
        work = Path(work_dir) / name
        progress(f"{name}: export, E0M4, build for {target}")
        onnx_dir = export_onnx(models.random_model(name, work / "hf"), work / "onnx",
                               dtype="float16", progress=lambda _: None)
        mod, _ = quantize_module(tvm_lite.from_onnx(onnx_dir / "model.onnx"),
                                 models._quant("e0m4"), tokenizer_of(onnx_dir),
                                 progress=lambda *_: None)
        mod = weights_as_built(mod, parse_target(target), log=None)  # as its build lays them out
        mod = tvm_lite.detach_params(mod)[0]
        ex = tvm_lite.build(mod, target)
        kernels[layers] = {fn: kernel_launches(ex, fn) for fn in STEP_FUNCTIONS}
    total = {n: sum(sum(k.values()) for k in kernels[n].values()) for n in LAYER_COUNTS}
    per_layer = total[2] - total[1]
    once = total[1] - per_layer
    layers = models.SHAPES[shape]["num_hidden_layers"]
    return {"per_layer": per_layer, "once": once, "layers": layers,
            "step": layers * per_layer + once, "target": 8 * layers + 6,
            "once_by_function": {fn: sum(kernels[1][fn].values()) - (per_layer if fn == "decode"
                                                                      else 0)
                                 for fn in STEP_FUNCTIONS},
            "kernels": kernels}


def main(argv=None) -> None:
    from .generation import format_table

    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.kernel_count",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama-3.2-1b,gemma-2b")
    ap.add_argument("--target", default="cuda -arch=sm_90")
    ap.add_argument("--work-dir", default="bench_models", help="random models and their exports")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out, rows = {}, []
    for shape in args.shapes.split(","):
        res = count_shape(shape, args.target, args.work_dir)
        out[shape] = res
        once = res["once_by_function"]
        rows.append({"shape": shape, "layers": res["layers"], "per layer": res["per_layer"],
                     "once a step": f"{res['once']} ({' + '.join(str(once[f]) for f in STEP_FUNCTIONS)})",
                     "whole step": res["step"], "target 8/layer + 6": res["target"]})
        if args.json:  # rewritten after every shape
            Path(args.json).write_text(json.dumps(out, indent=1))
    print(format_table(rows, list(rows[0])))
    print(f"(once a step: {' + '.join(STEP_FUNCTIONS)})")


if __name__ == "__main__":
    main()
