"""The ``tvm-lite`` command line: export, compile, run, bench, quality."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .cli_common import add_quant_args as _add_quant_args
from .cli_common import log as _log
from .cli_common import quant_config as _quant_config
from .cli_common import resolve_artifact, resolve_onnx
from .errors import UserError
from .options import KV_CACHE_MODES, PDL_AUTO, PDL_GRAPHS, BuildOptions


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
    from .artifact import compile_model, onnx_input

    options = BuildOptions(kv_cache=args.kv_cache, quant=_quant_config(args),  # checked first
                           tuning_db=args.tuning_db,
                           dependent_launch={"all": True, "off": False, None: PDL_AUTO}.get(
                               args.dependent_launch, args.dependent_launch))
    model = onnx_input(args.model, exporter=args.exporter, progress=_log)
    out = compile_model(model, args.target, out_dir=args.output, force=args.force, progress=_log,
                        options=options)
    print(out)


def _check_local_run(model, target, device=None):
    """Before any export or compile: can this machine run the build (tvm_lite.target)?"""
    from .artifact import MANIFEST, load_manifest
    from .target import check_runnable

    if model is not None and (Path(model) / MANIFEST).exists():
        target = load_manifest(model).get("target_kind", "llvm")
    return check_runnable(target, device)


def cmd_run(args):
    from .checks import check_request
    from .engine import Engine, GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)
    check_request(args.prompt, cfg)
    device = _check_local_run(args.model, args.target, args.device)
    artifact = resolve_artifact(args.model, args.target, args.exporter, quant=_quant_config(args))
    engine = Engine(artifact, device=device, max_context=args.max_context)
    for piece in engine.stream(args.prompt, cfg, chat=not args.no_chat):
        print(piece, end="", flush=True)
    print()
    r = engine.last
    _log(f"prompt {r.prompt_tokens} tokens: prefill {r.prefill_tok_s:.1f} tok/s | "
         f"{len(r.token_ids)} new tokens: decode {r.decode_tok_s:.1f} tok/s | finish: {r.finish_reason}")


def cmd_bench(args):
    if args.cpu_time and (args.artifact or args.rpc or os.environ.get("TVM_NUM_THREADS") != "1"):
        raise UserError("--cpu-time measures one thread per engine in this process: run it as "
                        "TVM_NUM_THREADS=1 tvm-lite bench --cpu-time ... (not with an ARTIFACT "
                        "or --rpc)")
    if not args.rpc:
        _check_local_run(args.artifact or args.model, args.target, args.device)
    if args.artifact or args.rpc:  # an artifact on a device, local or over RPC (tvm_lite.rpc)
        from tvm_lite.rpc.cli import cmd_device_bench

        return cmd_device_bench(args)
    args.prompt_len = int(str(args.prompt_len or 128).split(",")[0])
    from .artifact import compile_model, load_manifest
    from .bench import format_rows
    from .bench.generation import OnnxRuntimeGeneration, bench_side_by_side
    from .engine import Engine
    from .export import export_onnx

    folder = Path(args.model) if args.model and Path(args.model).is_dir() else \
        export_onnx(args.model, exporter=args.exporter, progress=_log)
    engines, built = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.quant.split(","):  # e.g. --quant none,int4,e0m4: one row each, same run
            quant = _quant_config(args, fmt.strip())
            artifact = compile_model(folder, args.target, out_dir=Path(tmp) / fmt, force=True,
                                     progress=_log, quant=quant)
            manifest = load_manifest(artifact)
            label = f"tvm_lite ({args.target}{', ' + quant.label if quant else ''})"
            engines[label] = Engine(artifact)
            built[label] = {"import s": manifest["import_seconds"],
                            "compile s": manifest["compile_seconds"]}
        ort = None if args.no_onnxruntime else \
            OnnxRuntimeGeneration(folder / "model.onnx", manifest["model"],
                                  threads=1 if args.cpu_time else None)
        _log(f"benchmarking {', '.join(engines)}{' and onnxruntime (CPU) on the same ONNX file' if ort else ''}, "
             f"interleaved: prompt {args.prompt_len} tokens, decode {args.decode_tokens}")
        rows = [{**built.get(r["engine"], {}), **r}
                for r in bench_side_by_side(engines, ort, args.prompt_len, args.decode_tokens,
                                            args.repeats, progress=_log,
                                            clock=time.process_time if args.cpu_time else None)]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_rows(rows, first=("engine", "import s", "compile s")))


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
    from .bench import kernels as bk

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
    from .bench import format_table, prompt_ids
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
        engine.prefill(session, prompt_ids(engine, 100))
        engine.forward(session, [42])  # warm-up
        counter.reset()
        engine.forward(session, [43])
        steps.append({"engine": f"kv={kv}, plan={plan}", "allocations per decode step":
                      counter.allocations, "VM calls": sum(counter.calls.values()),
                      "shape-builtin ms per decode step": counter.shape_seconds * 1e3,
                      # the session's KV caches (ring caches of sliding-window layers: window rows)
                      f"KV MB at {args.bound} tokens": engine.kv_cache_bytes(args.bound) / 1e6})
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
            engine.prefill(session, prompt_ids(engine, length))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: the full error chain instead of one line
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="tvm-lite", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the whole chain (TVM's original error too)")
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
    p.add_argument("--kv-cache", default=BuildOptions.kv_cache, choices=KV_CACHE_MODES,
                   help="one cache per layer written in place (auto, the default: a decoder "
                        "with past always has one; inplace), or the exported past/present "
                        "copies")
    _add_quant_args(p)
    p.add_argument("--tuning-db", default=None, help="MetaSchedule database from `tvm-lite tune`")
    p.add_argument("--dependent-launch", nargs="?", const="all", default=None,
                   choices=["all", PDL_GRAPHS, "off"],
                   help="CUDA sm_90+: each kernel's launch overlaps the tail of the one before "
                        f"(programmatic dependent launch; all kernels, or '{PDL_GRAPHS}': only "
                        "those replayed as CUDA graphs, the default on CUDA sm_90+; 'off': none)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="answer a prompt")
    p.add_argument("prompt")
    _add_model_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda:0... (default: the build's)")
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
    p.add_argument("--cpu-time", action="store_true",
                   help="time calls in CPU seconds, one thread per engine (with TVM_NUM_THREADS=1;"
                        " onnxruntime gets 1 thread): ratios a busy machine does not skew")
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

    from . import profile as step_profile

    p = sub.add_parser("profile", help="per-kernel GPU time of a prefill and a decode step")
    step_profile.add_arguments(p)
    p.set_defaults(fn=step_profile.run)

    add_commands(sub)  # rpc tracker|server|status, tune

    args = parser.parse_args(argv)
    from .errors import run_reporting_errors

    return run_reporting_errors(lambda: args.fn(args) or 0, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
