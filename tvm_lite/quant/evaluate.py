"""``tvm-lite quality``: what 4-bit weights cost in quality, and what they save in bytes.

For every configuration the model is compiled by tvm_lite (LLVM, this CPU) and run by the engine:

* **perplexity** on held-out text -- the last part of ``pydoc_data.topics``, which calibration
  never sees (:mod:`.calibration`) -- fed in chunks through the KV cache, every token predicted
  from all the tokens before it;
* **Paris**: does greedy decoding of "What is the capital of France?" still say Paris;
* **bytes per weight** of the quantized matrices (codes + scales + zeros + AWQ's input scale) and
  the artifact's ``params.npz`` / ``model.so`` sizes.

``fp16`` is the fp32 build with every weight rounded to fp16 (the CPU build computes in fp32; fp16
arithmetic on x86 would only be emulated), which is also what the 4-bit kernels compute with:
fp16 dequantized weights, fp32 activations.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .quantize import QuantConfig

PARIS_PROMPT = "What is the capital of France?"


def perplexity(engine, ids: list[int], chunk: int = 256) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]``, each token given all before it."""
    session = engine.new_session()
    nll, count, prev = 0.0, 0, None
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        logits = engine.forward(session, piece).astype(np.float64)
        rows = logits[:-1] if prev is None else np.concatenate([prev[None], logits[:-1]])
        targets = np.asarray(piece[1:] if prev is None else piece)
        top = rows.max(axis=1, keepdims=True)
        logz = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        prev = logits[-1]
    return math.exp(nll / count)


def heldout_ids(tokenizer, n_tokens: int) -> list[int]:
    from .calibration import heldout_text

    ids = tokenizer.encode(heldout_text())
    if len(ids) < n_tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


def answers_paris(engine, max_new_tokens: int = 24) -> tuple[bool, str]:
    from tvm_lite.engine import GenerationConfig

    text = engine.generate(PARIS_PROMPT, GenerationConfig(max_new_tokens=max_new_tokens)).text
    return "paris" in text.lower(), text


def round_weights_to_fp16(engine) -> None:
    """Round every float32 weight of a loaded engine to fp16 (kept as float32 values)."""
    rounded = []
    for p in engine.params:
        a = p.numpy()
        if a.dtype == np.float32:
            a = a.astype(np.float16).astype(np.float32)
        rounded.append(a)
    engine.set_weights(rounded)


def default_configs(group_sizes=(32, 128), extra: bool = False) -> list[tuple[str, object]]:
    """(name, QuantConfig | "fp32" | "fp16") rows of the quality table."""
    rows: list = [("fp32", "fp32"), ("fp16", "fp16")]
    for g in group_sizes:
        rows.append((f"int4-RTN g{g}", QuantConfig("int4", "rtn", g)))
        if extra:
            rows.append((f"int4-RTN (absmax, MLC) g{g}", QuantConfig("int4", "rtn", g, clip_search=False)))
        rows.append((f"E0M4-RTN g{g}", QuantConfig("e0m4", "rtn", g)))
        rows.append((f"E0M4-GPTQ g{g}", QuantConfig("e0m4", "gptq", g)))
        rows.append((f"E0M4-AWQ g{g}", QuantConfig("e0m4", "awq", g)))
        if extra:
            rows.append((f"E0M4-GPTQ act-order g{g}", QuantConfig("e0m4", "gptq", g, act_order=True)))
            rows.append((f"E0M4-GPTQ +lm_head+embedding g{g}",
                         QuantConfig("e0m4", "gptq", g, include_lm_head=True, include_embedding=True)))
    return rows


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def evaluate(folder, configs, eval_tokens: int = 1024, chunk: int = 256, progress=print,
             keep_dir=None, on_row=None) -> list[dict]:
    """One row per configuration: perplexity, Paris, sizes. ``folder``: an export folder.
    ``on_row(row)`` is called as each row is done (long runs keep what they measured)."""
    from tvm_lite.artifact import LIBRARY, PARAMS, compile_model, load_manifest
    from tvm_lite.engine import Engine

    from .quantize import shared_calibration

    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="tvm_lite_quality_")) if keep_dir is None else Path(keep_dir)
    ids = None
    fp32_dir = None
    with shared_calibration():  # GPTQ and AWQ rows share one calibration run
        try:
            for i, (name, cfg) in enumerate(configs):
                t0 = time.perf_counter()
                progress(f"[{name}] compiling")
                if cfg in ("fp32", "fp16"):
                    if fp32_dir is None:
                        fp32_dir = compile_model(folder, "llvm", out_dir=tmp / "fp32", progress=progress)
                    art = fp32_dir
                else:
                    # a fresh path per row: the process has dlopen()ed earlier rows' model.so
                    art = _compile_quantized(folder, cfg, tmp / f"{i:02d}-{cfg.label}", progress)
                engine = Engine(art)
                if cfg == "fp16":
                    round_weights_to_fp16(engine)
                if ids is None:
                    ids = heldout_ids(engine.tokenizer, eval_tokens)
                progress(f"[{name}] perplexity on {len(ids)} held-out tokens")
                ppl = perplexity(engine, ids, chunk)
                paris, answer = answers_paris(engine)
                manifest = load_manifest(art)
                q = manifest.get("quant") or {}
                row = {"config": name, "ppl": ppl, "paris": "yes" if paris else "NO", "answer": answer,
                       "bytes/weight": q.get("bytes_per_weight", 2.0 if cfg == "fp16" else 4.0),
                       "params MB": _size(art / PARAMS) / 1e6, "model.so MB": _size(art / LIBRARY) / 1e6,
                       "seconds": time.perf_counter() - t0}
                if cfg == "fp16":
                    row["params MB"] = None  # same artifact as fp32, rounded in memory
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                progress(f"[{name}] ppl {ppl:.3f}, Paris: {row['paris']} ({answer[:60]!r})")
                del engine
                if art != fp32_dir and keep_dir is None:
                    shutil.rmtree(art, ignore_errors=True)
        finally:
            if keep_dir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    _add_loss_ratios(rows)
    return rows


def _compile_quantized(folder, cfg: QuantConfig, out: Path, progress):
    from tvm_lite.artifact import compile_model

    return compile_model(folder, "llvm", out_dir=out, force=True, progress=progress, quant=cfg)


def _add_loss_ratios(rows: list[dict]) -> None:
    """Perplexity lost against fp16, and as a fraction of int4-RTN's loss at the same group size."""
    fp16 = next((r["ppl"] for r in rows if r["config"] == "fp16"), None)
    if fp16 is None:
        return
    for r in rows:
        r["Δppl vs fp16"] = r["ppl"] - fp16
    for r in rows:
        g = r["config"].rsplit(" g", 1)[-1] if " g" in r["config"] else None
        base = next((b for b in rows if b["config"] == f"int4-RTN g{g}"), None) if g else None
        if base is not None and base["Δppl vs fp16"] > 0:
            r["loss / int4-RTN loss"] = r["Δppl vs fp16"] / base["Δppl vs fp16"]


COLUMNS = ["config", "ppl", "Δppl vs fp16", "loss / int4-RTN loss", "paris", "bytes/weight",
           "params MB", "model.so MB"]


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="export folder (default: the embedded SmolLM2)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--group-sizes", default="32,128")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--extra", action="store_true",
                   help="also int4 absmax RTN (MLC's recipe) and GPTQ with act-order")
    p.add_argument("--only", default=None, help="comma list of config names to run (substrings)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", default=None, help="append each row to this JSON-lines file as it is done")


def run(args, log=print) -> None:
    import json

    from tvm_lite.bench import format_table
    from tvm_lite.export import export_onnx

    folder = Path(args.model) if args.model and Path(args.model).is_dir() else \
        export_onnx(args.model, exporter=args.exporter, progress=log)
    groups = tuple(int(g) for g in args.group_sizes.split(","))
    configs = default_configs(groups, args.extra)
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        configs = [c for c in configs if any(w in c[0].lower() for w in wanted)]
    def save(row):
        if args.save:
            with open(args.save, "a") as f:
                f.write(json.dumps(row) + "\n")

    rows = evaluate(folder, configs, args.eval_tokens, progress=log, on_row=save)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, COLUMNS))
