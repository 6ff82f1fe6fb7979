"""The ``tvm-lite`` command line: export, compile, run, bench."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[tvm-lite] {msg}", file=sys.stderr, flush=True)


def resolve_artifact(model, target: str, exporter: str = "dynamo", force: bool = False) -> Path:
    """A model given as an artifact dir, an ONNX file / export dir, a .gguf / HF folder, or
    nothing (the embedded default) -> a compiled artifact dir (exporting/compiling if needed)."""
    from .artifact import MANIFEST, compile_model

    if model is not None and (Path(model) / MANIFEST).exists():
        return Path(model)
    onnx_like = model is not None and (str(model).endswith(".onnx") or (Path(model) / "model.onnx").exists())
    if not onnx_like:
        from .export import export_onnx

        model = export_onnx(model, exporter=exporter, progress=_log)
    return compile_model(model, target, force=force, progress=_log)


def resolve_onnx(model, exporter: str = "dynamo"):
    """An ONNX file / export dir as given, or the export of a .gguf / HF folder / the default."""
    if model is not None and (str(model).endswith(".onnx") or (Path(model) / "model.onnx").exists()):
        return model
    from .export import export_onnx

    return export_onnx(model, exporter=exporter, progress=_log)


def _add_model_args(p, target=True):
    p.add_argument("--model", default=None,
                   help="artifact dir, ONNX file/export dir, .gguf file or HF folder "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    if target:
        p.add_argument("--target", default="llvm", help='e.g. llvm, "opencl -device=adreno"')


def cmd_export(args):
    from .export import export_onnx

    out = export_onnx(args.source, out_dir=args.output, exporter=args.exporter, force=args.force,
                      progress=_log)
    print(out)


def cmd_compile(args):
    from .artifact import compile_model

    model = args.model
    if not (str(model).endswith(".onnx") or (Path(model) / "model.onnx").exists()):
        from .export import export_onnx

        model = export_onnx(model, exporter=args.exporter, progress=_log)
    out = compile_model(model, args.target, out_dir=args.output, force=args.force, progress=_log,
                        tuning_db=args.tuning_db)
    print(out)


def cmd_run(args):
    from .engine import Engine, GenerationConfig

    artifact = resolve_artifact(args.model, args.target, args.exporter)
    engine = Engine(artifact, device=args.device, max_context=args.max_context)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)
    for piece in engine.stream(args.prompt, cfg, chat=not args.no_chat):
        print(piece, end="", flush=True)
    print()
    r = engine.last
    _log(f"prompt {r.prompt_tokens} tokens: prefill {r.prefill_tok_s:.1f} tok/s | "
         f"{len(r.token_ids)} new tokens: decode {r.decode_tok_s:.1f} tok/s | finish: {r.finish_reason}")


def cmd_bench(args):
    if args.artifact or args.rpc:  # [rpc] an artifact on a device, local or over RPC
        from tvm_lite.rpc.cli import cmd_device_bench

        return cmd_device_bench(args)
    args.prompt_len = int(str(args.prompt_len or 128).split(",")[0])
    from .artifact import compile_model, load_manifest
    from .bench import _prompt_ids, bench_onnxruntime, bench_tvm, format_table
    from .engine import Engine
    from .export import export_onnx

    folder = Path(args.model) if args.model and Path(args.model).is_dir() else \
        export_onnx(args.model, exporter=args.exporter, progress=_log)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = compile_model(folder, args.target, out_dir=tmp, force=True, progress=_log)
        manifest = load_manifest(artifact)
        engine = Engine(artifact)
        _log(f"benchmarking tvm_lite: prompt {args.prompt_len} tokens, decode {args.decode_tokens}")
        tvm_speed = bench_tvm(engine, args.prompt_len, args.decode_tokens, args.repeats)
        rows = [{"engine": "tvm_lite (llvm)", "import s": manifest["import_seconds"],
                 "compile s": manifest["compile_seconds"], **tvm_speed}]
        if not args.no_onnxruntime:
            _log("benchmarking onnxruntime (CPU) on the same ONNX file")
            ort_speed = bench_onnxruntime(folder / "model.onnx", manifest["model"],
                                          _prompt_ids(engine, args.prompt_len), args.decode_tokens,
                                          args.repeats)
            rows.append({"engine": "onnxruntime (CPU)", **ort_speed})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, ["engine", "import s", "compile s", "prefill_tok_s", "decode_tok_s"]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tvm-lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX (decoder with past)")
    p.add_argument("source", nargs="?", default=None, help=".gguf file or HF folder (default: SmolLM2)")
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("compile", help="compile an ONNX model into an artifact directory")
    p.add_argument("model", help="ONNX file or export dir (or .gguf / HF folder: exported first)")
    p.add_argument("--target", default="llvm")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--tuning-db", default=None, help="MetaSchedule database from `tvm-lite tune`")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="answer a prompt")
    p.add_argument("prompt")
    _add_model_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, no chat template")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="tok/s next to onnxruntime; or of ARTIFACT on a device "
                                     "(local, or --rpc HOST:PORT --key K)")
    _add_model_args(p)
    from tvm_lite.rpc.cli import add_bench_args, add_commands

    add_bench_args(p)
    p.add_argument("--prompt-len", default=None,
                   help="prompt length (default 128); with ARTIFACT a list (default 64,256,1024)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench)

    add_commands(sub)  # rpc tracker|server|status, tune

    args = parser.parse_args(argv)
    from tvm_lite.rpc.processes import RPCError
    from tvm_lite.rpc.tune import TuningError

    from .artifact import ArtifactError
    from .engine import ContextLengthError
    from .export import ExportError
    from .frontend import OnnxImportError
    from .target import TargetError

    try:
        return args.fn(args) or 0
    except (ArtifactError, ContextLengthError, ExportError, OnnxImportError, TargetError,
            RPCError, TuningError) as err:
        print(f"tvm-lite: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
