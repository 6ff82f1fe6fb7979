"""Whole-model speed on a GPU: tvm_lite (E0M4, int4) vs stock TVM vs PyTorch eager, same run.

    python -m tvm_lite.bench.models --shapes smollm2-135m,gemma-2b --target "cuda -arch=sm_90"

Real weights cannot travel to the GPU machine, and speed does not depend on their values: each
model *shape* is built from its transformers config with seeded random weights (fp16), exported to
ONNX with the project's own exporter, and compiled four ways:

    tvm_lite E0M4     tvm_lite's pipeline, 4-bit E0M4 weights (RTN), in-place KV, arena memory
    tvm_lite int4     the same with MLC-style int4 weights (the ablation)
    stock TVM fp16    TVM 0.27's default pipeline for the target (FuseOps + DLight's GPU rules),
                      the exported past/present KV interface: what TVM does with the same ONNX
    PyTorch fp16      the transformers model itself, eager, on the same GPU
    torch.compile     the same with transformers' static KV cache (``cache_implementation=
                      "static"``) and ``torch.compile(mode="reduce-overhead")``: CUDA graphs

Each is measured with the engine's own loop (tvm_lite.bench.bench_engine): a real-text prompt
of ``prompt_len`` tokens prefilled in one call, then ``decode_tokens`` greedy steps; median over
``repeats`` after a warm-up. Each row also gets the physical limit of its decode: the bytes a
step reads (every weight once -- all parameters, the tied embedding/lm_head once -- plus the K
and V of the mean decode context) over the copy bandwidth measured in the same run
(``limit_tok_s``, ``bytes_per_step``; ``of_limit`` = decode tok/s / limit), and its decode
speed over the torch.compile row's (``decode_x_compile``). ``check_logits`` compares the CUDA build with the CPU build of the same
ONNX file (the issue's numerics check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

# transformers configs of the model shapes benchmarked (the weights are random)
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu"),
    "gemma-2b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384,
                     num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                     head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                     rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                     tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         hidden_act="silu"),
    # for tests: the smallest shape that still has grouped-query attention
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True),
}
VARIANTS = ("tvm_lite-e0m4", "tvm_lite-int4", "stock-fp16", "torch-fp16", "torch-compile")


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on CPython's documentation (shipped with Python), so a
    random-weight model has real-text prompts without downloading anything."""
    import pydoc_data.topics as topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  show_progress=False)
    tok.train_from_iterator([topics.topics[k] for k in sorted(topics.topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def random_model(shape: str, out_dir, seed: int = 0, dtype: str = "float16") -> Path:
    """A Hugging Face folder with ``shape``'s architecture, seeded random weights and a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}: choose one of {', '.join(SHAPES)}")
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    cfg_args = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(cfg_args.pop("model_type"), **cfg_args)
    tok = _train_tokenizer(min(cfg.vocab_size, 4096))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype),
                                                 attn_implementation="eager")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- the engines ----------------------------------------------------------------------------------
def _quant(fmt: str):
    from ..quant import QuantConfig

    # RTN without the clipping search: speed does not depend on the weights' values. The lm_head
    # is 4-bit too: at Gemma's 256k vocabulary it is a third of the bytes a decode step reads.
    return QuantConfig(format=fmt, method="rtn", clip_search=False, include_lm_head=True)


# a tvm_lite variant with one of these suffixes: BuildOptions(dependent_launch=...); without
# one, the default ("auto": the CUDA-graph kernels on CUDA sm_90+, none elsewhere)
PDL_SUFFIXES = {"+pdl": True, "+pdlg": "graphs", "+nopdl": False}


def compile_variant(onnx_dir, variant: str, target: str, progress=print,
                    out_dir=None) -> Path:
    """The artifact of ``variant`` (:data:`VARIANTS`; a tvm_lite one may end in one of
    :data:`PDL_SUFFIXES`: all its kernels, those replayed as CUDA graphs, or none launched with
    programmatic dependent launch). ``out_dir``: built there, every time, instead of taken from
    the compile cache."""
    from ..artifact import compile_model

    place = {"out_dir": out_dir, "force": out_dir is not None}
    if variant == "stock-fp16":
        return compile_model(onnx_dir, target, progress=progress, pipeline="stock", **place)
    suffix = next((s for s in PDL_SUFFIXES if variant.endswith(s)), "")
    pdl = PDL_SUFFIXES.get(suffix)  # (None: the default)
    variant = variant.removesuffix(suffix)
    if variant == "tvm_lite-fp16":
        return compile_model(onnx_dir, target, progress=progress, dependent_launch=pdl, **place)
    fmt = variant.split("-", 1)[1]
    return compile_model(onnx_dir, target, progress=progress, quant=_quant(fmt),
                         dependent_launch=pdl, **place)


def bench_torch(hf_dir, prompt_ids, decode_tokens: int, repeats: int, device: str = "cuda") -> dict:
    """PyTorch eager (fp16) with transformers' own cache: prefill tok/s and decode tok/s."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float16).to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def once():
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        past = out.past_key_values
        tokens = [int(token)]
        for _ in range(decode_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))  # reads the token back every step, like the engines do
        sync()
        return t1 - t0, time.perf_counter() - t1, tokens

    with torch.no_grad():
        once()  # warm-up
        runs = [once() for _ in range(repeats)]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    pre = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    return {"prefill_tok_s": len(prompt_ids) / pre, "decode_tok_s": decode_tokens / dec,
            "tokens": runs[0][2]}


def bench_torch_compiled(hf_dir, prompt_ids, decode_tokens: int, repeats: int,
                         device: str = "cuda") -> dict:
    """PyTorch fp16 with transformers' ``StaticCache`` and the decode step under
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): the strongest PyTorch peer on a GPU.

    The loop is written out (prefill eager, then one compiled call per token with
    ``torch.compiler.cudagraph_mark_step_begin()`` and the next token cloned out of the graph's
    output) rather than through ``generate``, whose compiled path with a static cache fails in
    transformers 5.x ("accessing tensor output of CUDAGraphs that has been overwritten"). Prefill
    tok/s from the eager prefill; decode tok/s from the compiled steps (after warm-up runs that
    compile and record the graphs)."""
    import torch
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float16).to(device).eval()
    n = len(prompt_ids)
    cache = StaticCache(config=model.config, max_cache_len=n + decode_tokens + 8)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor([prompt_ids], device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run():
        cache.reset()
        sync()
        t0 = time.perf_counter()
        pos = torch.arange(n, device=device)
        logits = model(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        sync()
        t1 = time.perf_counter()
        tokens = [int(token)]
        for i in range(decode_tokens):
            torch.compiler.cudagraph_mark_step_begin()
            pos = torch.tensor([n + i], device=device)
            out = step(token, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                       use_cache=True)
            token = out.logits[:, -1:].argmax(-1).clone()
            tokens.append(token)
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, [tokens[0]] + [int(t) for t in tokens[1:]]

    with torch.no_grad():
        for _ in range(3):  # compile, then record the CUDA graphs
            run()
        runs = [run() for _ in range(repeats)]
    del model, cache, step
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    pre = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    return {"prefill_tok_s": n / pre, "decode_tok_s": decode_tokens / dec, "tokens": runs[0][2]}


def torch_bytes_per_step(hf_dir, context: int) -> tuple[int, int]:
    """(weight bytes, K+V bytes at ``context``) an fp16 PyTorch decode step reads."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(hf_dir))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * 2
    inter, hid = cfg.intermediate_size, cfg.hidden_size
    q_o = 2 * hid * cfg.num_attention_heads * head_dim
    k_v = 2 * hid * cfg.num_key_value_heads * head_dim
    per_layer = q_o + k_v + 3 * hid * inter + 2 * hid  # + the two norms
    tables = cfg.vocab_size * hid * (1 if cfg.tie_word_embeddings else 2)
    return 2 * (cfg.num_hidden_layers * per_layer + tables + hid), kv


def _graph_tokens_match(engine, prompt_len: int, count: int) -> bool:
    """Whether greedy generation gives the same ``count`` tokens with CUDA graphs
    (``decode_padded``) as without (``decode_chain``), from the benchmark's prompt."""
    from .generation import prompt_ids

    ids, runs = prompt_ids(engine, prompt_len), []
    for graphs in (True, False):
        engine.cuda_graphs = graphs
        loop = engine.tokens(engine.new_session(), ids)
        runs.append([step.token for _, step in zip(range(count), loop)])
        loop.close()
    engine.cuda_graphs = True
    return runs[0] == runs[1]


def bench_variant(artifact, prompt_len: int, decode_tokens: int, repeats: int,
                  device: str = "cuda") -> dict:
    from ..engine import Engine
    from .generation import bench_engine

    engine = Engine(artifact, device=device, max_context=prompt_len + decode_tokens + 1,
                    buckets=None, prefill_chunk=prompt_len)
    (row,) = bench_engine(engine, [prompt_len], decode_tokens=decode_tokens, repeats=repeats)
    extra = {"run_ahead": engine.run_ahead, "cuda_graphs": engine.cuda_graphs}
    if engine.cuda_graphs:  # the same engine without graphs: steps queued by decode_chain
        extra["graph_tokens_match"] = _graph_tokens_match(engine, prompt_len, decode_tokens)
        engine.cuda_graphs = False
        (chained,) = bench_engine(engine, [prompt_len], decode_tokens=decode_tokens,
                                  repeats=repeats, warmup=False)
        extra["decode_tok_s_no_graphs"] = chained["decode_tok_s"]
    if engine.run_ahead > 1:  # ... and reading each token before the next step
        engine.run_ahead = 1
        (serial,) = bench_engine(engine, [prompt_len], decode_tokens=decode_tokens,
                                 repeats=repeats, warmup=False)
        extra["decode_tok_s_one_by_one"] = serial["decode_tok_s"]
    weights = sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in engine.params)
    kv = engine.kv_cache_bytes(prompt_len + decode_tokens // 2)  # the mean decode context
    del engine
    return {"prefill_tok_s": row["prefill_tok_s"], "decode_tok_s": row["decode_tok_s"],
            "tokens": row["tokens"], "weight_MB": weights / 1e6, "weight_bytes": weights,
            "kv_bytes": kv, **extra}


def bench_models(shapes, variants=VARIANTS, target: str | None = None, device: str = "cuda",
                 prompt_len: int = 512, decode_tokens: int = 32, repeats: int = 3,
                 work_dir="bench_models", exporter: str = "dynamo", progress=print,
                 save=None) -> list[dict]:
    """One row per (shape, variant): prefill and decode tok/s, and the ratio to stock TVM.
    ``save``: a JSON file rewritten after every row (a long run that stops keeps its rows).
    ``target``: default this GPU's (:func:`tvm_lite.target.local_cuda_target`)."""
    from tqdm import tqdm

    from .generation import prompt_ids
    from ..export import export_onnx
    from ..target import local_cuda_target

    target = target or local_cuda_target()

    work = Path(work_dir)
    rows = []
    todo = [(s, v) for s in shapes for v in variants]
    bar = tqdm(todo, desc="models", unit="variant")
    for shape, variant in bar:
        bar.set_postfix_str(f"{shape} {variant}")
        hf = random_model(shape, work / shape / "hf")
        t0 = time.perf_counter()
        try:
            # exported once per shape (export_onnx returns an existing export folder as it is)
            onnx_dir = export_onnx(hf, work / shape / "onnx", exporter=exporter, dtype="float16",
                                   progress=progress)
            if variant.startswith("torch"):
                from types import SimpleNamespace

                from ..tokenizer import Tokenizer

                probe = SimpleNamespace(tokenizer=Tokenizer(onnx_dir))  # the engines' prompt
                bench = bench_torch_compiled if variant == "torch-compile" else bench_torch
                speed = bench(hf, prompt_ids(probe, prompt_len), decode_tokens, repeats, device)
                w, kv = torch_bytes_per_step(hf, prompt_len + decode_tokens // 2)
                speed.update(weight_MB=w / 1e6, weight_bytes=w, kv_bytes=kv)
            else:
                artifact = compile_variant(onnx_dir, variant, target, progress)
                speed = bench_variant(artifact, prompt_len, decode_tokens, repeats, device)
            rows.append({"model": shape, "engine": variant, **speed,
                         "seconds": time.perf_counter() - t0})
        except Exception as err:  # a failed variant is a row that says why, not a lost run
            rows.append({"model": shape, "engine": variant, "error": f"{type(err).__name__}: {err}"[:500]})
            progress(f"{shape} {variant}: {rows[-1]['error']}")
        if save:
            Path(save).write_text(json.dumps(rows, indent=1))
    copy_gbps = _copy_gbps(device)
    for row in rows:
        if "error" in row:
            continue
        base = next((r for r in rows if r["model"] == row["model"] and r["engine"] == "stock-fp16"
                     and "error" not in r), None)
        if base:
            row["prefill_x_stock"] = row["prefill_tok_s"] / base["prefill_tok_s"]
            row["decode_x_stock"] = row["decode_tok_s"] / base["decode_tok_s"]
        compiled = next((r for r in rows if r["model"] == row["model"]
                         and r["engine"] == "torch-compile" and "error" not in r), None)
        if compiled:
            row["decode_x_compile"] = row["decode_tok_s"] / compiled["decode_tok_s"]
        if copy_gbps and "weight_bytes" in row:
            row["bytes_per_step"] = row["weight_bytes"] + row["kv_bytes"]
            row["copy_gbps"] = copy_gbps
            row["limit_tok_s"] = copy_gbps * 1e9 / row["bytes_per_step"]
            row["of_limit"] = row["decode_tok_s"] / row["limit_tok_s"]
    return rows


def _copy_gbps(device: str) -> float | None:
    """The device's copy bandwidth (GB/s, read + write), measured now; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    from .attention import copy_bandwidth_torch

    return copy_bandwidth_torch()


def check_logits(shape: str = "smollm2-135m", target: str | None = None, device="cuda",
                 work_dir="bench_models", n_tokens: int = 24, progress=print) -> dict:
    """The same fp16 ONNX compiled for ``target`` and for the CPU (llvm): the logits of a
    prefill and of the next decode steps, compared (``target``: default this GPU's)."""
    from ..artifact import compile_model
    from .generation import prompt_ids
    from ..engine import Engine
    from ..export import export_onnx
    from ..target import local_cuda_target

    target = target or local_cuda_target()
    work = Path(work_dir)
    onnx_dir = export_onnx(random_model(shape, work / shape / "hf"), work / shape / "onnx",
                           dtype="float16", progress=progress)
    out = {}
    for name, tgt, dev in (("gpu", target, device), ("cpu", "llvm", "cpu")):
        engine = Engine(compile_model(onnx_dir, tgt, progress=progress), device=dev,
                        max_context=n_tokens + 8)
        session = engine.new_session()
        ids = prompt_ids(engine, n_tokens)
        first = engine.prefill(session, ids)
        steps = [engine.forward(session, [int(np.argmax(first))])[-1]]
        out[name] = np.stack([first, *steps]).astype("float32")
    diff = np.abs(out["gpu"] - out["cpu"])
    scale = float(np.abs(out["cpu"]).max())
    return {"model": shape, "max_abs_diff": float(diff.max()), "max_abs_logit": scale,
            "rel_diff": float(diff.max()) / scale,
            "same_argmax": bool((out["gpu"].argmax(-1) == out["cpu"].argmax(-1)).all())}


def main(argv=None) -> int:
    from .generation import format_table

    p = argparse.ArgumentParser(prog="python -m tvm_lite.bench.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,gemma-2b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--target", default=None,
                    help="default: this GPU's, sm_90a on Hopper (tvm_lite.target.local_cuda_target)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default="bench_models")
    p.add_argument("--check-logits", action="store_true", help="also compare GPU vs CPU logits")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    result = {}
    if args.check_logits:
        result["logits"] = check_logits(args.shapes.split(",")[0], args.target, args.device,
                                        args.work_dir)
        print(json.dumps(result["logits"]), flush=True)
    rows = bench_models(args.shapes.split(","), args.variants.split(","), args.target, args.device,
                        args.prompt_len, args.decode_tokens, args.repeats, args.work_dir,
                        save=args.json and args.json + ".partial")
    result["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    cols = ["model", "engine", "prefill_tok_s", "decode_tok_s", "cuda_graphs",
            "decode_tok_s_no_graphs", "run_ahead", "decode_tok_s_one_by_one", "prefill_x_stock",
            "decode_x_stock", "decode_x_compile", "weight_MB", "bytes_per_step", "limit_tok_s",
            "of_limit", "error"]
    print(format_table([{c: r.get(c, "") for c in cols} for r in rows], cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
