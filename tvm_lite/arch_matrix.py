"""The architecture matrix: every decoder family through the same export -> import -> build path.

Each architecture is a tiny random-weight model built from its transformers config (seeded; hidden
64, 2 layers, a 512-token vocabulary, a sliding window of 4 where the family has one), exported by
each torch exporter, compiled for llvm, and run by the :class:`~tvm_lite.engine.Engine` as a user
would: a prefill, a second prefill chunk after it, then single-token decode steps past the window.
Every position's logits are compared with transformers' own forward over the whole sequence (fp32).
An E0M4 (RTN, g32) build of the same export must run too.

    python -m tvm_lite.arch_matrix [--archs llama,gemma2] [--exporters dynamo,torchscript]

prints the table the README shows. ``tests/test_architectures.py`` runs the same checks.
``--memory`` measures the KV caches of a Gemma-3-1B-like model's builds (ring, full length,
past/present) at 8192 tokens; ``--bench`` times decode of a window model with each cache (on the
CPU, or ``--target cuda``); ``--cuda`` checks the window models' CUDA builds against the CPU's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export import cache_dir, cache_lock

TOLERANCE = 1e-4  # fp32 logits against torch
WINDOW = 4  # the sliding window of the families that have one: the test sequence runs well past it
VOCAB = 512
# token ids of the check: a prefill of 5, a chunk of 3 after it, then 4 decode steps (12 > WINDOW)
IDS = [5, 17, 300, 42, 9, 100, 7, 250, 3, 61, 480, 11]
PREFILL, CHUNK = 5, 3

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)
_SLIDING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)

# architecture -> config overrides on top of _COMMON (None drops a _COMMON key)
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen2_moe": dict(_MOE, shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3": dict(head_dim=32),
    "qwen3_moe": dict(_MOE, head_dim=16, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gemma": dict(head_dim=16),
    "gemma2": dict(_SLIDING, head_dim=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(_SLIDING, head_dim=16, rope_local_base_freq=10000.0,
                        query_pre_attn_scalar=16),
    "phi": dict(num_key_value_heads=None),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=0),
    "stablelm": {},
    "starcoder2": dict(sliding_window=WINDOW),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, hidden_size=None,
                 intermediate_size=None, num_hidden_layers=None, num_attention_heads=None,
                 num_key_value_heads=None, max_position_embeddings=None),
    "gpt_neox": dict(num_key_value_heads=None),
    "olmo2": {},
    "granite": {},
    "cohere": {},
    "smollm3": dict(pad_token_id=0),
}


def config_kwargs(arch: str) -> dict:
    kwargs = {**_COMMON, **ARCHITECTURES[arch]}
    return {k: v for k, v in kwargs.items() if v is not None}


def _tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (the matrix compares logits, not text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def hf_folder(arch: str) -> Path:
    """The tiny model's Hugging Face folder (made once, cached: seeded, so reproducible)."""
    return _hf_folder_for(arch, config_kwargs(arch))


def _hf_folder_for(arch: str, kwargs: dict) -> Path:
    key = hashlib.sha256(json.dumps([arch, kwargs], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "arch_matrix" / f"{arch}-{key}"
    if (folder / "config.json").exists():
        return folder
    with cache_lock(folder):
        if not (folder / "config.json").exists():
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            cfg = AutoConfig.for_model(arch, **kwargs)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
            with torch.no_grad():  # random, not-too-small norms and biases: every term counts
                for name, p in model.named_parameters():
                    if p.ndim == 1:
                        p.add_(0.1 * torch.randn_like(p))
            tmp = folder.with_name(folder.name + ".tmp")
            model.save_pretrained(tmp)
            _tiny_tokenizer(tmp)
            tmp.rename(folder)
    return folder


def torch_logits(arch: str, ids=tuple(IDS)) -> np.ndarray:
    """transformers' logits of every position of ``ids`` (one forward, no cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_folder(arch)), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def engine_logits(engine, ids=IDS, prefill: int = PREFILL, chunk: int = CHUNK) -> np.ndarray:
    """The engine's logits of every position of ``ids``: prefill, a chunk, then one token at a
    time."""
    session = engine.new_session()
    rows = [engine.forward(session, ids[:prefill]),
            engine.forward(session, ids[prefill:prefill + chunk])]
    rows += [engine.forward(session, [t]) for t in ids[prefill + chunk:]]
    return np.concatenate(rows, axis=0)


# the GPU check's long sequence: a 150-token prefill and a 70-token chunk (many key tiles below
# the window of 4), then decode steps
LONG_IDS = [int(i) for i in np.random.default_rng(0).integers(3, VOCAB, 226)]
LONG_PREFILL, LONG_CHUNK = 150, 70
WINDOW_ARCHS = ("mistral", "gemma2", "gemma3_text")
GPU_TOLERANCE = {"float32": 1e-3, "float16": 3e-2}  # CUDA logits vs the fp32 CPU build's


def check_cuda(arch: str, dtype: str = "float32", target: str = "cuda",
               device: str = "cuda:0") -> dict:
    """A window model (dynamo export, ``dtype``) built for ``target`` and run on ``device``
    against the fp32 CPU build of the same model (which matches torch: :func:`check`), over IDS
    and LONG_IDS (prefill, chunk, decode past the window): the max abs logit difference of
    each, and the rows of the GPU build's caches (a ring's: the window)."""
    from .artifact import compile_model
    from .engine import Engine
    from .export import export_onnx

    onnx = export_onnx(hf_folder(arch), exporter="dynamo", dtype=dtype, progress=lambda _: None)
    gpu = Engine(compile_model(onnx, target, progress=lambda *_: None), device=device)
    cpu = Engine(build(arch, "dynamo"))
    out = {"rows": gpu.runner.convention["kv_caches"].get("rows")}
    for name, args in (("short", (IDS, PREFILL, CHUNK)),
                       ("long", (LONG_IDS, LONG_PREFILL, LONG_CHUNK))):
        out[name] = float(np.abs(engine_logits(gpu, *args).astype("float32")
                                 - engine_logits(cpu, *args)).max())
    return out


@dataclass
class Result:
    arch: str
    exporter: str
    status: str  # "ok", "mismatch", or the stage that failed ("export", "compile", ...)
    max_diff: float | None = None
    e0m4: str = ""  # "runs", or why not
    reason: str = ""
    seconds: float = 0.0

    def row(self) -> str:
        diff = "" if self.max_diff is None else f"{self.max_diff:.1e}"
        return f"| {self.arch} | {self.exporter} | {self.status} | {diff} | {self.e0m4} | {self.reason} |"


def _why(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("(Refer to")]  # torch.onnx's footer
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text}"[:300].replace("|", "/")


def export(arch: str, exporter: str) -> Path:
    from .export import export_onnx

    return export_onnx(hf_folder(arch), exporter=exporter, progress=lambda _: None)


def build(arch: str, exporter: str, quant: bool = False) -> Path:
    from .artifact import compile_model

    q = None
    if quant:
        from .quant import QuantConfig

        q = QuantConfig("e0m4", "rtn", 32)
    return compile_model(export(arch, exporter), "llvm", quant=q, progress=lambda *_: None)


def check(arch: str, exporter: str, quant: bool = True) -> Result:
    """Export, build, run and compare one architecture with one exporter."""
    from .engine import Engine

    start = time.time()
    stage = "export"
    try:
        export(arch, exporter)
        stage = "compile"
        art = build(arch, exporter)
        stage = "run"
        got = engine_logits(Engine(art))
        ref = torch_logits(arch)
        diff = float(np.abs(got - ref).max())
        res = Result(arch, exporter, "ok" if diff <= TOLERANCE else "mismatch", diff)
        if quant:
            stage = "e0m4"
            q = engine_logits(Engine(build(arch, exporter, quant=True)))
            res.e0m4 = "runs" if np.isfinite(q).all() else "non-finite logits"
    except Exception as err:  # the matrix reports every failure and goes on
        if stage == "e0m4":
            res.e0m4 = f"fails: {_why(err)}"
        else:
            res = Result(arch, exporter, f"fails ({stage})", reason=_why(err))
            traceback.print_exc()
    res.seconds = time.time() - start
    return res


# Gemma-3-1B's KV-cache shapes: 26 layers, 4 query heads and 1 kv head of 256, window 512, five
# local layers to one global; a small hidden size, FFN and vocabulary (the caches do not depend on
# them), random weights
GEMMA3_1B_KV = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=26,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                    sliding_window=512, max_position_embeddings=8192,
                    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4
                    + ["sliding_attention"] * 2,
                    query_pre_attn_scalar=256, rope_local_base_freq=10000.0,
                    tie_word_embeddings=False)
# the KV-cache layouts compared: label -> compile_model options
CACHE_LAYOUTS = {
    "past/present (exported interface, `kv_cache='copy'`)": dict(kv_cache="copy"),
    "in place, full length, window in the mask (`kv_windows=()`)": dict(kv_windows=()),
    "in place, ring of `window` rows on local layers (default)": {},
}


def measure_window_caches(context: int = 8192) -> dict[str, int]:
    """KV bytes each layout of the Gemma-3-1B-like model holds at ``context`` tokens, measured on
    real builds: in place, the caches a session allocates for ``max_context = context``; past/
    present, the pasts of ``context - 1`` tokens given to one decode step plus the presents it
    returns (both alive during the step)."""
    import tvm

    from .artifact import compile_model
    from .engine import Engine
    from .export import export_onnx

    onnx = export_onnx(_hf_folder_for("gemma3_text", GEMMA3_1B_KV), progress=lambda _: None)
    out = {}
    for label, options in CACHE_LAYOUTS.items():
        engine = Engine(compile_model(onnx, "llvm", progress=lambda *_: None, **options),
                        max_context=context)
        session = engine.new_session()
        if engine.runner.inplace:
            out[label] = sum(t.numpy().nbytes for t in session.past)
            continue
        rng = np.random.default_rng(0)
        shape = (1, GEMMA3_1B_KV["num_key_value_heads"], context - 1, GEMMA3_1B_KV["head_dim"])
        session.past = [tvm.runtime.tensor(rng.standard_normal(shape).astype("float32"))
                        for _ in range(2 * GEMMA3_1B_KV["num_hidden_layers"])]
        session.length = context - 1
        pasts = sum(int(np.prod(t.shape)) * 4 for t in session.past)
        engine.forward(session, [5])
        out[label] = pasts + sum(int(np.prod(t.shape)) * 4 for t in session.past)
    return out


def memory_table(context: int = 8192) -> str:
    measured = measure_window_caches(context)
    full = measured["in place, full length, window in the mask (`kv_windows=()`)"]
    lines = [f"| Gemma-3-1B-like KV cache at {context} tokens (fp32, measured) | MB | vs full |",
             "|---|---|---|"]
    lines += [f"| {label} | {b / 1e6:.1f} | {b / full:.2f}x |" for label, b in measured.items()]
    return "\n".join(lines)


def _kernel_ms(engine, session, token: int, steps: int) -> dict:
    """Milliseconds per decode step of each VM call (kernels and builtins; the entry functions
    include the calls they make), timed around each call by a VM instrument (CPU kernels are
    synchronous)."""
    spent, start = {}, {}

    def instrument(_func, name, before_run, _ret, *_args):
        if before_run:
            start[name] = time.perf_counter()
        elif name in start:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start.pop(name)
        return 0  # run the call as usual

    engine.vm.set_instrument(instrument)
    try:
        for _ in range(steps):
            token = engine.decode_greedy(session, token)
    finally:
        engine.vm.set_instrument(lambda *_: 0)
    return {k: v / steps * 1e3 for k, v in spent.items()}


def _attention_ms(engine, session, token: int, steps: int) -> float:
    """Milliseconds per decode step in the fused attention kernels (every layer)."""
    return sum(v for k, v in _kernel_ms(engine, session, token, steps).items()
               if k.startswith("attention"))


def bench_window_decode(contexts=(512, 4096), window: int = 512, steps: int = 16,
                        repeats: int = 5, target: str = "llvm") -> str:
    """Decode of a Mistral-like model (hidden 256, 2 layers, window ``window``) at each context:
    ring caches (the default), full-length caches with the window in the mask, and the same
    model without a window; engines interleaved in one process, medians of ``repeats``. Three
    tables: decode tok/s (and the ring's as a ratio to the others'), the time per step in the
    attention kernels, and the ring model's slowest calls per step (instrumented runs after the
    timed ones). ``target`` "cuda": built for and run on the CUDA device (tok/s only: a VM
    instrument times kernel launches there, not kernels)."""
    gpu = target != "llvm"
    import statistics

    from .artifact import compile_model
    from .engine import Engine
    from .export import export_onnx

    engines = {}
    for label, win, options in (("ring", window, {}), ("full-length + mask", window,
                                                        dict(kv_windows=())),
                                ("no window", None, {})):
        kwargs = dict(_COMMON, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=max(contexts) + 64,
                      sliding_window=win)
        folder = _hf_folder_for("mistral", kwargs)
        art = compile_model(export_onnx(folder, progress=lambda _: None), target,
                            progress=lambda *_: None, **options)
        engines[label] = Engine(art, device="cuda:0" if gpu else None)
    speed = ["| context | " + " | ".join(f"{k} tok/s" for k in engines)
             + " | ring / full-length | ring / no window |", "|---|" + "---|" * (len(engines) + 2)]
    attention = ["| context | " + " | ".join(f"{k}: attention ms/step" for k in engines) + " |",
                 "|---|" + "---|" * len(engines)]
    profile = ["| context | ring model: slowest VM calls, ms/step (entry functions include their "
               "calls) |", "|---|---|"]
    rng = np.random.default_rng(0)
    for ctx in contexts:
        prompt = rng.integers(3, VOCAB, ctx).tolist()
        times: dict = {k: [] for k in engines}
        attn: dict = {k: [] for k in engines}
        for _ in range(repeats):
            for label, engine in engines.items():  # interleaved
                session = engine.new_session()
                token = int(engine.prefill_greedy(session, prompt))
                start = time.perf_counter()
                for _ in range(steps):
                    token = engine.decode_greedy(session, token)
                times[label].append(steps / (time.perf_counter() - start))
                if not gpu:
                    attn[label].append(_attention_ms(engine, session, token, steps))
        med = {k: statistics.median(t) for k, t in times.items()}
        speed.append(f"| {ctx} | " + " | ".join(f"{v:.0f}" for v in med.values())
                     + f" | {med['ring'] / med['full-length + mask']:.2f} | "
                     f"{med['ring'] / med['no window']:.2f} |")
        if gpu:
            continue
        attention.append(f"| {ctx} | " + " | ".join(f"{statistics.median(t):.3f}"
                                                    for t in attn.values()) + " |")
        # where the ring model's decode step goes at this context: its slowest calls
        engine_ring = engines["ring"]
        session = engine_ring.new_session()
        token = int(engine_ring.prefill_greedy(session, prompt))
        top = sorted(_kernel_ms(engine_ring, session, token, steps).items(), key=lambda kv: -kv[1])
        profile.append(f"| {ctx} | " + ", ".join(f"{k} {v:.2f}" for k, v in top[:10]) + " |")
    if gpu:
        return "\n".join(speed)
    return "\n".join(speed) + "\n\n" + "\n".join(attention) + "\n\n" + "\n".join(profile)


def bench_moe_forms(steps: int = 16, repeats: int = 5) -> str:
    """CPU decode tok/s of a Qwen2-MoE-like model (8 experts, top 2, hidden 256, expert FFN 512)
    exported in the dense and the gather form (``export_onnx(experts=...)``); builds interleaved,
    median of repeats, and whether both forms' greedy tokens agree."""
    import statistics

    from .artifact import compile_model
    from .engine import Engine
    from .export import export_onnx

    kwargs = dict(_COMMON, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                  shared_expert_intermediate_size=512, decoder_sparse_step=1,
                  max_position_embeddings=512)
    folder = _hf_folder_for("qwen2_moe", kwargs)
    engines = {form: Engine(compile_model(export_onnx(folder, experts=form, progress=lambda _: None),
                                          "llvm", progress=lambda *_: None))
               for form in ("dense", "gather")}
    prompt = list(range(3, 60))
    speed: dict = {k: [] for k in engines}
    tokens: dict = {}
    for _ in range(repeats):
        for form, engine in engines.items():  # interleaved
            session = engine.new_session()
            token, out = engine.prefill_greedy(session, prompt), []
            start = time.perf_counter()
            for _ in range(steps):
                token = engine.decode_greedy(session, token)
                out.append(token)
            speed[form].append(steps / (time.perf_counter() - start))
            tokens[form] = out
    rows = ["| experts export | decode tok/s (median, min-max) |", "|---|---|"]
    rows += [f"| {k} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) |" for k, v in speed.items()]
    rows.append(f"same greedy tokens: {tokens['dense'] == tokens['gather']}")
    return "\n".join(rows)


def main(argv=None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--no-quant", action="store_true", help="skip the E0M4 builds")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory", action="store_true",
                        help="measure the window-cache memory of three builds "
                             "(Gemma-3-1B-like, 8k) and stop")
    parser.add_argument("--bench", action="store_true",
                        help="decode tok/s of a window model at contexts 512 and 4096, and stop")
    parser.add_argument("--target", default="llvm",
                        help="--bench's target: llvm (default), or cuda (run on the CUDA device)")
    parser.add_argument("--cuda", action="store_true",
                        help="the window models built for CUDA (fp32 and fp16) against the CPU "
                             "build, on the CUDA device, and stop")
    parser.add_argument("--bench-moe", action="store_true",
                        help="CPU decode tok/s of a MoE exported dense vs gather, and stop")
    args = parser.parse_args(argv)
    if args.memory:
        print(memory_table())
        return
    if args.bench:
        print(bench_window_decode(target=args.target))
        return
    if args.cuda:
        print("| architecture | dtype | cache rows (CUDA build) | max abs diff vs CPU, 12 tokens "
              "| 226 tokens | tolerance |\n|---|---|---|---|---|---|")
        for arch in WINDOW_ARCHS:
            for dtype in GPU_TOLERANCE:
                r = check_cuda(arch, dtype)
                print(f"| {arch} | {dtype} | {r['rows']} | {r['short']:.1e} | {r['long']:.1e} | "
                      f"{GPU_TOLERANCE[dtype]:.0e} |", flush=True)
        return
    if args.bench_moe:
        print(bench_moe_forms())
        return
    jobs = [(a, e) for a in args.archs.split(",") for e in args.exporters.split(",")]
    results = []
    for arch, exporter in tqdm(jobs, desc="architectures"):
        results.append(check(arch, exporter, quant=not args.no_quant))
        tqdm.write(results[-1].row() + f" ({results[-1].seconds:.0f} s)")
    print("\n| architecture | exporter | result | max abs diff | E0M4 build | why not |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(r.row())
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))


if __name__ == "__main__":
    main()
