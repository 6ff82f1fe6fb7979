"""What the ``tvm-lite`` commands share (``tvm_lite/cli.py`` and ``tvm_lite/rpc/cli.py``):
logging, the model argument resolved to an ONNX export or an artifact, the 4-bit options."""

from __future__ import annotations

import sys
from pathlib import Path


def log(msg: str) -> None:
    print(f"[tvm-lite] {msg}", file=sys.stderr, flush=True)


def resolve_artifact(model, target: str, exporter: str = "dynamo", force: bool = False,
                     quant=None) -> Path:
    """A model given as an artifact dir, an ONNX file / export dir, a .gguf / HF folder, or
    nothing (the embedded default) -> a compiled artifact dir (exporting/compiling if needed)."""
    from .artifact import MANIFEST, compile_model

    if model is not None and (Path(model) / MANIFEST).exists():
        return Path(model)
    onnx_like = model is not None and (str(model).endswith(".onnx") or (Path(model) / "model.onnx").exists())
    if not onnx_like:
        from .export import export_onnx

        model = export_onnx(model, exporter=exporter, progress=log)
    return compile_model(model, target, force=force, progress=log, quant=quant)


def add_quant_args(p, several: bool = False):
    g = p.add_argument_group("4-bit weights (tvm_lite.quant)")
    if several:
        g.add_argument("--quant", default="none",
                       help="comma list of none, e0m4, int4: one row each, in the same run")
    else:
        g.add_argument("--quant", default="none", choices=["none", "e0m4", "int4"],
                       help="E0M4 (Transformer-Lite) or MLC-style int4 weights for every weight matmul")
    g.add_argument("--quant-method", default="rtn", choices=["rtn", "gptq", "awq", "awq+gptq"])
    g.add_argument("--group-size", type=int, default=None, help="weights per scale along K (default 32)")
    g.add_argument("--quant-lm-head", action="store_true", help="also quantize the lm_head")
    g.add_argument("--quant-embedding", action="store_true", help="also quantize the embedding")
    g.add_argument("--act-order", action="store_true", help="GPTQ: visit channels by activation size")
    g.add_argument("--clip-weighted", action="store_true",
                   help="GPTQ / AWQ+GPTQ: weight the clipping search by the Hessian's diagonal "
                        "(with awq+gptq: the best method of the README's quality table)")


def quant_config(args, fmt=None):
    from .quant import QuantConfig

    return QuantConfig.parse(fmt if fmt is not None else args.quant, method=args.quant_method,
                             group_size=args.group_size, include_lm_head=args.quant_lm_head,
                             include_embedding=args.quant_embedding, act_order=args.act_order,
                             clip_weighted=args.clip_weighted)


def resolve_onnx(model, exporter: str = "dynamo"):
    """An ONNX file / export dir as given, or the export of a .gguf / HF folder / the default."""
    if model is not None and (str(model).endswith(".onnx") or (Path(model) / "model.onnx").exists()):
        return model
    from .export import export_onnx

    return export_onnx(model, exporter=exporter, progress=log)
