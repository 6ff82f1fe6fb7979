"""Checks of user-given values, made before any work starts; each failure is a documented
:mod:`tvm_lite.errors` type whose message names the value.

Engine requests (prompt, temperature, top_p, max_new_tokens) and weights (finite values, a group
size that divides K) are checked here; targets and devices in :mod:`tvm_lite.target`.
"""

from __future__ import annotations

import math

import numpy as np

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
    func = mod["main"]
    if func.attrs is None or "params" not in func.attrs:
        return
    params = list(func.attrs["params"])
    names = list(func.attrs["tvm_lite.param_names"]) if "tvm_lite.param_names" in func.attrs \
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


def _elf_truncated(path) -> str | None:
    """Why the shared library at ``path`` cannot be whole (None if it looks whole): an ELF file's
    section header table is at its end, so a truncated copy points past its own size."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        size = f.seek(0, 2)
    if head[:4] != b"\x7fELF":
        return "not an ELF shared library"
    if len(head) < 64 and head[4] == 2 or len(head) < 52:
        return f"only {size} bytes"
    endian = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # 64-bit
        shoff, = struct.unpack_from(endian + "Q", head, 0x28)
        shentsize, shnum = struct.unpack_from(endian + "HH", head, 0x3A)
    else:
        shoff, = struct.unpack_from(endian + "I", head, 0x20)
        shentsize, shnum = struct.unpack_from(endian + "HH", head, 0x2E)
    if shoff + shentsize * shnum > size:
        return f"truncated ({size} bytes; its headers end at byte {shoff + shentsize * shnum})"
    return None


def _machine(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


def check_artifact(path, local: bool = True) -> dict:
    """The manifest of the artifact directory ``path`` after checking that this tvm_lite can load
    it: a readable manifest from this tvm_lite and TVM version, a library that is whole and (when
    ``local``, not for a remote device) built for this machine's CPU, weights that match the
    manifest, and a tokenizer. Raises :class:`~tvm_lite.artifact.ArtifactError` naming the file
    (nothing is loaded)."""
    import platform
    import zipfile
    from pathlib import Path

    from . import __version__
    from .artifact import LIBRARY, PARAMS, ArtifactError, load_manifest

    path = Path(path)
    manifest = load_manifest(path)
    recompile = "recompile it with `tvm-lite compile`"
    built_by = manifest.get("tvm_lite_version")
    if built_by != __version__:
        raise ArtifactError(f"{path} was built by tvm_lite {built_by}; this is tvm_lite "
                            f"{__version__}: {recompile}")
    import tvm

    if manifest.get("tvm_version") not in (None, tvm.__version__):
        raise ArtifactError(f"{path} was built with TVM {manifest['tvm_version']}; this is TVM "
                            f"{tvm.__version__}: {recompile}")
    missing = [k for k in ("target_kind", "options", "model", "param_names") if k not in manifest]
    if missing:
        raise ArtifactError(f"{path / 'manifest.json'} lacks {missing}: {recompile}")
    target = str(manifest.get("target", ""))
    triple = [w for w in target.replace('"', " ").replace(",", " ").split() if "-linux" in w]
    host_arch = _machine(platform.machine())
    if local and manifest["target_kind"] in ("llvm", "c") and triple and _machine(triple[0].split("-")[0]) \
            not in (host_arch, "") and "mtriple" in target:
        raise ArtifactError(f"{path} was built for {triple[0]}, this machine is {host_arch}: "
                            f"run it there (or over RPC: tvm-lite bench {path} --rpc ...), or "
                            f"{recompile} --target llvm")
    lib = path / LIBRARY
    if not lib.exists():
        raise ArtifactError(f"{lib} is missing: {recompile}")
    why = _elf_truncated(lib)
    if why:
        raise ArtifactError(f"{lib} is {why}: {recompile}")
    params = path / PARAMS
    try:
        with zipfile.ZipFile(params) as z:
            count = len(z.namelist())
    except (OSError, zipfile.BadZipFile) as err:
        raise ArtifactError(f"cannot read the weights {params}: {err}: {recompile}") from err
    if count != len(manifest["param_names"]):
        raise ArtifactError(f"{params} holds {count} weights, the manifest names "
                            f"{len(manifest['param_names'])}: {recompile}")
    if not (path / "tokenizer.json").exists():
        raise ArtifactError(f"{path} has no tokenizer.json (the engine needs it to read prompts):"
                            f" copy the model's tokenizer files there, or {recompile}")
    return manifest
