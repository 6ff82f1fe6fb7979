"""GPTQ (Frantar et al., 2022) in numpy, onto the E0M4 / int4 grids of :mod:`.rtn`.

For a layer ``y = x @ W`` (``W [K, N]``) and calibration inputs ``X [T, K]``, GPTQ quantizes the
rows of ``W`` (input channels) one at a time and spreads each row's rounding error over the rows
not yet quantized, through the inverse Hessian ``H = 2 X^T X / T`` -- minimizing the layer's
output error ``||X W - X Q||^2`` rather than the weights' own error.

* **Hessian** from calibration activations (:mod:`.calibration`); every layer's ``H`` comes from
  the *unquantized* model's activations (the layers are not quantized one after another, which
  costs one calibration run instead of one per layer; the GPTQ paper's sequential variant feeds
  quantized outputs forward).
* **Lazy batch updates**: rows are processed in blocks (``block_size``); inside a block the error
  goes to the block's rows at once, the rest of ``W`` gets one matrix product per block.
* **act-order** (``act_order=True``): rows are visited in order of decreasing ``H_kk`` (the
  channels with the largest inputs first). Group parameters are then fixed up front from the
  unquantized weights ("static groups"), so groups stay the contiguous rows the packed format
  needs; without act-order they are chosen (with the clipping search) when a group is reached,
  from the already-updated weights, as in the reference implementation.
* Dampening ``percdamp * mean(diag H)`` is added to the diagonal (0.01 here, as in the paper;
  ``QuantConfig.gptq_damp`` defaults to 0.1, see there); dead channels (``H_kk = 0``)
  are zeroed.
"""

from __future__ import annotations

import numpy as np

from .format import QuantizedWeight, check_format, check_group_size, check_weight
from .refit import refit_scales
from .rtn import DEFAULT_CLIP_RATIOS, _grouped, assemble, codes_for, dequant_groups, search_params


def gptq(w: np.ndarray, hessian: np.ndarray, fmt: str = "e0m4", group_size: int = 32,
         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
         clip_ratios=DEFAULT_CLIP_RATIOS, clip_weighted: bool = False,
         refit_damp: float | None = None) -> QuantizedWeight:
    """Quantize ``w [K, N]`` given ``hessian [K, K]`` (``X^T X``, any positive scale).
    ``clip_weighted``: the clipping search weights each input channel's error by ``H_kk``.
    ``refit_damp``: then refit the group scales to the output error (:mod:`.refit`; None: off)."""
    check_format(fmt)
    group_size = check_group_size(group_size)
    w_in = w
    w = np.array(check_weight(w), np.float64)  # 2-D, finite, within fp16's range
    k, n = w.shape
    h = np.array(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's K={k}")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0

    ng = -(-k // group_size)
    diag = np.diag(h).astype(np.float32) if clip_weighted else None
    static = None
    if act_order:
        cw = None if diag is None else _grouped(diag[:, None], group_size)[:, :, 0]
        s16, z = search_params(_grouped(w.astype(np.float32), group_size), fmt, clip_ratios, cw)
        static = (s16, z)
        perm = np.argsort(-np.diag(h), kind="stable")
    else:
        perm = np.arange(k)
    inv_perm = np.argsort(perm)
    w = w[perm]
    h = h[perm][:, perm]

    h[np.diag_indices(k)] += percdamp * np.mean(np.diag(h))
    # the key holds the caller's Hessian object, so its id cannot be reused while cached
    hinv = _cached_hinv(hessian, percdamp, act_order, h)

    scales = np.zeros((ng, n), np.float16)
    zeros = np.zeros((ng, n), np.float32) if fmt == "e0m4" else None
    codes = np.zeros((k, n), np.float32)
    # blocks never split a group, so a group's parameters see all its updates
    block = max(block_size // group_size, 1) * group_size if not act_order else block_size
    loss = 0.0
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            g = perm[row] // group_size
            if static is None and row % group_size == 0:
                part = w1[i:i + group_size].astype(np.float32)[None]
                cw = None if diag is None else diag[row:row + part.shape[1]][None]
                if part.shape[1] < group_size:
                    pad = group_size - part.shape[1]
                    part = np.concatenate([part, np.zeros((1, pad, n), np.float32)], 1)
                    cw = None if cw is None else np.concatenate([cw, np.zeros((1, pad), np.float32)], 1)
                s16, z = search_params(part, fmt, clip_ratios, cw)
                scales[g] = s16[0]
                if zeros is not None:
                    zeros[g] = z[0]
            elif static is not None:
                scales[g] = static[0][g]
                if zeros is not None:
                    zeros[g] = static[1][g]
            zg = None if zeros is None else zeros[g:g + 1]
            x = w1[i].astype(np.float32)[None, None]
            q = codes_for(x, scales[g:g + 1], zg, fmt)
            deq = dequant_groups(q, scales[g:g + 1], zg, fmt)[0, 0].astype(np.float64)
            codes[row] = q[0, 0]
            d = hinv1[i, i]
            err = (w1[i] - deq) / d
            loss += float(np.sum((w1[i] - deq) ** 2) / d ** 2) / 2
            w1[i:] -= np.outer(hinv1[i, i:], err)
            err1[i] = err
        w[i2:] -= hinv[i1:i2, i2:].T @ err1

    codes = codes[inv_perm]
    qw = assemble(fmt, group_size, codes, scales, zeros,
                  {"method": "gptq", "act_order": act_order, "clip_weighted": clip_weighted,
                   "gptq_loss": loss})
    if refit_damp is None:
        return qw
    w0 = np.array(check_weight(w_in), np.float64)
    w0[dead, :] = 0.0
    return refit_scales(qw, w0, hessian, refit_damp)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """``U`` upper-triangular with ``U^T U = H^-1`` (GPTQ's ``cholesky(cholesky_inverse(
    cholesky(H)), upper=True)``) from one Cholesky: with ``P`` the reversal permutation and
    ``P H P = L L^T``, ``U = P L^-1 P``. Dampening is raised until ``H`` is positive definite."""
    damp = 0.0
    eye = np.eye(h.shape[0])
    rev = slice(None, None, -1)
    for _ in range(8):
        try:
            lower = np.linalg.cholesky((h + damp * eye)[rev, rev])
            return np.ascontiguousarray(np.linalg.inv(lower)[rev, rev])
        except np.linalg.LinAlgError:
            damp = max(damp * 10, 1e-6 * float(np.mean(np.diag(h))))
    raise np.linalg.LinAlgError("GPTQ: the Hessian is not positive definite even after dampening")


_HINV_CACHE: dict = {}  # layers reading one input (q/k/v, gate/up) share one Hessian inverse


def _cached_hinv(hessian, percdamp: float, act_order: bool, h: np.ndarray) -> np.ndarray:
    """The inverse factor for the caller's ``hessian`` object (kept in the entry, so its id
    stays unique while cached)."""
    key = (id(hessian), percdamp, act_order)
    hit = _HINV_CACHE.get(key)
    if hit is None or hit[0] is not hessian:
        if len(_HINV_CACHE) >= 4:
            _HINV_CACHE.pop(next(iter(_HINV_CACHE)))
        hit = _HINV_CACHE[key] = (hessian, _upper_cholesky_of_inverse(h))
    return hit[1]


__all__ = ["gptq", "QuantizedWeight"]
