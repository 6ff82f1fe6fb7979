"""Round-to-nearest 4-bit quantization with a clipping search (numpy only).

The grid every quantizer here shares:

* **E0M4** (asymmetric): per group, ``[lo, hi] = alpha * [min(w, 0), max(w, 0)]``,
  ``s = fp16((hi - lo) / 15)``, ``z = clip(round(-lo / s), 0, 15)``, ``q = clip(round(w / s) + z, 0, 15)``.
  Stored as ``s`` and ``c = 1024 + z`` (see :mod:`.format`).
* **int4** (symmetric, MLC-LLM ``q4f16_1``): ``s = fp16(alpha * max|w| / 7)``,
  ``q = clip(round(w / s), -8, 7) + 8``.

The **clipping search** tries ``alpha`` in ``clip_ratios`` (1.0 = plain min/max, MLC's and
GPTQ's default) and keeps, per group and column, the one with the smallest squared error of the
dequantized fp16 weights -- optionally weighted per input channel (AWQ passes the diagonal of the
Hessian, so the error is the layer's output error as far as a diagonal can tell).
"""

from __future__ import annotations

import numpy as np

from .format import (E0M4_BASE, FP16_MAX, INT4_ZERO, MAX_CODE, QuantFormatError, QuantizedWeight,
                     check_format, check_group_size, check_weight, pack)

_MIN_SCALE = 6.2e-5  # just above fp16's smallest normal, 6.1035e-5
DEFAULT_CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.499, -0.05), 3))  # 1.0, 0.95, ..., 0.5


def _grouped(w: np.ndarray, group_size: int) -> np.ndarray:
    """``[K, N]`` -> ``[ceil(K/G), G, N]`` (K padded with zeros, which quantize exactly)."""
    k, n = w.shape
    ng = -(-k // group_size)
    if ng * group_size != k:
        w = np.concatenate([w, np.zeros((ng * group_size - k, n), w.dtype)])
    return w.reshape(ng, group_size, n)


def _safe_scale(s: np.ndarray) -> np.ndarray:
    """fp16 scales, kept normal (no subnormal: GPUs may flush them); an all-zero group gets
    scale 1 (its codes all equal the zero point)."""
    s = np.asarray(s, np.float32)
    s16 = np.clip(s, _MIN_SCALE, 65504.0).astype(np.float16)
    return np.where(s == 0, np.float16(1.0), s16)


def params_for(groups: np.ndarray, fmt: str, alpha: float = 1.0):
    """Scale (fp16) and integer zero (E0M4) or None (int4) per group: ``groups [ng, G, N]``."""
    if fmt == "e0m4":
        lo = np.minimum(groups.min(axis=1), 0) * alpha
        hi = np.maximum(groups.max(axis=1), 0) * alpha
        s16 = _safe_scale((hi - lo) / MAX_CODE)
        z = np.clip(np.round(-lo / s16.astype(np.float32)), 0, MAX_CODE).astype(np.float32)
        return s16, z
    s16 = _safe_scale(np.abs(groups).max(axis=1) * alpha / (INT4_ZERO - 1))
    return s16, None


def codes_for(groups: np.ndarray, s16: np.ndarray, z, fmt: str) -> np.ndarray:
    """Integer codes ``[ng, G, N]`` of ``groups`` on the grid ``(s16, z)``."""
    s = s16.astype(np.float32)[:, None, :]
    if fmt == "e0m4":
        return np.clip(np.round(groups / s) + z[:, None, :], 0, MAX_CODE)
    return np.clip(np.round(groups / s), -INT4_ZERO, INT4_ZERO - 1) + INT4_ZERO


def dequant_groups(codes: np.ndarray, s16: np.ndarray, z, fmt: str) -> np.ndarray:
    """The fp16 values the kernels produce for ``codes`` (as float32): ``(q - z) * s`` rounded
    to fp16 once (``q - z`` is an exact small integer, so this is the kernel's arithmetic)."""
    zero = z[:, None, :] if fmt == "e0m4" else INT4_ZERO
    prod = (codes - zero) * s16.astype(np.float32)[:, None, :]
    return prod.astype(np.float16).astype(np.float32)


def search_params(groups: np.ndarray, fmt: str, clip_ratios=DEFAULT_CLIP_RATIOS, channel_weight=None,
                  bias_weight: float = 0.0):
    """The clipping search: best ``(s16, z)`` per group and column. ``channel_weight`` (``[ng, G]``
    or None) weights each input channel's squared error; ``bias_weight`` adds
    ``bias_weight * (sum of the group's errors)^2`` (see :func:`rtn`)."""
    best = None
    wgt = None if channel_weight is None else channel_weight[:, :, None].astype(np.float32)
    for alpha in clip_ratios:
        s16, z = params_for(groups, fmt, alpha)
        diff = dequant_groups(codes_for(groups, s16, z, fmt), s16, z, fmt) - groups
        err = diff * diff if wgt is None else diff * diff * wgt
        err = err.sum(axis=1)
        if bias_weight:
            err = err + bias_weight * diff.sum(axis=1) ** 2
        if best is None:
            best = [err, s16, z]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better, s16, best[1])
        if z is not None:
            best[2] = np.where(better, z, best[2])
    return best[1], best[2]


def assemble(fmt: str, group_size: int, codes_kn: np.ndarray, s16: np.ndarray, z, info=None,
             act_scale=None) -> QuantizedWeight:
    """Integer codes ``[K, N]`` + group params -> the packed :class:`QuantizedWeight`."""
    k, n = codes_kn.shape
    # every code must dequantize to a finite fp16: |q - z| * s <= 65504 for q in [0, 15]
    s32 = s16.astype(np.float32)
    reach = (np.maximum(np.abs(z), np.abs(MAX_CODE - z)) if fmt == "e0m4" else INT4_ZERO) * s32
    if not np.isfinite(s32).all() or float(np.max(reach)) > FP16_MAX:
        raise QuantFormatError(f"the {k}x{n} weight's groups span more than fp16 can hold once "
                               f"quantized (a code would dequantize to {float(np.max(reach)):.4g} > "
                               f"{FP16_MAX:g}): scale the weight down")
    zero = None
    if fmt == "e0m4":
        zero = (np.float32(E0M4_BASE) + z).astype(np.float16)  # c = 1024 + z, exact
    return QuantizedWeight(fmt, group_size, k, n, pack(codes_kn.astype(np.uint8)), s16.astype(np.float16),
                           zero, None if act_scale is None else act_scale.astype(np.float32),
                           dict(info or {}))


def rtn(w: np.ndarray, fmt: str = "e0m4", group_size: int = 32, clip_ratios=DEFAULT_CLIP_RATIOS,
        channel_weight=None, bias_weight: float = 0.0) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w [K, N]`` with the clipping search (``clip_ratios=(1.0,)``
    turns it off). ``channel_weight [K]`` weights each input channel's error.

    ``bias_weight``: the search also penalizes the group's summed error, ``(sum_k e_k)^2``. A
    layer's output error is ``sum_k x_k e_k``; inputs with a common component (correlated
    channels, a non-zero mean) turn a group's *mean* error into output error G times over, while
    independent errors only add up in squares. Weight-MSE alone cannot tell the two apart, and it
    picks exactly the biased grids when the source weights already lie on a 16-level grid per
    group (a GGUF Q4_1 export at G=32): the same step with an integer zero then shifts all of a
    group's weights by one constant ``m + z*s``."""
    check_format(fmt)
    group_size = check_group_size(group_size)
    w = check_weight(w)  # 2-D, finite, within fp16's range
    k = w.shape[0]
    groups = _grouped(w, group_size)
    cw = None
    if channel_weight is not None:
        cw = _grouped(np.asarray(channel_weight, np.float32)[:, None], group_size)[:, :, 0]
    s16, z = search_params(groups, fmt, clip_ratios, cw, bias_weight)
    codes = codes_for(groups, s16, z, fmt).reshape(-1, w.shape[1])[:k]
    return assemble(fmt, group_size, codes, s16, z, {"method": "rtn", "clip_search": len(clip_ratios) > 1,
                                                     "bias_weight": bias_weight})
