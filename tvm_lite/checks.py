"""Checks of user-given values, made before any work starts; each failure is a documented
:mod:`tvm_lite.errors` type whose message names the value.

Engine requests (prompt, temperature, top_p, max_new_tokens) and weights (finite values, a group
size that divides K) are checked here; targets and devices in :mod:`tvm_lite.target`.
"""

from __future__ import annotations

import math

import numpy as np

from .convention import MAIN, PARAM_NAMES_ATTR
from .errors import GenerationConfigError, UserError


class WeightsError(UserError):
    """Weights that cannot be compiled or quantized (NaN/inf values, a shape the format cannot
    take); the message names the weight."""


def check_request(prompt, config) -> None:
    """A prompt and a ``GenerationConfig`` the engine can run: a non-empty prompt, temperature a
    finite number >= 0, top_p in (0, 1], max_new_tokens >= 1."""
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise GenerationConfigError("empty prompt: give the text to answer")
    if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) == 0:
        raise GenerationConfigError("empty prompt: no tokens or messages given")
    t = config.temperature
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise GenerationConfigError(f"temperature={t!r}: must be a finite number >= 0 "
                                    "(0 = greedy)")
    p = config.top_p
    if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise GenerationConfigError(f"top_p={p!r}: must be in (0, 1] (1 = no nucleus cut)")
    n = config.max_new_tokens
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise GenerationConfigError(f"max_new_tokens={n!r}: must be an integer >= 1")


def check_module_weights(mod) -> None:
    """Every weight attached to an imported module's ``main`` (``params``) is finite."""
    func = mod[MAIN]
    if func.attrs is None or "params" not in func.attrs:
        return
    params = list(func.attrs["params"])
    names = list(func.attrs[PARAM_NAMES_ATTR]) if PARAM_NAMES_ATTR in func.attrs \
        else [f"param{i}" for i in range(len(params))]
    for name, value in zip(names, params):
        check_finite(str(name), value.numpy())


def check_finite(name: str, array) -> None:
    """Raise :class:`WeightsError` naming ``name`` if ``array`` holds NaN or inf."""
    a = np.asarray(array)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise WeightsError(f"weight {name!r} {tuple(a.shape)} has {bad} NaN/inf value(s): "
                           "fix the checkpoint (or its export) first")
