"""AWQ (Lin et al., 2023): activation-aware per-channel scale search, in numpy.

Channels whose inputs are large matter most. AWQ scales input channel ``k`` of ``W [K, N]`` up by
``s_k = mean|x_k| ** alpha`` before quantizing (so its rows get finer steps relative to the group
range) and scales the input down by ``1 / s_k``: ``x @ W = (x / s) @ (diag(s) W)``.

* ``alpha`` is searched on a grid in ``[0, 1)`` (``N_GRID`` points, ``alpha = 0`` is plain RTN);
  the loss is the layer's output error over all calibration tokens, computed exactly from the
  Hessian: ``||X dW||^2 = sum_n dW[:, n]^T (X^T X) dW[:, n]`` -- no activations kept.
* After the scale, the clipping search of :mod:`.rtn` runs on ``diag(s) W`` with each channel's
  error weighted by ``H_kk / s_k^2`` (AWQ's clip search, with the diagonal in place of samples).
* Where the ``1/s`` goes: AWQ folds it into the previous op (an RMSNorm weight or the previous
  linear layer), which needs model-specific pattern matching. tvm_lite stays model-agnostic and
  multiplies the input of the quantized matmul by ``1/s`` (``QuantizedWeight.act_scale``): ``K``
  multiplies per token against the matmul's ``K * N`` multiply-adds, fused by TVM into the op that
  produces the input.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .format import QuantizedWeight, check_format, check_group_size, check_weight
from .gptq import gptq
from .refit import refit_scales
from .rtn import DEFAULT_CLIP_RATIOS, rtn


def output_error(dw: np.ndarray, hessian: np.ndarray) -> float:
    """``sum_n dW[:, n]^T H dW[:, n]`` (= ``||X dW||^2`` for ``H = X^T X``)."""
    dw = np.asarray(dw, np.float32)
    return float(np.sum(dw * (hessian.astype(np.float32) @ dw)))


N_GRID = 10  # alpha in 0, 0.1, ..., 0.9 (the paper's 20 points halve the step for twice the time)
_SCALES: dict = {}  # (weight digest, id(hessian), ...) -> (hessian, (alpha, s)), in-process


def scale_search(w: np.ndarray, hessian: np.ndarray, act_mean_abs: np.ndarray, fmt: str,
                 group_size: int, n_grid: int = N_GRID) -> tuple[float, np.ndarray]:
    """AWQ's grid search: the ``alpha`` (and channel scales ``s``) whose plain-RTN quantization
    of ``diag(s) W`` has the smallest output error."""
    key = (hashlib.blake2b(np.ascontiguousarray(w).view(np.uint8).data, digest_size=16).digest(),
           id(hessian), fmt, group_size, n_grid)
    hit = _SCALES.get(key)
    if hit is not None and hit[0] is hessian:  # AWQ and AWQ+GPTQ of one weight search once
        return hit[1]
    k = w.shape[0]
    h = np.asarray(hessian, np.float32)
    x_mean = np.maximum(np.asarray(act_mean_abs, np.float32), 1e-8)
    if h.shape != (k, k) or x_mean.shape != (k,):
        raise ValueError(f"AWQ statistics {h.shape}, {x_mean.shape} do not match the weight's K={k}")
    best = (np.inf, 0.0, None)
    for alpha in np.arange(n_grid) / n_grid:
        s = x_mean ** alpha
        s = s / np.sqrt(s.max() * s.min())
        qw = rtn(w * s[:, None], fmt, group_size, clip_ratios=(1.0,))
        err = output_error(qw.dequantize().astype(np.float32) / s[:, None] - w, h)
        if err < best[0]:
            best = (err, float(alpha), s)
    if len(_SCALES) >= 512:
        _SCALES.pop(next(iter(_SCALES)))
    _SCALES[key] = (hessian, (best[1], best[2]))
    return best[1], best[2]


def _scaled(w, hessian, act_mean_abs, fmt, group_size, n_grid, h_dtype):
    """What AWQ and AWQ+GPTQ share: the checked inputs, the unquantized output error and the
    scale search. Returns ``(w, h, base_error, alpha, s)``."""
    check_format(fmt)
    group_size = check_group_size(group_size)
    w = check_weight(w)  # 2-D, finite, within fp16's range
    h = np.asarray(hessian, h_dtype)
    alpha, s = scale_search(w, hessian, act_mean_abs, fmt, group_size, n_grid)
    return w, h, output_error(w, h), alpha, s


def awq(w: np.ndarray, hessian: np.ndarray, act_mean_abs: np.ndarray, fmt: str = "e0m4",
        group_size: int = 32, n_grid: int = N_GRID, clip_ratios=DEFAULT_CLIP_RATIOS,
        refit_damp: float | None = None) -> QuantizedWeight:
    """Quantize ``w [K, N]`` with AWQ's scale search; ``act_mean_abs [K]`` is ``mean |x_k|``.
    ``refit_damp``: then refit the group scales to the output error (:mod:`.refit`; None: off)."""
    w, h, base, alpha, s = _scaled(w, hessian, act_mean_abs, fmt, group_size, n_grid, np.float32)
    diag = np.maximum(np.diag(h), 0) / (s * s)
    qw = rtn(w * s[:, None], fmt, group_size, clip_ratios=clip_ratios, channel_weight=diag)
    if refit_damp is not None:
        inv = 1.0 / s.astype(np.float64)
        qw = refit_scales(qw, w * s[:, None], h.astype(np.float64) * inv[:, None] * inv[None, :],
                          refit_damp)
    qw.act_scale = (1.0 / s).astype(np.float32)
    final = output_error(qw.effective_weight() - w, h)
    qw.info = {"method": "awq", "alpha": alpha, "relative_output_error": final / max(base, 1e-30)}
    return qw


def awq_gptq(w: np.ndarray, hessian: np.ndarray, act_mean_abs: np.ndarray, fmt: str = "e0m4",
             group_size: int = 32, n_grid: int = N_GRID, clip_ratios=DEFAULT_CLIP_RATIOS,
             **gptq_options) -> QuantizedWeight:
    """AWQ's scale search, then GPTQ on ``diag(s) W`` with the Hessian of the scaled input
    ``x / s`` (``diag(1/s) H diag(1/s)``): the scales put the grid's resolution on the
    channels with large inputs, GPTQ then corrects the rounding that is left."""
    w, h, base, alpha, s = _scaled(w, hessian, act_mean_abs, fmt, group_size, n_grid, np.float64)
    inv = 1.0 / s.astype(np.float64)
    qw = gptq(w * s[:, None], h * inv[:, None] * inv[None, :], fmt, group_size,
              clip_ratios=clip_ratios, **gptq_options)
    qw.act_scale = inv.astype(np.float32)
    final = output_error(qw.effective_weight() - w, h.astype(np.float32))
    qw.info.update(method="awq+gptq", alpha=alpha, relative_output_error=final / max(base, 1e-30))
    return qw


__all__ = ["awq", "awq_gptq", "output_error", "scale_search"]
