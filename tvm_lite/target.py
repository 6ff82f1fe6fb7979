"""Target strings -> TVM 0.27 targets.

TVM 0.27 only accepts JSON dicts or tags; users (and every TVM tutorial before 0.20) write
``"opencl -device=adreno"``. ``parse_target`` accepts classic strings, dicts and ``Target``s, and
gives device targets the host they are meant for: ``adreno``/``mali`` (OpenCL or Vulkan) run on an
Android phone, so their host is ``llvm -mtriple=aarch64-linux-android``.
"""

from __future__ import annotations

import re
import shlex

import tvm
from tvm.target import Target, codegen
from .errors import UserError

ANDROID_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-android"}
PHONE_DEVICES = ("adreno", "mali")
# the -device= values a GPU target kind may name (tvm_lite's schedule profiles and TVM's own);
# any other is an error that lists these
KNOWN_DEVICES = {"opencl": PHONE_DEVICES + ("intel_graphics",), "vulkan": PHONE_DEVICES}
CPU_KINDS = ("llvm", "c")
# the runtime device of each target kind that tvm_lite can run locally (tvm-lite run / bench)
RUNTIME_DEVICE = {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "opencl": "opencl",
                  "vulkan": "vulkan", "metal": "metal", "rocm": "rocm"}
RPC_HINT = ("compile it here and run it on the device over TVM's RPC: "
            "`tvm-lite compile MODEL --target \"{target}\" -o out/` then "
            "`tvm-lite bench out/ --rpc HOST:9190 --key {key}` ({where})")


def _rpc_hint(target, kind: str) -> str:
    phone = kind in ("opencl", "vulkan")
    return RPC_HINT.format(target=target, key="android" if phone else kind,
                           where="a phone running TVM's RPC app" if phone
                           else f"an RPC server on a machine with a {kind} device")
_LIST_OPTIONS = {"keys", "libs", "mattr"}


class TargetError(UserError):
    """A target tvm_lite cannot build for; the message names the option or the missing codegen."""


class DeviceUnavailableError(TargetError):
    """A build this machine's TVM cannot run (no runtime for its kind, or no such device)."""


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
        if isinstance(cfg, dict):
            _check_kind_and_device(cfg, target)
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


def local_cuda_target(dev_id: int = 0) -> str:
    """``cuda -arch=sm_XY`` for this machine's CUDA GPU ``dev_id``; a Hopper GPU (9.0) gets the
    arch-specific ``sm_90a``, which the wgmma GEMMs need (``schedules/gpu_gemm_wgmma_ws.py``).
    Without a GPU, ``sm_90a`` (a build for the H200 the benchmarks were measured on)."""
    dev = tvm.cuda(dev_id)
    version = str(dev.compute_version) if dev.exist else "9.0"
    arch = "sm_" + version.replace(".", "")
    return f"cuda -arch={arch}a" if arch == "sm_90" else f"cuda -arch={arch}"


def _check_kind_and_device(cfg: dict, text) -> None:
    """Unknown target kinds and ``-device=`` names are errors that list the known ones (TVM
    itself rejects unknown options, listing them, but keeps any ``device`` string)."""
    kind = cfg.get("kind")
    kinds = sorted(Target.list_kinds())
    if kind not in kinds:
        raise TargetError(f"unknown target kind {kind!r} in {text!r}; known kinds: "
                          f"{', '.join(kinds)}")
    device = cfg.get("device")
    if device is not None and kind in KNOWN_DEVICES and device not in KNOWN_DEVICES[kind]:
        raise TargetError(f"unknown device {device!r} for {kind} in {text!r}; known devices: "
                          f"{', '.join(KNOWN_DEVICES[kind])} (or no -device for a generic GPU)")
    arch = cfg.get("arch")
    if kind == "cuda" and arch is not None and not re.fullmatch(r"sm_\d+[a-z]?", str(arch)):
        raise TargetError(f"unknown CUDA arch {arch!r} in {text!r}: expected sm_XY, e.g. sm_90")


def check_runnable(target, device=None) -> str:
    """Say at once when this machine's TVM cannot run ``target``'s builds (before any work):
    no runtime for its kind (the PyPI wheel has no OpenCL, Vulkan or Metal runtime) or no such
    device (a CUDA build without a GPU). Returns the device to run on ("cpu", "cuda"...).
    ``target``: a target string/dict/Target or a target kind name (an artifact's
    ``manifest["target_kind"]``)."""
    if isinstance(target, str) and target in RUNTIME_DEVICE:
        kind, shown = target, target
    else:
        tgt = target if isinstance(target, Target) else parse_target(target)
        kind, shown = tgt.kind.name, target if isinstance(target, str) else tgt.kind.name
    if kind not in RUNTIME_DEVICE:
        raise DeviceUnavailableError(f"tvm_lite cannot run {kind} builds locally; "
                                     + _rpc_hint(shown, kind))
    given = device if isinstance(device, str) and device else None
    dev_kind = given.split(":")[0] if given else RUNTIME_DEVICE[kind]
    if dev_kind == "cpu":
        if kind not in CPU_KINDS:
            raise DeviceUnavailableError(f"a {kind} build cannot run on the CPU; pass "
                                         f"--device {RUNTIME_DEVICE[kind]}")
        return given or dev_kind
    gpu_driver = dev_kind in ("cuda", "rocm")  # the wheel has the runtime; it needs a driver
    if not tvm.runtime.enabled(dev_kind) and not gpu_driver:
        raise DeviceUnavailableError(
            f"the installed TVM ({tvm.__version__}) has no {dev_kind} runtime, so this machine "
            f"cannot run a {shown!r} build; " + _rpc_hint(shown, dev_kind))
    if not tvm.runtime.enabled(dev_kind) or not tvm.device(dev_kind, 0).exist:
        raise DeviceUnavailableError(
            f"no {dev_kind} device on this machine (no GPU, or no driver), so it cannot run a "
            f"{shown!r} build; use --target llvm here, or " + _rpc_hint(shown, dev_kind))
    return given or dev_kind


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
