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

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .quantize import QuantConfig

PARIS_PROMPT = "What is the capital of France?"
EVAL_SEQUENCE = 512  # tokens per evaluation sequence (each from position 0)
EVAL_DOMAINS = ("prose", "news", "c", "qa")  # corpora.EVAL_DOMAINS; "docs-heldout" on request
RTN_BIAS_WEIGHTS = (0.25, 1.0)  # the format table's bias-aware RTN rows (rtn.rtn's bias_weight)


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
    """The first ``n_tokens`` of ``pydoc_data.topics``' held-out part (the ``docs`` calibration
    domain's own source, never calibrated on: an in-domain check)."""
    from .calibration import heldout_text

    ids = tokenizer.encode(heldout_text())
    if len(ids) < n_tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


def domain_sequences(tokenizer, domains, n_tokens: int, length: int = EVAL_SEQUENCE) -> dict:
    """``{domain: [token sequences]}``: ``n_tokens`` per evaluation domain, in sequences of
    ``length`` taken at evenly spaced places of its text (``docs-heldout``: held-out pydoc)."""
    from . import corpora
    from .calibration import _spread, heldout_text

    render = corpora.chat_renderer(tokenizer)
    out = {}
    for d in domains:
        text = heldout_text() if d == "docs-heldout" else corpora.domain_text(d, render)
        out[d] = _spread(tokenizer.encode(text), n_tokens, (length,))
    return out


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


def row_sets(group_sizes=(32, 128)) -> dict[str, list[tuple[str, object]]]:
    """The tables ``tvm-lite quality --rows`` prints: (name, QuantConfig | "fp32" | "fp16")."""
    base = [("fp16", "fp16")]  # fp32 = fp16 to 0.01 perplexity (``--rows fp32`` for the row)
    main, ablation, fmt = list(base), list(base), list(base)
    # the rows the targets need first (int4-RTN and the best E0M4 method at every group size)
    for g in group_sizes:
        main += [(f"int4-RTN g{g}", QuantConfig("int4", "rtn", g)),
                 (f"E0M4-AWQ+GPTQ g{g}", QuantConfig("e0m4", "awq+gptq", g, clip_weighted=True))]
    for g in group_sizes:
        main += [(f"E0M4-RTN g{g}", QuantConfig("e0m4", "rtn", g)),
                 (f"E0M4-GPTQ g{g}", QuantConfig("e0m4", "gptq", g)),
                 (f"E0M4-AWQ g{g}", QuantConfig("e0m4", "awq", g))]
    for g in group_sizes:
        if g == group_sizes[0]:  # what each ingredient adds, at the first group size
            best = dict(clip_weighted=True)
            ablation += [
                (f"int4-RTN g{g}", QuantConfig("int4", "rtn", g)),
                (f"E0M4-GPTQ g{g}", QuantConfig("e0m4", "gptq", g)),
                (f"E0M4-AWQ g{g}", QuantConfig("e0m4", "awq", g)),
                (f"E0M4-AWQ+GPTQ plain-clip g{g}", QuantConfig("e0m4", "awq+gptq", g)),
                (f"E0M4-AWQ+GPTQ pydoc-only g{g}",
                 QuantConfig("e0m4", "awq+gptq", g, calib_domains=("docs",), **best)),
                (f"E0M4-AWQ+GPTQ docs,code,chat 3072 g{g}",  # the calibration before 'legal'/'self'
                 QuantConfig("e0m4", "awq+gptq", g, calib_domains=("docs", "code", "chat"),
                             calib_tokens=3072, **best)),
                (f"E0M4-AWQ+GPTQ docs,code,chat,legal 4096 g{g}",
                 QuantConfig("e0m4", "awq+gptq", g, calib_domains=("docs", "code", "chat", "legal"),
                             calib_tokens=4096, **best)),
                (f"E0M4-AWQ+GPTQ docs,code,chat,self 8192 g{g}",
                 QuantConfig("e0m4", "awq+gptq", g, calib_domains=("docs", "code", "chat", "self"),
                             calib_tokens=8192, **best)),
                (f"E0M4-AWQ+GPTQ self-only g{g}",  # data-free: the model's own samples alone
                 QuantConfig("e0m4", "awq+gptq", g, calib_domains=("self",), **best)),
                (f"E0M4-AWQ+GPTQ g{g}", QuantConfig("e0m4", "awq+gptq", g, **best)),
                (f"E0M4-AWQ+GPTQ damp 0.01 g{g}", QuantConfig("e0m4", "awq+gptq", g, gptq_damp=0.01, **best)),
                (f"E0M4-AWQ+GPTQ act-order g{g}", QuantConfig("e0m4", "awq+gptq", g, act_order=True, **best)),
                (f"E0M4-AWQ+GPTQ scale-refit 0.1 g{g}",
                 QuantConfig("e0m4", "awq+gptq", g, scale_refit=0.1, **best))]
        # the two formats at equal method
        for f in ("int4", "E0M4"):
            fmt += [(f"{f}-RTN min/max g{g}", QuantConfig(f.lower(), "rtn", g, clip_search=False)),
                    (f"{f}-RTN g{g}", QuantConfig(f.lower(), "rtn", g)),
                    *[(f"{f}-RTN bias-aware {b:g} g{g}", QuantConfig(f.lower(), "rtn", g, rtn_bias_weight=b))
                      for b in RTN_BIAS_WEIGHTS],
                    (f"{f}-GPTQ g{g}", QuantConfig(f.lower(), "gptq", g)),
                    (f"{f}-AWQ g{g}", QuantConfig(f.lower(), "awq", g))]
    return {"main": main, "ablation": ablation, "format": fmt, "fp32": [("fp32", "fp32")]}


def default_configs(group_sizes=(32, 128), extra: bool = False) -> list[tuple[str, object]]:
    """The main table's rows (``extra``: with the ablation's)."""
    sets = row_sets(group_sizes)
    rows = sets["main"]
    if extra:
        rows += [r for r in sets["ablation"] if r[0] not in {n for n, _ in rows}]
    return rows


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _quant_bytes(weights: dict) -> float:
    distinct = {id(qw): qw for qw in weights.values()}.values()
    return sum(qw.nbytes for qw in distinct) / max(sum(qw.k * qw.n for qw in distinct), 1)


def _row(name, ppl: dict, paris: tuple, **extra) -> dict:
    row = {"config": name, **{f"ppl {d}": v for d, v in ppl.items()},
           "ppl mean": float(np.mean(list(ppl.values()))), "paris": "yes" if paris[0] else "NO",
           "answer": paris[1], **extra}
    return row


def evaluate(folder, configs, eval_tokens: int = 1024, domains=EVAL_DOMAINS, backend: str = "torch",
             progress=print, on_row=None, keep_dir=None) -> list[dict]:
    """One row per configuration: perplexity per domain and their mean, Paris, bytes per weight,
    seconds to quantize. ``folder``: an export folder. ``backend``: "torch" runs the export's
    PyTorch source with the quantization's effective weights (:mod:`.reference`), "tvm"
    compiles every row with tvm_lite (LLVM) and runs it on the engine. ``on_row(row)`` is called
    as each row is done (long runs keep what they measured)."""
    if backend not in ("torch", "tvm"):
        raise ValueError(f"backend {backend!r}: choose 'torch' or 'tvm'")
    run = _evaluate_torch if backend == "torch" else _evaluate_tvm
    rows = run(Path(folder), configs, eval_tokens, tuple(domains), progress, on_row, keep_dir)
    _add_loss_ratios(rows, domains)
    return rows


def _evaluate_torch(folder: Path, configs, eval_tokens, domains, progress, on_row, keep_dir):
    """The torch backend: no TVM; the projections by their module names, calibration through
    PyTorch hooks, on the GPU when there is one."""
    import torch

    from . import calibration
    from .quantize import _weights_digest, quantize_matrices, tokenizer_of
    from .reference import Reference

    ref = Reference(folder, device="cuda" if torch.cuda.is_available() else "cpu")
    arrays = ref.arrays()
    digest = _weights_digest(list(arrays), list(arrays.values()))
    tok = tokenizer_of(folder)
    seqs = domain_sequences(tok, domains, eval_tokens)
    groups = ref.input_groups(seqs[domains[0]][0][:64])
    progress(f"{len(arrays)} projections read {len(groups)} distinct inputs")
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PARIS_PROMPT}]))
    eos = (json.loads((folder / "tvm_lite_model.json").read_text()).get("stop_token_ids") or [None])[0]
    calibrated: dict = {}  # (tokens, domains) -> (stats, seconds)
    rows = []
    for name, cfg in configs:
        t0 = time.perf_counter()
        ref.use(None)
        extra = {"bytes/weight": 4.0}
        if cfg == "fp16":
            ref.round_to_fp16()
            extra["bytes/weight"] = 2.0
        elif cfg != "fp32":
            if cfg.include_lm_head or cfg.include_embedding:
                raise ValueError("the torch backend quantizes the projections only "
                                 "(the lm_head is tied to the embedding); use --backend tvm")
            stats, cal_s = {}, 0.0
            if cfg.needs_calibration:
                key = (cfg.calib_tokens, cfg.calib_domains)
                if key not in calibrated:
                    t_cal = time.perf_counter()
                    share = cfg.calib_tokens // len(cfg.calib_domains)
                    samples = calibration.self_samples(ref, tok, share, digest, progress) \
                        if "self" in cfg.calib_domains else None
                    chunks = calibration.mixed_chunks(tok, cfg.calib_tokens, cfg.calib_domains, samples)
                    calibrated[key] = (ref.collect(groups, chunks, progress), time.perf_counter() - t_cal)
                stats, cal_s = calibrated[key]
            t_q = time.perf_counter()
            weights = quantize_matrices(arrays, cfg, stats, progress)
            extra = {"bytes/weight": _quant_bytes(weights), "quantize s": time.perf_counter() - t_q,
                     "calibration s": cal_s}
            ref.use(weights)
        ppl = {}
        for d, chunks in seqs.items():
            ppl[d] = float(np.exp(np.mean([np.log(ref.perplexity(c)) for c in chunks])))
        answer = tok.decode(ref.greedy(prompt, 24, eos))
        row = _row(name, ppl, ("paris" in answer.lower(), answer), **extra,
                   seconds=time.perf_counter() - t0)
        rows.append(row)
        progress(f"[{name}] " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()) +
                 f", Paris: {row['paris']}")
        if on_row is not None:
            on_row(row)
    ref.use(None)
    return rows


def _evaluate_tvm(folder: Path, configs, eval_tokens, domains, progress, on_row, keep_dir):
    from tvm_lite.artifact import LIBRARY, PARAMS, compile_model, load_manifest
    from tvm_lite.engine import Engine

    from .quantize import shared_calibration

    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="tvm_lite_quality_")) if keep_dir is None else Path(keep_dir)
    seqs, fp32_dir = None, None
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
                if seqs is None:
                    seqs = domain_sequences(engine.tokenizer, domains, eval_tokens)
                ppl = {d: float(np.exp(np.mean([np.log(perplexity(engine, c)) for c in chunks])))
                       for d, chunks in seqs.items()}
                q = load_manifest(art).get("quant") or {}
                row = _row(name, ppl, answers_paris(engine),
                           **{"bytes/weight": q.get("bytes_per_weight", 2.0 if cfg == "fp16" else 4.0),
                              "quantize s": q.get("quantize_seconds"),
                              "params MB": _size(art / PARAMS) / 1e6,
                              "model.so MB": _size(art / LIBRARY) / 1e6,
                              "seconds": time.perf_counter() - t0})
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                progress(f"[{name}] " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()) +
                         f", Paris: {row['paris']}")
                del engine
                if art != fp32_dir and keep_dir is None:
                    shutil.rmtree(art, ignore_errors=True)
        finally:
            if keep_dir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _compile_quantized(folder, cfg: QuantConfig, out: Path, progress):
    from tvm_lite.artifact import compile_model

    return compile_model(folder, "llvm", out_dir=out, force=True, progress=progress, quant=cfg)


def _add_loss_ratios(rows: list[dict], domains) -> None:
    """Per domain: perplexity lost against fp16, as a fraction of int4-RTN's loss at the same
    group size (``loss÷int4 <domain>``), and the worst domain's fraction (``worst``)."""
    fp16 = next((r for r in rows if r["config"] == "fp16"), None)
    if fp16 is None:
        return
    for r in rows:
        g = r["config"].rsplit(" g", 1)[-1] if " g" in r["config"] else None
        base = next((b for b in rows if b["config"] == f"int4-RTN g{g}"), None) if g else None
        if base is None or base is r:
            continue
        ratios = []
        for d in domains:
            lost = base[f"ppl {d}"] - fp16[f"ppl {d}"]
            if lost > 0:
                r[f"loss÷int4 {d}"] = (r[f"ppl {d}"] - fp16[f"ppl {d}"]) / lost
                ratios.append(r[f"loss÷int4 {d}"])
        if ratios:
            r["worst"] = max(ratios)


def weight_error_rows(arrays: dict, group_sizes=(32, 128), bias_weights=(0.0, 0.25, 1.0)) -> list[dict]:
    """Anatomy of RTN's weight error per format: relative MSE, and the share of it that is each
    group's *mean* error (``G * mean(e)^2`` summed over groups / ``sum e^2``), which inputs with a
    common component turn into output error G times over (:func:`.rtn.rtn`). Also how often a
    G-row group of a column holds at most 16 distinct values (a 4-bit source grid)."""
    from .rtn import _grouped, rtn

    rows = []
    for g in group_sizes:
        few = np.mean([np.mean([len(np.unique(col)) <= 16 for col in _grouped(w, g)[0].T])
                       for w in arrays.values()])
        for fmt in ("int4", "e0m4"):
            for bw in bias_weights:
                mse = bias = total = 0.0
                for w in arrays.values():
                    e = rtn(w, fmt, g, bias_weight=bw).dequantize().astype(np.float32) - w
                    mse += float((e * e).sum())
                    bias += float((_grouped(e, g).mean(axis=1) ** 2).sum() * g)
                    total += float((w * w).sum())
                rows.append({"group": g, "format": fmt, "bias weight": f"{bw:g}",
                             "relative MSE": f"{mse / total:.4f}", "mean-error share": f"{bias / mse:.3f}",
                             "groups with <=16 values": f"{few:.3f}"})
    return rows


def report_rows(paths, names: list[str], domains) -> list[dict]:
    """Rows saved by ``--save`` runs (first of each name wins), in the order of ``names``, with
    the loss ratios computed over the merged set."""
    saved: dict = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                saved.setdefault(row["config"], row)
    rows = [saved[n] for n in names if n in saved]
    _add_loss_ratios(rows, domains)
    return rows


def columns(domains, ratios: bool = True) -> list[str]:
    cols = ["config", *(f"ppl {d}" for d in domains), "ppl mean"]
    if ratios:
        cols += [*(f"loss÷int4 {d}" for d in domains), "worst"]
    return cols + ["paris", "bytes/weight", "calibration s", "quantize s"]


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="export folder (default: the embedded SmolLM2)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--group-sizes", default="32,128")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens per evaluation domain")
    p.add_argument("--domains", default=",".join(EVAL_DOMAINS),
                   help="evaluation domains (tvm_lite.quant.corpora; none is calibrated on); "
                        "docs-heldout = the held-out part of calibration's pydoc text")
    p.add_argument("--rows", default="main",
                   help="comma list of tables -- main: the methods; ablation: what each ingredient "
                        "adds (at the first group size); format: int4 vs E0M4 at equal method")
    p.add_argument("--backend", default="torch", choices=["torch", "tvm"],
                   help="torch: the export's PyTorch source with the effective 4-bit weights "
                        "(fast); tvm: compile every row with tvm_lite and run the engine")
    p.add_argument("--extra", action="store_true", help="main rows plus the ablation's")
    p.add_argument("--calib-tokens", type=int, default=None, help="override the rows' calibration tokens")
    p.add_argument("--calib-domains", default=None, help="override the rows' calibration domains")
    p.add_argument("--only", default=None, help="comma list of config names to run (substrings; "
                   "name fp16 too for the ratios, or merge with --report)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", default=None, help="append each row to this JSON-lines file as it is done")
    p.add_argument("--weight-errors", type=int, default=0, metavar="N",
                   help="only the RTN weight-error anatomy over the first N projection matrices")
    p.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                   help="print the --rows tables from rows --save wrote (several runs merged)")


def run(args, log=print) -> None:
    from tvm_lite.bench import format_table
    from tvm_lite.export import export_onnx

    folder = None if args.report else Path(args.model) if args.model and Path(args.model).is_dir() \
        else export_onnx(args.model, exporter=args.exporter, progress=log)
    groups = tuple(int(g) for g in args.group_sizes.split(","))
    sets = row_sets(groups)
    wanted_sets = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in wanted_sets if r not in sets]
    if unknown:
        raise SystemExit(f"--rows {','.join(unknown)}: choose from {', '.join(sets)}")
    configs, seen = [], set()
    for r in wanted_sets + (["ablation"] if args.extra else []):
        for name, cfg in sets[r]:
            if name not in seen:  # rows shared by two tables run once
                seen.add(name)
                configs.append((name, cfg))
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        configs = [c for c in configs if any(w in c[0].lower() for w in wanted)]
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    if args.calib_tokens or args.calib_domains:  # override every row's calibration
        from dataclasses import replace

        change = {k: v for k, v in (("calib_tokens", args.calib_tokens), ("calib_domains", tuple(
            args.calib_domains.split(",")) if args.calib_domains else None)) if v}
        configs = [(n, replace(c, **change) if isinstance(c, QuantConfig) else c) for n, c in configs]

    def save(row):
        if args.save:
            with open(args.save, "a") as f:
                f.write(json.dumps(row) + "\n")

    if args.weight_errors:
        from .reference import Reference

        arrays = dict(list(Reference(folder).arrays().items())[:args.weight_errors])
        rows = weight_error_rows(arrays, groups)
        print(format_table(rows, list(rows[0])))
        return
    if args.report:  # the tables from rows saved by earlier runs (--save), nothing run
        rows = report_rows(args.report, [n for n, _ in configs], domains)
    else:
        rows = evaluate(folder, configs, args.eval_tokens, domains, args.backend, progress=log,
                        on_row=save)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, columns(domains)))


if __name__ == "__main__":  # python -m tvm_lite.quant.evaluate: the same as tvm-lite quality
    import argparse

    parser = argparse.ArgumentParser(description="4-bit weights: perplexity per domain, Paris, sizes")
    add_arguments(parser)
    run(parser.parse_args())
