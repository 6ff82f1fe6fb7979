"""Target strings -> TVM 0.27 targets.

TVM 0.27 only accepts JSON dicts or tags; users (and every TVM tutorial before 0.20) write
``"opencl -device=adreno"``. ``parse_target`` accepts classic strings, dicts and ``Target``s, and
gives device targets the host they are meant for: ``adreno``/``mali`` (OpenCL or Vulkan) run on an
Android phone, so their host is ``llvm -mtriple=aarch64-linux-android``.
"""

from __future__ import annotations

import shlex

import tvm
from tvm.target import Target, codegen

ANDROID_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-android"}
PHONE_DEVICES = ("adreno", "mali")
_LIST_OPTIONS = {"keys", "libs", "mattr"}


class TargetError(ValueError):
    """A target tvm_lite cannot build for; the message names the option or the missing codegen."""


def _cli_to_dict(text: str) -> dict:
    tokens = shlex.split(text)
    if not tokens:
        raise TargetError("empty target string")
    cfg: dict = {"kind": tokens[0]}
    for tok in tokens[1:]:
        if not tok.startswith("-"):
            raise TargetError(f"target option {tok!r} in {text!r} must look like -name=value")
        key, eq, value = tok.lstrip("-").partition("=")
        if not eq:
            cfg[key] = True
        elif key in _LIST_OPTIONS:
            cfg[key] = value.split(",")
        elif value.lstrip("-").isdigit():
            cfg[key] = int(value)
        else:
            cfg[key] = {"true": True, "false": False}.get(value.lower(), value)
    return cfg


def parse_target(target, host=None) -> Target:
    """Accept ``"llvm"``, ``"cuda -arch=sm_90"``, ``"opencl -device=adreno"``, ``"vulkan"``,
    a dict, a tag or a ``Target``; return a ``Target`` with the right host."""
    if isinstance(target, Target):
        tgt = target
    else:
        if isinstance(target, str):
            text = target.strip()
            cfg = text if text in tvm.target.list_tags() else _cli_to_dict(text)
        elif isinstance(target, dict):
            cfg = dict(target)
        else:
            raise TargetError(f"target must be a string, dict or tvm.target.Target, got {type(target).__name__}")
        if isinstance(cfg, dict) and cfg.get("kind") == "llvm" and not ({"mcpu", "mtriple"} & set(cfg)):
            # a bare "llvm" means this machine's CPU (its vector width); name -mtriple/-mcpu to
            # build for another one.
            cfg["mcpu"] = codegen.llvm_get_system_cpu()
        try:
            tgt = Target(cfg)
        except Exception as err:  # TVM names the bad option in its message
            raise TargetError(f"invalid target {target!r}: {str(err).strip().splitlines()[-1]}") from err
    if tgt.kind.name in ("llvm", "c"):
        return tgt
    if host is None and tgt.host is None:
        phone = tgt.attrs.get("device") in PHONE_DEVICES or any(k in PHONE_DEVICES for k in tgt.keys)
        host = ANDROID_HOST if phone else {"kind": "llvm"}
    if host is not None:
        host = parse_target(host) if not isinstance(host, Target) else host
        tgt = tgt.with_host(host)
    return tgt


def check_codegen(target: Target) -> None:
    """Raise a clear error if the installed TVM cannot generate code for ``target``."""
    kind = target.kind.name
    if kind == "c":
        return
    if tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is None:
        raise TargetError(
            f"the installed TVM ({tvm.__version__}) has no {kind} code generator "
            f"(target.build.{kind} is missing; it was built without USE_{kind.upper()}). "
            f"Use a TVM build with {kind} enabled, or another target such as "
            "'opencl -device=adreno'."
        )


def is_cpu(target: Target) -> bool:
    return target.kind.name in ("llvm", "c")
