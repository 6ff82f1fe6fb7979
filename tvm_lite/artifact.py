"""Compiled artifacts: one directory a phone (or a runtime-only TVM process) can load.

    model.so        the exported library (host code + device kernels)
    kernels.cl      the OpenCL source (OpenCL targets only, for reading and checking)
    params.npz      the weights, in the order of ``manifest["param_names"]``
    tokenizer.json  (and the other tokenizer files)
    manifest.json   model config, target, options, tvm_lite/TVM versions, input/output names

``compile_model`` caches artifacts by a hash of everything that goes into them. Builds that differ
only in options that leave the weights alone (memory plan, KV cache, fused attention, target)
share one weights file: ``<cache>/weights/<digest>.npz``, hard-linked into each artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_dir, atomic_file
from .checks import check_module_weights
from .convention import (INPUT_NAMES_ATTR, KV_AUTO, KV_COPY, KV_INPLACE, MAIN, OUTPUT_NAMES_ATTR,
                         PARAM_NAMES_ATTR)
from .errors import UserError
from .export import MODEL_JSON, cache_dir, cache_lock, export_windows
from .options import BuildOptions
from .tuning_db import check_database, database_digest

MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.npz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class ArtifactError(UserError):
    """An artifact that cannot be built or loaded; the message names the file or setting."""


ACCEPTED_INPUTS = ("an ONNX file, an export folder with model.onnx, a .gguf file, or a Hugging "
                   "Face model folder (config.json)")


def onnx_input(model, exporter: str = "dynamo", progress=print) -> Path:
    """What ``compile_model``, ``Engine`` and the CLI accept, as an ONNX file: an ONNX file or
    export folder as given; a .gguf file or a Hugging Face folder exported first (cached);
    anything else an error naming it."""
    path = Path(model)
    if path.is_dir() and (path / "model.onnx").exists():
        return path / "model.onnx"
    if path.is_file() and path.suffix == ".onnx":
        return path
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").exists()):
        from .export import export_onnx

        return export_onnx(path, exporter=exporter, progress=progress) / "model.onnx"
    if not path.exists():
        raise ArtifactError(f"model not found: {path} (give {ACCEPTED_INPUTS})")
    if path.is_dir() and any(path.glob("model*.so")):  # an artifact that lost its manifest
        raise ArtifactError(f"not a tvm_lite artifact (no {MANIFEST}): {path}; recompile it "
                            "(tvm-lite compile)")
    what = "a folder without model.onnx or config.json" if path.is_dir() \
        else f"a {path.suffix or 'suffix-less'} file"
    raise ArtifactError(f"unsupported model input {path}: {what}; give {ACCEPTED_INPUTS}")


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    data = path.with_name(path.name + ".data")
    if data.exists():
        _hash_file(data, h)


def _compiler_fingerprint() -> str:
    """A hash of tvm_lite's own compiler code, so a changed pass or schedule recompiles."""
    import tvm_lite.relax_passes
    import tvm_lite.schedules

    h = hashlib.sha256()
    for pkg in (Path(__file__).parent, Path(tvm_lite.relax_passes.__file__).parent,
                Path(tvm_lite.schedules.__file__).parent):
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def compile_key(onnx_path: Path, target: str, options: dict) -> str:
    import tvm

    h = hashlib.sha256()
    _hash_file(onnx_path, h)
    h.update(_compiler_fingerprint().encode())
    h.update(json.dumps({"target": str(target), "options": options, "tvm_lite": __version__,
                         "tvm": tvm.__version__}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def check_decoder_interface(input_names, output_names) -> None:
    """The engine drives "decoder with past" models; say what is missing otherwise."""
    past = [n for n in input_names if n.startswith("past_key_values.")]
    present = [n for n in output_names if n.startswith("present.")]
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in input_names]
    problems = []
    if missing:
        problems.append(f"missing inputs {missing}")
    if not output_names or output_names[0] != "logits":
        problems.append(f"first output is {output_names[:1]}, not 'logits'")
    if not past or len(past) != len(present):
        problems.append(f"{len(past)} past_key_values.* inputs vs {len(present)} present.* outputs")
    if problems:
        raise ArtifactError(
            "not a decoder-with-past LLM (export it with `tvm-lite export`): " + "; ".join(problems)
            + f". Graph inputs: {list(input_names)[:6]}, outputs: {list(output_names)[:4]}")


def _export_library(ex, path: Path, target) -> None:
    """Export with the host compiler, or the NDK's for Android hosts."""
    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", ""))
    if "android" in triple:
        cc = os.environ.get("TVM_NDK_CC")
        if not cc:
            raise ArtifactError(
                f"target host {triple} needs the Android NDK compiler to export {path.name}: set "
                "TVM_NDK_CC to the NDK's clang++ (e.g. .../toolchains/llvm/prebuilt/linux-x86_64/"
                "bin/aarch64-linux-android28-clang++)")
        from tvm.support import ndk

        ex.export_library(str(path), fcompile=ndk.create_shared)
    else:
        ex.export_library(str(path))


def compile_model(model, target="llvm", out_dir=None, force: bool = False, progress=print,
                  options: BuildOptions | None = None, **fields) -> Path:
    """ONNX (file, or an export folder with tokenizer + tvm_lite_model.json) -> artifact folder.
    A .gguf file or a Hugging Face folder is exported first (dynamo, cached): ``onnx_input``.

    ``options``: a :class:`tvm_lite.options.BuildOptions` (``kv_cache``, ``memory_plan``,
    ``quant``, ``tuning_db``, ``pipeline``, ``fusion``, ``fused_attention``: documented there);
    its fields may also be given as keyword arguments, which replace the object's. The model is
    a decoder with past, so the default ``kv_cache="auto"`` builds it in place. With a tuning
    database a past/present artifact has a ``decode`` function too; ``pipeline="stock"`` is
    TVM's default pipeline (the baseline; past/present KV).

    The manifest records the options and the compiled module's calling convention
    (``"convention"``: what its ``_metadata`` function returns), which the engine follows."""
    from .pipeline import interleaves_gate_up, resolved, tir_pipeline
    from .schedules.cpu_target import weight_panel
    from .target import parse_target  # (tvm.target: not in a runtime-only process, which loads)

    opts = BuildOptions.of(options, **fields)
    onnx_path = onnx_input(model, progress=progress)
    tgt = parse_target(target)
    opts = resolved(tgt, opts)  # (dependent_launch="auto": decided by the target)
    if opts.kv_cache == KV_AUTO:  # a decoder with past (checked on import): in place
        opts = opts.replace(kv_cache=KV_INPLACE)
    if opts.stock:
        opts = opts.replace(kv_cache=KV_COPY, memory_plan="tvm")
    if opts.tuning_db is not None:
        opts = opts.replace(tuning_db=check_database(opts.tuning_db), decode_function=True)
    inplace = opts.kv_cache == KV_INPLACE
    if opts.kv_windows is None:  # the sliding-window layers' ring caches, from the export
        opts = opts.replace(kv_windows=tuple(export_windows(onnx_path.parent)))
    options: dict = {"kv_cache": opts.kv_cache, "memory_plan": opts.memory_plan,
                     "fused_attention": bool(opts.fused_attention and inplace)}
    if inplace and opts.fused_attention and any(opts.kv_windows):  # (absent: no ring caches)
        options["kv_windows"] = list(opts.kv_windows)
    if opts.stock:
        options["pipeline"] = opts.pipeline
    if not opts.fusion:
        options["fusion"] = False  # (absent = True: keeps the cache keys of fused builds short)
    if not opts.merge_projections or opts.stock:
        options["merge_projections"] = False
    if opts.quant is not None:
        options["quant"] = opts.quant.to_dict()
    if opts.tuning_db is not None:  # the database's contents are part of the cache key
        options.update(tuning_db=database_digest(opts.tuning_db), decode_function=True)
    if opts.dependent_launch and not opts.stock:
        tir_pipeline(tgt, opts)  # a target without it: the error now, before export and quant
        options["dependent_launch"] = opts.dependent_launch  # (absent = False: old keys hold)
    if "merge_projections" not in options and interleaves_gate_up(tgt):
        options["gate_up"] = "interleaved"  # (absent: halves; the layout is part of the key)
    panel = weight_panel(tgt) if opts.weight_panels and not opts.stock else None
    if panel:  # the weights stored panel-major (params.npz too)
        options["weight_panels"] = panel
    opts = opts.replace(fused_attention=options["fused_attention"])
    key = compile_key(onnx_path, str(tgt), options)
    out = Path(out_dir) if out_dir else cache_dir() / "compiled" / key
    manifest_path = out / MANIFEST

    def built() -> bool:
        return not force and _manifest_key(manifest_path) == key

    if built():
        return out
    # one process compiles a cache entry; another one asking for it (a second test worker, a
    # second shell) waits and then finds it built
    with cache_lock(out):
        if built():
            return out
        _check_output_dir(out)
        with atomic_dir(out) as tmp:  # a killed compile leaves the previous entry or none
            _compile_into(tmp, key, onnx_path, tgt, options, opts, progress)
        return out


def weights_as_built(mod, merge_projections: bool = True, panel: int | None = None,
                     progress=print, interleave_gate_up: bool = False):
    """``mod`` (imported, weights attached, quantized if it is to be) with its weights as a build
    stores them: the projections that share an input merged into one matrix
    (``relax_passes/merge_shared_input_projections.py``; ``interleave_gate_up``: a gated MLP's
    gate and up interleaved, as ``pipeline.interleaves_gate_up(target)`` says for the build's
    target; otherwise gate then up), then, on a CPU (``panel``: its panel width), every weight
    matrix panel-major (``relax_passes/pack_weight_panels.py``). ``compile_model`` and
    ``tvm-lite tune`` both call it, so tuned kernels are the build's. Both steps are
    idempotent."""
    from .relax_passes import MergeSharedInputProjections, PackWeightPanels

    if merge_projections:
        merge = MergeSharedInputProjections(interleave_gate_up=interleave_gate_up)
        mod = merge(mod)
        if progress is not None:
            progress(f"merged {merge.merged} projections into {merge.groups} matmuls")
    if panel:
        packer = PackWeightPanels(panel)
        mod = packer(mod)
        if progress is not None:
            progress(f"{packer.stats['packed_weights']} weights stored in panels of {panel} "
                     f"columns ({packer.stats['matmul']} matmuls)")
    return mod


WEIGHT_STORE = "weights"


def save_params(path: Path, arrays: list) -> None:
    """Write ``arrays`` to ``path`` as an .npz (``p0``, ``p1``, ...). The file is a hard link to
    one stored copy per distinct set of weights in the cache, so the five fp32 builds of one model
    hold its weights once on disk; a copy where a link cannot be made (another file system).
    Stored copies no artifact links to any more are removed."""
    digest = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape};".encode())
        digest.update(memoryview(a).cast("B"))
    store = cache_dir() / WEIGHT_STORE
    stored = store / f"{digest.hexdigest()}.npz"
    with cache_lock(stored):
        if not stored.exists():
            with atomic_file(stored, "wb") as (f, _):
                np.savez(f, **{f"p{i}": a for i, a in enumerate(arrays)})
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(stored, path)
        except OSError:
            shutil.copyfile(stored, path)
    _remove_unlinked(store, keep=stored)


def _remove_unlinked(store: Path, keep: Path) -> None:
    """Remove the stored weights that no artifact links to (link count 1: only the store's)."""
    for f in store.glob("*.npz"):
        if f == keep:
            continue
        with cache_lock(f):  # not while another build links it
            try:
                if f.stat().st_nlink == 1:
                    f.unlink()
            except OSError:
                pass  # another process removed it first


def _manifest_key(path: Path):
    """The cache key a manifest records (None if it is missing or unreadable: rebuild)."""
    try:
        return json.loads(path.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _check_output_dir(out: Path) -> None:
    """An output directory is replaced whole: refuse one that holds something else."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists()):
        raise ArtifactError(f"output {out} exists and is not a tvm_lite artifact (no {MANIFEST}); "
                            "give a new or empty directory")


def _compile_into(out: Path, key: str, onnx_path: Path, tgt, options: dict, opts: BuildOptions,
                  progress) -> Path:
    """compile_model's work, once it holds the entry's lock. ``options``: what the manifest
    records (and the cache key hashes); ``opts``: the build options."""
    from .compiler import build, detach_params, device_source
    from .frontend import from_onnx

    folder = onnx_path.parent
    manifest_path = out / MANIFEST
    t0 = time.perf_counter()
    progress(f"importing {onnx_path}")
    mod = from_onnx(onnx_path)
    check_decoder_interface(list(mod[MAIN].attrs[INPUT_NAMES_ATTR]),
                            list(mod[MAIN].attrs[OUTPUT_NAMES_ATTR]))
    check_module_weights(mod)  # NaN/inf weights: an error naming the weight, not NaN logits
    t_import = time.perf_counter() - t0
    quant_summary = None
    if opts.quant is not None:
        from .quant.quantize import quantize_module, tokenizer_of

        t_q = time.perf_counter()
        mod, quant_summary = quantize_module(mod, opts.quant, tokenizer_of(folder), progress)
        quant_summary["quantize_seconds"] = round(time.perf_counter() - t_q, 2)
    mod = weights_as_built(mod, options.get("merge_projections", True),  # 4-bit ones packed
                           options.get("weight_panels"), progress,
                           options.get("gate_up") == "interleaved")
    mod, params = detach_params(mod)
    func = mod[MAIN]
    progress(f"compiling for {tgt.kind.name} ({len(params)} weights)")
    t1 = time.perf_counter()
    applied: list = []
    described: list = []
    ex = build(mod, tgt, opts, applied=applied, described=described)
    if opts.tuning_db is not None:
        progress(f"{len(applied)} kernels from the tuning database {opts.tuning_db}: "
                 f"{', '.join(applied) or 'none matched'}")
    t_compile = time.perf_counter() - t1

    out.mkdir(parents=True, exist_ok=True)
    if tgt.kind.name == "opencl":
        (out / "kernels.cl").write_text(device_source(ex, "opencl"))
    _export_library(ex, out / LIBRARY, tgt)
    save_params(out / PARAMS, [p.numpy() for p in params])
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copy(folder / name, out / name)
    model_cfg = json.loads((folder / MODEL_JSON).read_text()) if (folder / MODEL_JSON).exists() else {}
    import tvm

    manifest = {
        "key": key,
        "tvm_lite_version": __version__,
        "tvm_version": tvm.__version__,
        "target": str(tgt),
        "target_kind": tgt.kind.name,
        "options": options,
        "convention": described[0] if described else None,  # None: the stock pipeline's build
        "quant": quant_summary,
        "model": model_cfg,
        "onnx": str(onnx_path),
        "input_names": list(func.attrs[INPUT_NAMES_ATTR]),
        "output_names": list(func.attrs[OUTPUT_NAMES_ATTR]),
        "param_names": list(func.attrs[PARAM_NAMES_ATTR]),
        "import_seconds": round(t_import, 2),
        "compile_seconds": round(t_compile, 2),
    }
    if opts.tuning_db is not None:
        manifest.update(tuning_db=str(opts.tuning_db), tuned_kernels=applied)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return out


def load_manifest(artifact) -> dict:
    path = Path(artifact) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"not a tvm_lite artifact (no {MANIFEST}): {artifact}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"corrupt {path}: {err}; recompile it (tvm-lite compile)") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"corrupt {path}: not a JSON object; recompile it (tvm-lite compile)")
    return manifest


# -- checking an artifact before loading it ------------------------------------------------------
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
    manifest, and a tokenizer. Raises :class:`ArtifactError` naming the file
    (nothing is loaded)."""
    import platform
    import zipfile

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
