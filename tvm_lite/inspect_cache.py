"""Frozen modules in ``inspect``'s file-to-module cache, so TVMScript parses in seconds.

TVM's TVMScript parser calls ``inspect.stack()`` for every ``@T.prim_func`` it parses.
``inspect`` names each frame's module by its file; a frame of a frozen module (``<frozen
importlib._bootstrap>``, ``<frozen runpy>``: every import and every ``python -m`` has some) has
no file, is never cached, and each lookup scans all of ``sys.modules`` (~2,000 entries once TVM
is imported). Importing ``tvm.s_tir.tensor_intrin`` -- the first CUDA build of a process does --
parses ~500 functions inside an import: 30 s of such scans on a 2-core machine, 4-7 s with
the frozen modules cached. Caching them gives ``inspect`` the same answer it would find by
scanning.
"""

from __future__ import annotations

import inspect
import sys


def seed_frozen_modules() -> int:
    """Map ``<frozen NAME>`` to ``NAME`` in ``inspect.modulesbyfile`` for every frozen module
    imported so far; returns how many were added."""
    added = 0
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if getattr(spec, "origin", None) == "frozen":
            key = f"<frozen {name}>"
            if key not in inspect.modulesbyfile:
                inspect.modulesbyfile[key] = name
                added += 1
    return added
