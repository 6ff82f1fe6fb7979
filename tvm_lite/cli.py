"""The ``tvm-lite`` command line: export, compile, run, bench, quality."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[tvm-lite] {msg}", file=sys.stderr, flush=True)


def resolve_artifact(model, target: str, exporter: str = "dynamo", force: bool = False,
                     quant=None) -> Path:
    """A model given as an artifact dir, an ONNX file / export dir, a .gguf / HF folder, or
    nothing (the embedded default) -> a compiled artifact dir (exporting/compiling if needed)."""
    from .artifact import MANIFEST, compile_model

    if model is not None and (Path(model) / MANIFEST).exists():
        return Path(model)
    onnx_like = model is not None and (str(model).endswith(".onnx") or (Path(model) / "model.onnx").exists())
    if not onnx_like:
        from .export import export_onnx

        model = export_onnx(model, exporter=exporter, progress=_log)
    return compile_model(model, target, force=force, progress=_log, quant=quant)


def _add_quant_args(p, several: bool = False):
    g = p.add_argument_group("4-bit weights (tvm_lite.quant)")
    if several:
        g.add_argument("--quant", default="none",
                       help="comma list of none, e0m4, int4: one row each, in the same run")
    else:
        g.add_argument("--quant", default="none", choices=["none", "e0m4", "int4"],
                       help="E0M4 (Transformer-Lite) or MLC-style int4 weights for every weight matmul")
    g.add_argument("--quant-method", default="rtn", choices=["rtn", "gptq", "awq"])
    g.add_argument("--group-size", type=int, default=None, help="weights per scale along K (default 32)")
    g.add_argument("--quant-lm-head", action="store_true", help="also quantize the lm_head")
    g.add_argument("--quant-embedding", action="store_true", help="also quantize the embedding")
    g.add_argument("--act-order", action="store_true", help="GPTQ: visit channels by activation size")


def _quant_config(args, fmt=None):
    from .quant import QuantConfig

    return QuantConfig.parse(fmt if fmt is not None else args.quant, method=args.quant_method,
                             group_size=args.group_size, include_lm_head=args.quant_lm_head,
                             include_embedding=args.quant_embedding, act_order=args.act_order)


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

    from .artifact import onnx_input

    model = onnx_input(args.model, exporter=args.exporter, progress=_log)
    out = compile_model(model, args.target, out_dir=args.output, force=args.force, progress=_log,
                        kv_cache=args.kv_cache, quant=_quant_config(args),
                        tuning_db=args.tuning_db)
    print(out)


def cmd_run(args):
    from .engine import Engine, GenerationConfig

    artifact = resolve_artifact(args.model, args.target, args.exporter, quant=_quant_config(args))
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
    if args.artifact or args.rpc:  # an artifact on a device, local or over RPC (tvm_lite.rpc)
        from tvm_lite.rpc.cli import cmd_device_bench

        return cmd_device_bench(args)
    args.prompt_len = int(str(args.prompt_len or 128).split(",")[0])
    from .artifact import compile_model, load_manifest
    from .bench import _prompt_ids, bench_onnxruntime, bench_tvm, format_table
    from .engine import Engine
    from .export import export_onnx

    folder = Path(args.model) if args.model and Path(args.model).is_dir() else \
        export_onnx(args.model, exporter=args.exporter, progress=_log)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.quant.split(","):  # e.g. --quant none,int4,e0m4: one row each, same run
            quant = _quant_config(args, fmt.strip())
            artifact = compile_model(folder, args.target, out_dir=Path(tmp) / fmt, force=True,
                                     progress=_log, quant=quant)
            manifest = load_manifest(artifact)
            engine = Engine(artifact)
            label = f"tvm_lite ({args.target}{', ' + quant.label if quant else ''})"
            _log(f"benchmarking {label}: prompt {args.prompt_len} tokens, decode {args.decode_tokens}")
            tvm_speed = bench_tvm(engine, args.prompt_len, args.decode_tokens, args.repeats)
            rows.append({"engine": label, "import s": manifest["import_seconds"],
                         "compile s": manifest["compile_seconds"], **tvm_speed})
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


def cmd_bench_kv(args):
    from .artifact import compile_model
    from .bench import bench_kv_cache, format_table
    from .engine import Engine
    from .export import export_onnx

    folder = Path(args.model) if args.model and Path(args.model).is_dir() else \
        export_onnx(args.model, exporter=args.exporter, progress=_log)
    contexts = [int(c) for c in args.contexts.split(",")]
    max_context = args.max_context or max(contexts) + args.decode_tokens
    engines = {mode: Engine(compile_model(folder, args.target, kv_cache=mode, progress=_log),
                            max_context=max_context) for mode in ("inplace", "copy")}
    rows = bench_kv_cache(engines, contexts, args.decode_tokens, progress=_log)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, ["context", "kv_cache", "decode_tok_s",
                                  "kv_bytes_copied_per_step", "kv_MB_at_max_context"]))


def cmd_bench_kernels(args):
    from . import bench_kernels as bk

    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in bk.MODELS]
    if unknown:
        raise SystemExit(f"tvm-lite: error: unknown --models {unknown}; known: {list(bk.MODELS)}")
    try:
        result = bk.run(args.target, models=models, lengths=[int(n) for n in args.lengths.split(",")],
                        decode=args.phase in ("both", "decode"),
                        prefill=args.phase in ("both", "prefill"),
                        checkpoint=(lambda r: bk.save_json(r, args.json)) if args.json else None)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"tvm-lite: error: {err}") from None
    print(bk.format_tables(result))
    if args.json:
        bk.save_json(result, args.json)


def cmd_memory(args):
    from . import memory
    from .artifact import compile_model
    from .bench import _prompt_ids, format_table
    from .engine import Engine
    from .export import export_onnx
    from .frontend import from_onnx

    folder = Path(args.model) if args.model and Path(args.model).is_dir() else \
        export_onnx(args.model, exporter=args.exporter, progress=_log)
    seqs = [int(s) for s in args.seqs.split(",")]
    _log("planning activation memory (none / TVM / TVM with a bound / tvm_lite)")
    rows = memory.plan_table(from_onnx(folder / "model.onnx"), seqs, past=0, bound=args.bound)
    rows += memory.plan_table(from_onnx(folder / "model.onnx"), [1], past=args.bound - 1,
                              bound=args.bound)
    print(format_table(rows, list(rows[0])))
    steps = []
    for kv, plan in (("inplace", "arena"), ("copy", "tvm")):
        engine = Engine(compile_model(folder, "llvm", kv_cache=kv, memory_plan=plan, progress=_log),
                        max_context=args.bound)
        counter = memory.StepCounter(engine.vm)
        session = engine.new_session()
        engine.prefill(session, _prompt_ids(engine, 100))
        engine.forward(session, [42])  # warm-up
        counter.reset()
        engine.forward(session, [43])
        steps.append({"engine": f"kv={kv}, plan={plan}", "allocations per decode step":
                      counter.allocations, "VM calls": sum(counter.calls.values()),
                      "shape-builtin ms per decode step": counter.shape_seconds * 1e3})
    print(format_table(steps, list(steps[0])))
    # padding: host shape work and distinct shapes over prompts of many lengths
    folder_artifact = compile_model(folder, "llvm", progress=_log)
    padding = []
    for buckets in ((16, 32, 64, 128, 256), ()):
        engine = Engine(folder_artifact, max_context=args.bound, buckets=buckets)
        counter = memory.StepCounter(engine.vm)
        shapes, prefill_ms, decode_ms, calls = set(), [], [], 0
        for length in range(20, 120, 7):
            session = engine.new_session()
            counter.reset()
            engine.prefill(session, _prompt_ids(engine, length))
            shapes.add(session.last_call)
            prefill_ms.append(counter.shape_seconds * 1e3)
            for token in (42, 43):
                counter.reset()
                engine.forward(session, [token])
                decode_ms.append(counter.shape_seconds * 1e3)
        padding.append({"buckets": ",".join(map(str, buckets)) or "none (exact)",
                        "distinct prefill shapes": len(shapes),
                        "shape ms per prefill call": sum(prefill_ms) / len(prefill_ms),
                        "shape ms per decode step": sum(decode_ms) / len(decode_ms)})
    print(format_table(padding, list(padding[0])))


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
    p.add_argument("--kv-cache", default="inplace", choices=["inplace", "copy"],
                   help="one cache per layer written in place (default), or the exported "
                        "past/present copies")
    _add_quant_args(p)
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
    _add_quant_args(p)
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
    _add_quant_args(p, several=True)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("bench-kv", help="decode tok/s and KV copies/memory: in-place vs past/present")
    _add_model_args(p)
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--max-context", type=int, default=None,
                   help="cache rows per session (default: the largest context + decode tokens)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench_kv)

    p = sub.add_parser("bench-kernels", help="per-kernel GPU GEMV GB/s and GEMM TFLOP/s vs stock DLight")
    p.add_argument("--target", default="cuda")
    p.add_argument("--models", default="smollm2-135m,gemma-2b")
    p.add_argument("--lengths", default="128,512,2048", help="prefill lengths")
    p.add_argument("--phase", choices=["both", "decode", "prefill"], default="both")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(fn=cmd_bench_kernels)

    p = sub.add_parser("memory", help="planned activation memory per function; allocations per step")
    _add_model_args(p, target=False)
    p.add_argument("--seqs", default="1,128,512,2048")
    p.add_argument("--bound", type=int, default=2048, help="the upper bound given to TVM's plan")
    p.set_defaults(fn=cmd_memory)

    from .quant import evaluate as quality

    p = sub.add_parser("quality", help="4-bit weights: perplexity, Paris, sizes (tvm_lite.quant)")
    quality.add_arguments(p)
    p.set_defaults(fn=lambda a: quality.run(a, log=_log))

    add_commands(sub)  # rpc tracker|server|status, tune

    args = parser.parse_args(argv)
    from tvm_lite.rpc.processes import RPCError
    from tvm_lite.rpc.tune import TuningError

    from .artifact import ArtifactError
    from .engine import ContextLengthError
    from .export import ExportError
    from .frontend import OnnxImportError
    from .quant import QuantFormatError
    from .target import TargetError

    try:
        return args.fn(args) or 0
    except (ArtifactError, ContextLengthError, ExportError, OnnxImportError, QuantFormatError,
            TargetError, RPCError, TuningError) as err:
        print(f"tvm-lite: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
