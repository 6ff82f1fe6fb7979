"""Compiled artifacts: one directory a phone (or a runtime-only TVM process) can load.

    model.so        the exported library (host code + device kernels)
    kernels.cl      the OpenCL source (OpenCL targets only, for reading and checking)
    params.npz      the weights, in the order of ``manifest["param_names"]``
    tokenizer.json  (and the other tokenizer files)
    manifest.json   model config, target, options, tvm_lite/TVM versions, input/output names

``compile_model`` caches artifacts by a hash of everything that goes into them.
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
from .export import MODEL_JSON, cache_dir, cache_lock

MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.npz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class ArtifactError(ValueError):
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
                  kv_cache: str = "inplace", memory_plan: str = "arena", quant=None,
                  tuning_db=None, pipeline: str = "tvm_lite", fusion: bool = True,
                  fused_attention: bool = True) -> Path:
    """ONNX (file, or an export folder with tokenizer + tvm_lite_model.json) -> artifact folder.
    A .gguf file or a Hugging Face folder is exported first (dynamo, cached): ``onnx_input``.

    ``kv_cache``: "inplace" (one cache per layer written in place) or "copy" (the exported
    past/present interface); ``memory_plan``: "arena" (activations in workspace buffers the
    engine allocates once) or "tvm"; the engine reads both from the manifest.
    ``quant``: a ``tvm_lite.quant.QuantConfig`` (4-bit E0M4/int4 weights) or None (fp weights).
    ``tuning_db``: a MetaSchedule database directory (``tvm-lite tune``) whose kernels replace
    tvm_lite's schedules where they measured faster than them in the tuning session (kernels
    tuned without a rules time keep their records); a past/present artifact then has a ``decode``
    function too. ``pipeline="stock"``: TVM's default pipeline (the baseline; past/present KV).
    ``fusion``, ``fused_attention``: see :func:`tvm_lite.build`."""
    from .target import parse_target

    onnx_path = onnx_input(model, progress=progress)
    tgt = parse_target(target)
    if kv_cache not in ("inplace", "copy"):
        raise ArtifactError(f"kv_cache={kv_cache!r}: expected 'inplace' or 'copy'")
    if pipeline == "stock":
        kv_cache, memory_plan = "copy", "tvm"
    options: dict = {"kv_cache": kv_cache, "memory_plan": memory_plan,
                     "fused_attention": bool(fused_attention and kv_cache == "inplace")}
    if pipeline != "tvm_lite":
        options["pipeline"] = pipeline
    if not fusion:
        options["fusion"] = False  # (absent = True: keeps the cache keys of fused builds short)
    if quant is not None:
        options["quant"] = quant.to_dict()
    if tuning_db is not None:  # the database's contents are part of the cache key
        from tvm_lite.rpc.tune import check_database, database_digest

        tuning_db = check_database(tuning_db)
        options.update(tuning_db=database_digest(tuning_db), decode_function=True)
    key = compile_key(onnx_path, str(tgt), options)
    out = Path(out_dir) if out_dir else cache_dir() / "compiled" / key
    manifest_path = out / MANIFEST

    def built() -> bool:
        return manifest_path.exists() and not force \
            and json.loads(manifest_path.read_text()).get("key") == key

    if built():
        return out
    # one process compiles a cache entry; another one asking for it (a second test worker, a
    # second shell) waits and then finds it built
    with cache_lock(out):
        if built():
            return out
        return _compile_into(out, key, onnx_path, tgt, options, progress, kv_cache=kv_cache,
                             memory_plan=memory_plan, quant=quant, tuning_db=tuning_db,
                             pipeline=pipeline, fusion=fusion)


def _compile_into(out: Path, key: str, onnx_path: Path, tgt, options: dict, progress, *,
                  kv_cache, memory_plan, quant, tuning_db, pipeline, fusion) -> Path:
    """compile_model's work, once it holds the entry's lock."""
    from .compiler import build, detach_params, device_source
    from .frontend import from_onnx

    folder = onnx_path.parent
    manifest_path = out / MANIFEST
    t0 = time.perf_counter()
    progress(f"importing {onnx_path}")
    mod = from_onnx(onnx_path)
    check_decoder_interface(list(mod["main"].attrs["tvm_lite.input_names"]),
                            list(mod["main"].attrs["tvm_lite.output_names"]))
    t_import = time.perf_counter() - t0
    quant_summary = None
    if quant is not None:
        from .quant.quantize import quantize_module, tokenizer_of

        t_q = time.perf_counter()
        mod, quant_summary = quantize_module(mod, quant, tokenizer_of(folder), progress)
        quant_summary["quantize_seconds"] = round(time.perf_counter() - t_q, 2)
    mod, params = detach_params(mod)
    func = mod["main"]
    progress(f"compiling for {tgt.kind.name} ({len(params)} weights)")
    t1 = time.perf_counter()
    applied: list = []
    ex = build(mod, tgt, kv_cache=kv_cache, memory_plan=memory_plan, tuning_db=tuning_db,
               applied=applied, pipeline=pipeline, fusion=fusion,
               fused_attention=options["fused_attention"])
    if tuning_db is not None:
        progress(f"{len(applied)} kernels from the tuning database {tuning_db}: "
                 f"{', '.join(applied) or 'none matched'}")
    t_compile = time.perf_counter() - t1

    out.mkdir(parents=True, exist_ok=True)
    if tgt.kind.name == "opencl":
        (out / "kernels.cl").write_text(device_source(ex, "opencl"))
    _export_library(ex, out / LIBRARY, tgt)
    np.savez(out / PARAMS, **{f"p{i}": p.numpy() for i, p in enumerate(params)})
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
        "quant": quant_summary,
        "model": model_cfg,
        "onnx": str(onnx_path),
        "input_names": list(func.attrs["tvm_lite.input_names"]),
        "output_names": list(func.attrs["tvm_lite.output_names"]),
        "param_names": list(func.attrs["tvm_lite.param_names"]),
        "import_seconds": round(t_import, 2),
        "compile_seconds": round(t_compile, 2),
    }
    if tuning_db is not None:
        manifest.update(tuning_db=str(tuning_db), tuned_kernels=applied)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return out


def load_manifest(artifact) -> dict:
    path = Path(artifact) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"not a tvm_lite artifact (no {MANIFEST}): {artifact}")
    return json.loads(path.read_text())
