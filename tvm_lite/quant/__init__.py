"""4-bit weights for tvm_lite: the E0M4 format (Transformer-Lite's third technique), an MLC-style
int4 ablation, and the RTN / GPTQ / AWQ quantizers that produce them -- all in numpy.

    format.py        the packed layout, bit diagram, numpy reference (pack / unpack / dequant)
    rtn.py           round-to-nearest with a clipping search (the grid every method shares)
    gptq.py          GPTQ: Hessian from calibration, lazy batch updates, act-order
    awq.py           AWQ: activation-aware per-channel scale search (and AWQ+GPTQ)
    refit.py         group scales refit to the layer's output error (codes and zeros fixed)
    calibration.py   the model's own activations on offline text of several domains (corpora.py)
    kernels.py       generic TIR: dequant, dequant-fused matmul and embedding take
    quantize.py      QuantConfig + quantize_module (the pre-pass compile_model runs), cached
    evaluate.py      perplexity / "Paris" / size / speed tables (``tvm-lite quality``)

The Relax pass is ``tvm_lite.relax_passes.QuantizeWeightMatmuls``.
"""

from .format import QuantFormatError, QuantizedWeight
from .quantize import QuantConfig, quantize_module, quantize_weights

__all__ = ["QuantConfig", "QuantFormatError", "QuantizedWeight", "quantize_module", "quantize_weights"]
