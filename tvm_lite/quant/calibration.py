"""Calibration: run the model itself (through TVM, on the CPU) on real text and collect, for the
input of every weight matmul, ``H = X^T X`` (GPTQ's Hessian, AWQ's loss) and ``mean |x|`` (AWQ's
channel importance).

The text is English prose every CPython has offline: the reference-manual topics of
``pydoc_data.topics``, in key order. The first part is calibration text, the last part is held
out for perplexity (:mod:`.evaluate`); the two never overlap.

The model runs as imported: a copy of ``main`` returns the distinct inputs of the selected
matmuls (the same matcher as :mod:`tvm_lite.relax_passes.quantize_weight_matmuls`) instead of the
logits -- dead code elimination drops what they do not need -- and is built with tvm_lite's own
pipeline. Each chunk of text is one sequence from position 0 (empty KV cache). All layers see the
unquantized model's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

CALIBRATION_FRACTION = 0.6  # the first 60 % of the corpus (by characters) is calibration text


def corpus() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


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


@dataclass
class InputStats:
    """Statistics of one matmul input ``x [T, K]`` over the calibration tokens."""

    hessian: np.ndarray  # float64 [K, K], sum of x^T x
    abs_sum: np.ndarray  # float64 [K], sum of |x|
    tokens: int = 0

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)


def _exposing_module(mod: tvm.IRModule, inputs: list) -> tvm.IRModule:
    """``mod`` whose ``main`` returns ``inputs`` (Vars bound in its dataflow block)."""
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


def _inputs_for(func: relax.Function, ids: list[int]) -> list[np.ndarray]:
    """The model's non-weight inputs for one sequence ``ids`` from position 0 (empty past)."""
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


def collect(mod: tvm.IRModule, uses: list, chunks: list[list[int]], progress=None) -> dict:
    """``{weight name: InputStats}`` for the matmul ``uses`` (WeightUse), over ``chunks`` of
    token ids. Uses that share an input share one InputStats."""
    from tqdm import tqdm

    from tvm_lite.compiler import build, detach_params

    matmuls = [u for u in uses if u.kind == "matmul"]
    distinct: list = []
    index: dict = {}
    for u in matmuls:
        for i, x in enumerate(distinct):
            if x.same_as(u.input):
                index[u.name] = i
                break
        else:
            index[u.name] = len(distinct)
            distinct.append(u.input)
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
