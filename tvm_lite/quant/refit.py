"""Scale refit: with the codes (and E0M4's integer zeros) fixed, the fp16 group scales that
minimize the layer's output error, in closed form.

A quantized column is ``Q[:, n] = U_n s_n``: ``U_n [K, ng]`` holds each group's integer offsets
``u = q - z`` (int4: ``q - 8``) in that group's rows, ``s_n [ng]`` the column's scales. Its output
error over the calibration inputs, ``(U_n s_n - w_n)^T H (U_n s_n - w_n)``, is a quadratic in
``s_n``, minimized by the ``ng x ng`` linear system

    (U_n^T H U_n + lam D_n) s_n = U_n^T H w_n + lam D_n s0_n,      D_n = diag(U_n^T H U_n)

(``s0``: the scales the quantizer chose; ``lam`` pulls the refit towards them, which keeps a
group that calibration barely exercises where it was). Unlike the per-group clipping search, the
system sees the *full* Hessian: errors that two groups of one column share through correlated
inputs (a group-wide shift, see :func:`.rtn.rtn`) are traded against each other. Nothing about
the format or the kernels changes: the refit writes other fp16 numbers into the same ``scale``
tensor. Cost: one batched ``ng x ng`` solve per column (``ng = K / G``).
"""

from __future__ import annotations

import numpy as np

from .format import INT4_ZERO, QuantizedWeight, unpack
from .rtn import _safe_scale, assemble

DEFAULT_REFIT_DAMP = 0.1  # lam above


def refit_scales(qw: QuantizedWeight, w: np.ndarray, hessian: np.ndarray,
                 damp: float = DEFAULT_REFIT_DAMP) -> QuantizedWeight:
    """``qw`` (the quantization of ``w [K, N]``, without AWQ's input scale: pass the scaled
    weight and the scaled input's Hessian) with its scales refit to ``hessian [K, K]``'s
    output error; codes, zeros and format unchanged. A refit scale that is not positive keeps
    the old one."""
    if damp < 0:
        raise ValueError(f"refit damping must be >= 0, got {damp}")
    k, n, g = qw.k, qw.n, qw.group_size
    if np.shape(w) != (k, n) or np.shape(hessian) != (k, k):
        raise ValueError(f"refit: weight {np.shape(w)} / Hessian {np.shape(hessian)} do not match "
                         f"the quantized {k}x{n} matrix")
    codes = unpack(qw.codes, k).astype(np.float64)
    ng = qw.scale.shape[0]
    rows = np.arange(k) // g
    zero = (qw.zero.astype(np.float64) - 1024.0)[rows] if qw.fmt == "e0m4" else INT4_ZERO
    u = codes - zero  # [K, N], exact integers
    h = np.asarray(hessian, np.float64)
    kp = ng * g
    if kp != k:  # pad K to whole groups with zero rows (no weight, no input)
        h = np.pad(h, ((0, kp - k), (0, kp - k)))
        u = np.pad(u, ((0, kp - k), (0, 0)))
        w = np.pad(w, ((0, kp - k), (0, 0)))
    ug = u.reshape(ng, g, n)
    # P[k, j, n] = sum_{i in group j} H[k, i] u[i, n]; A[g, j, n] = sum_{k in group g} u[k, n] P[k, j, n]
    p = np.einsum("kji,jin->kjn", h.reshape(kp, ng, g), ug)
    a = np.einsum("gkn,gkjn->gjn", ug, p.reshape(ng, g, ng, n)).transpose(2, 0, 1)  # [N, ng, ng]
    b = np.einsum("gkn,gkn->ng", ug, (h @ np.asarray(w, np.float64)).reshape(ng, g, n))
    s0 = qw.scale.astype(np.float64).T  # [N, ng]
    d = np.einsum("nii->ni", a).copy()
    d = np.where(d > 0, d, 1.0)  # a group of all-zero offsets keeps its scale
    a[:, np.arange(ng), np.arange(ng)] += damp * d
    s = np.linalg.solve(a + 1e-12 * np.eye(ng), (b + damp * d * s0)[..., None])[..., 0]
    s = np.where((s > 0) & np.isfinite(s), s, s0).T  # [ng, N]
    s16 = _safe_scale(s)
    z = None if qw.fmt == "int4" else (qw.zero.astype(np.float32) - 1024.0)
    return assemble(qw.fmt, g, codes.astype(np.uint8), s16, z, {**qw.info, "scale_refit": damp},
                    qw.act_scale)


def output_error_of(qw: QuantizedWeight, w: np.ndarray, hessian: np.ndarray) -> float:
    """``sum_n dW[:, n]^T H dW[:, n]`` of ``qw``'s dequantized weights (no input scale)."""
    dw = qw.dequantize().astype(np.float64) - w
    return float(np.sum(dw * (np.asarray(hessian, np.float64) @ dw)))


__all__ = ["refit_scales", "output_error_of", "DEFAULT_REFIT_DAMP"]
