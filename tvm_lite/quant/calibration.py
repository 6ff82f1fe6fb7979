"""Calibration: run the model itself (through TVM, on the CPU) on real text and collect, for the
input of every weight matmul, ``H = X^T X`` (GPTQ's Hessian, AWQ's loss) and ``mean |x|`` (AWQ's
channel importance).

The text mixes the calibration domains of :mod:`.corpora` (what users feed a chat model: technical
prose, Python code, conversations through the chat template, and the model's own sampled
generations), in equal token shares, cut into sequences of several lengths (128, 256 and 512
tokens, like real prompts) taken at evenly spaced places of each domain's text
(:func:`mixed_chunks`). The ``docs`` domain reads only the first 60 % of ``pydoc_data.topics``;
the rest stays held out (``heldout_text``, an in-domain check beside :mod:`.evaluate`'s other
domains).

The statistics are collected by one of two equal routes: :func:`collect` runs the model through
TVM (any imported model), :meth:`tvm_lite.quant.reference.Reference.collect` runs the exported
model's PyTorch source (much faster on a CPU; used when the export folder names its source).

The model runs as imported: a copy of ``main`` returns the distinct inputs of the selected
matmuls (the same matcher as :mod:`tvm_lite.relax_passes.quantize_weight_matmuls`) instead of the
logits -- dead code elimination drops what they do not need -- and is built with tvm_lite's own
pipeline. Each chunk of text is one sequence from position 0 (empty KV cache). All layers see the
unquantized model's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CALIBRATION_FRACTION = 0.6  # the first 60 % of the corpus (by characters) is calibration text


def corpus() -> str:
    from .corpora import domain_text

    return domain_text("docs")


def calibration_text() -> str:
    text = corpus()
    return text[:int(len(text) * CALIBRATION_FRACTION)]


def heldout_text() -> str:
    text = corpus()
    return text[int(len(text) * CALIBRATION_FRACTION):]


def token_chunks(tokenizer, text: str, n_tokens: int, chunk: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    ids = ids[:n_tokens]
    return [ids[i:i + chunk] for i in range(0, n_tokens, chunk) if len(ids[i:i + chunk]) == chunk]


CHUNK_LENGTHS = (128, 256, 512)  # calibration sequence lengths, cycled


def _spread(ids: list[int], n_tokens: int, lengths=CHUNK_LENGTHS) -> list[list[int]]:
    """Sequences of the ``lengths`` (cycled) adding up to ``n_tokens``, starting at evenly spaced
    offsets of ``ids`` (a domain seen across its whole text, not its first pages)."""
    sizes, total = [], 0
    while total < n_tokens:
        size = min(lengths[len(sizes) % len(lengths)], n_tokens - total)
        sizes.append(size)
        total += size
    if len(ids) < n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    slack = len(ids) - n_tokens
    out, pos = [], 0
    for i, size in enumerate(sizes):
        start = pos + (slack * i) // max(len(sizes), 1)
        out.append(ids[start:start + size])
        pos += size
    return out


def mixed_chunks(tokenizer, n_tokens: int, domains, self_samples=None) -> list[list[int]]:
    """Calibration sequences: ``n_tokens`` in all, an equal share per domain (see
    :mod:`.corpora`); ``self_samples`` (lists of token ids) are the ``self`` domain."""
    from . import corpora

    share = n_tokens // len(domains)
    chunks: list[list[int]] = []
    for name in domains:
        if name == "self":
            if not self_samples:
                raise ValueError("the 'self' calibration domain needs the model's sampled generations")
            ids = [t for s in self_samples for t in s][:share]
            step = len(self_samples[0])
            chunks += [ids[i:i + step] for i in range(0, len(ids), step)]
            continue
        text = calibration_text() if name == "docs" else \
            corpora.domain_text(name, corpora.chat_renderer(tokenizer))
        chunks += _spread(tokenizer.encode(text), share)
    return chunks


@dataclass
class InputStats:
    """Statistics of one matmul input ``x [T, K]`` over the calibration tokens."""

    hessian: np.ndarray  # float64 [K, K], sum of x^T x
    abs_sum: np.ndarray  # float64 [K], sum of |x|
    tokens: int = 0

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)


def input_groups(matmuls) -> list[list[str]]:
    """Names of the matmul WeightUses grouped by the input they read (q/k/v, gate/up)."""
    groups: list[tuple] = []
    for u in matmuls:
        for x, names in groups:
            if x.same_as(u.input):
                names.append(u.name)
                break
        else:
            groups.append((u.input, [u.name]))
    return [names for _, names in groups]


SELF_SAMPLES = 8  # sequences the model samples for the "self" domain (temperature 1)


def self_samples(reference, tokenizer, n_tokens: int, key: str, progress=None) -> list[list[int]]:
    """The model's own generations for data-free calibration: ``SELF_SAMPLES`` temperature-1
    samples from the chat template's opening (system prompt, then the user's turn begins: the
    model writes the question and usually the answer), ``n_tokens`` in all. Cached on disk under
    ``$TVM_LITE_CACHE/quant/`` by the weights' digest ``key``."""
    import json
    import os

    from tvm_lite.export import cache_dir

    length = -(-n_tokens // SELF_SAMPLES)
    path = cache_dir() / "quant" / f"self-samples-{key[:16]}-{SELF_SAMPLES}x{length}.json"
    if path.exists():
        return json.loads(path.read_text())
    from .corpora import chat_renderer

    render = chat_renderer(tokenizer)
    marker = "\x00"
    prefix = render([{"role": "user", "content": marker}]).split(marker)[0] if render else ""
    ids = ([tokenizer.bos_token_id] if not prefix and tokenizer.bos_token_id is not None else []) + \
        tokenizer.encode(prefix)
    if progress is not None:
        progress(f"calibration: sampling {SELF_SAMPLES} x {length} tokens from the model itself")
    samples = [ids + s for s in reference.sample(ids, SELF_SAMPLES, length)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(samples))
    tmp.replace(path)
    return samples


def _exposing_module(mod, inputs: list):
    """``mod`` whose ``main`` returns ``inputs`` (Vars bound in its dataflow block)."""
    import tvm
    from tvm import relax

    func = mod["main"]
    body = func.body
    blocks = list(body.blocks)
    if not blocks or not isinstance(blocks[-1], relax.DataflowBlock):
        raise ValueError("calibration expects main's body to end in a dataflow block")
    last = blocks[-1]
    outs = [relax.Var(f"calib_{i}", x.ty) for i, x in enumerate(inputs)]
    bindings = list(last.bindings) + [relax.VarBinding(o, x) for o, x in zip(outs, inputs)]
    blocks[-1] = relax.DataflowBlock(bindings)
    new_body = relax.SeqExpr(blocks, relax.Tuple(outs))
    ret_ty = relax.TupleType([x.ty for x in inputs])
    new_func = relax.Function(list(func.params), new_body, ret_ty, func.is_pure, func.attrs)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = new_func
    return relax.transform.DeadCodeElimination(["main"])(out)


def _inputs_for(func, ids: list[int]) -> list[np.ndarray]:
    """The model's non-weight inputs for one sequence ``ids`` from position 0 (empty past)."""
    import tvm

    n_in = int(func.attrs["num_input"])
    names = list(func.attrs["tvm_lite.input_names"])
    n = len(ids)
    dims: dict = {}
    ids_var = func.params[names.index("input_ids")]
    for d in ids_var.ty.shape.values:
        if isinstance(d, tvm.tirx.Var):
            dims[d.name] = n
    args = []
    for name, var in zip(names, list(func.params)[:n_in]):
        shape = []
        for d in var.ty.shape.values:
            if isinstance(d, tvm.tirx.IntImm):
                shape.append(int(d))
            else:
                ana = tvm.sym.Analyzer()
                for v in tvm.tirx.analysis.undefined_vars(d):
                    ana.bind(v, tvm.tirx.IntImm(v.ty.dtype, dims.get(v.name, 0)))
                shape.append(int(ana.simplify(d)))
        dtype = str(var.ty.dtype)
        if name == "input_ids":
            args.append(np.asarray(ids, dtype).reshape(shape))
        elif name == "attention_mask":
            args.append(np.ones(shape, dtype))
        elif name == "position_ids":
            args.append(np.arange(n, dtype=dtype).reshape(shape))
        else:
            args.append(np.zeros(shape, dtype))
    return args


def collect(mod, uses: list, chunks: list[list[int]], progress=None) -> dict:
    """``{weight name: InputStats}`` for the matmul ``uses`` (WeightUse), over ``chunks`` of
    token ids. Uses that share an input share one InputStats."""
    import tvm
    from tqdm import tqdm
    from tvm import relax

    from tvm_lite.compiler import build, detach_params

    matmuls = [u for u in uses if u.kind == "matmul"]
    groups = input_groups(matmuls)
    by_name = {u.name: u for u in matmuls}
    distinct = [by_name[g[0]].input for g in groups]
    index = {name: i for i, g in enumerate(groups) for name in g}
    if progress:
        progress(f"calibration: {len(matmuls)} matmuls read {len(distinct)} distinct inputs; "
                 f"{len(chunks)} x {len(chunks[0]) if chunks else 0} tokens")
    cal = _exposing_module(mod, distinct)
    cal, params = detach_params(cal)
    ex = build(cal, "llvm", kv_cache="copy")  # its own outputs: the matmul inputs
    vm = relax.VirtualMachine(ex, tvm.cpu())
    weights = [tvm.runtime.tensor(p.numpy()) for p in params]
    stats = [None] * len(distinct)
    for ids in tqdm(chunks, desc="calibration", unit="chunk", disable=progress is None):
        args = [tvm.runtime.tensor(a) for a in _inputs_for(cal["main"], ids)]
        outs = vm["main"](*args, *weights)
        for i in range(len(distinct)):
            x = outs[i].numpy()
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            if stats[i] is None:
                stats[i] = InputStats(np.zeros((x.shape[1], x.shape[1])), np.zeros(x.shape[1]))
            stats[i].hessian += x.T @ x
            stats[i].abs_sum += np.abs(x).sum(axis=0)
            stats[i].tokens += x.shape[0]
    return {name: stats[i] for name, i in index.items()}
