"""AttachMetadata: the compiled module describes its own calling convention.

The last pass of the pipeline. It reads the module's public Relax functions as the passes before
it left them and adds

    _metadata() -> R.str(json)

a function that returns one JSON string (MLC-LLM's compiled models carry a ``_metadata`` function
the same way), so any process that can load the library reads it: a runtime-only TVM process, or
the host of an RPC session (a string crosses the link by value). ``compile_model`` writes the same
description into the artifact's ``manifest.json`` (``"convention"``). The engine reads it to pick
how it calls the model (``tvm_lite/runners.py``) instead of probing for functions.

The description (``version`` = ``convention.METADATA_VERSION``)::

    kv_cache         "inplace" or "copy"
    entries          {name: [[param name, dtype or kind, shape], ...]} for every public function,
                     parameters in order
    decoders         the model's decoder functions: ["prefill", "decode"] in place, else
                     ["main"] (+ "decode" with a tuning database)
    inputs           the names of the decoders' token inputs (before past_len / the caches)
    kv_caches        {"names", "count", "dtype", "row_shape": the shape after the sequence axis,
                     "rows": each cache's rows: an int for a ring cache (a sliding-window layer's
                     ``window``), null for a full-length one (the session's max_context)}
    workspace        {decoder: number of workspace buffers}; "count": the most (the tuple's size)
    weights          {"count", "tupled": alloc_params exists, "types": [[dtype, shape], ...]}
    tupled, steps    whether the *_tupled entries and the *_step entries are present
    flat_steps       whether the *_step_flat entries are present (buffers as separate arguments)
    chain            whether decode_chain (and, with flat_steps, decode_chain_flat) is present
    prefill_chain    whether prefill_chain_flat is present (a prompt's chunks before its last;
                     it runs prefill_fill where that is there; its tuple form prefill_chain,
                     for RPC, is in ``entries`` where the build has it)
    padded           whether decode_padded (and, with flat_steps, decode_padded_flat) is present
    options          the build options (``BuildOptions.to_dict()``)
"""

from __future__ import annotations

import json

import tvm
from tvm import relax, tirx

from ..convention import (ALLOC_PARAMS, DECODE, DECODERS, KV_CACHE_ATTR, KV_COPY, KV_INPLACE, MAIN,
                          METADATA, METADATA_VERSION, PAST_LEN, PREFILL_FILL, PREFILL_LAST,
                          PREFILL_STEP,
                          DECODE_STEP, DECODE_CHAIN, DECODE_PADDED, PREFILL_CHAIN, TUPLED_ENTRIES,
                          WORKSPACE_PREFIX, flat)


def _dim(d):
    """A dim as JSON: an int, or a symbolic one as its expression (``past_seq + seq``)."""
    return int(d) if isinstance(d, tirx.IntImm) else str(d)


def _type(ty) -> list:
    """[dtype or kind, shape] of a parameter's type (dims: :func:`_dim`)."""
    if isinstance(ty, relax.TensorType):
        shape = [_dim(d) for d in ty.shape.values] if isinstance(ty.shape, relax.ShapeExpr) \
            else None
        return [str(ty.dtype), shape]
    if isinstance(ty, relax.ShapeType):
        return ["shape", [_dim(v) for v in ty.values] if ty.values is not None else None]
    if isinstance(ty, relax.TupleType):
        return ["tuple", [len(ty.fields)]]
    return [type(ty).__name__, None]


def describe(mod: tvm.IRModule, options: dict | None = None) -> dict:
    """The calling convention of ``mod`` (a lowered tvm_lite module) as a JSON-able dict."""
    funcs = {gv.name_hint: f for gv, f in mod.functions_items()
             if isinstance(f, relax.Function) and f.attrs and "global_symbol" in f.attrs
             and gv.name_hint != METADATA}
    entries = {name: [[p.name, *_type(p.ty)] for p in f.params] for name, f in sorted(funcs.items())}
    inplace = [n for n in DECODERS if n in funcs and KV_CACHE_ATTR in funcs[n].attrs]
    decoders = inplace or [n for n in (MAIN, DECODE) if n in funcs]
    first = funcs[decoders[0]] if decoders else None
    desc = {"version": METADATA_VERSION, "kv_cache": KV_INPLACE if inplace else KV_COPY,
            "entries": entries, "decoders": decoders,
            "tupled": all(n in funcs for n in TUPLED_ENTRIES),
            "steps": PREFILL_STEP in funcs and DECODE_STEP in funcs,
            "flat_steps": flat(PREFILL_STEP) in funcs and flat(DECODE_STEP) in funcs,
            "chain": DECODE_CHAIN in funcs,
            "prefill_chain": flat(PREFILL_CHAIN) in funcs,
            "padded": DECODE_PADDED in funcs,
            "options": options or {}}
    if first is None:
        return desc
    names = [p.name for p in first.params]
    if inplace:
        cut = names.index(PAST_LEN)
        cache_names = [str(n) for n in first.attrs[KV_CACHE_ATTR]]
        caches = list(first.params)[cut + 1:cut + 1 + len(cache_names)]
        dtype, shape = _type(caches[0].ty)
        desc["kv_caches"] = {"names": cache_names, "count": len(cache_names), "dtype": dtype,
                             "row_shape": shape[1:],
                             "rows": [r if isinstance(r, int) else None
                                      for r in (_type(c.ty)[1][0] for c in caches)]}
        per = {n: sum(1 for p in funcs[n].params if p.name.startswith(WORKSPACE_PREFIX))
               for n in inplace + [PREFILL_LAST, PREFILL_FILL] if n in funcs}
        desc["workspace"] = {**per, "count": max(per.values())}
        after = list(first.params)[cut + 1 + len(cache_names):]
        weights = [p for p in after if not p.name.startswith(WORKSPACE_PREFIX)]
    else:  # past/present: the inputs, then one past per cache, then the weights
        cut = next((i for i, n in enumerate(names) if n.startswith("past_key_values")), len(names))
        pasts = [p for p in first.params if p.name.startswith("past_key_values")]
        dtype, shape = _type(pasts[0].ty) if pasts else (None, None)
        desc["kv_caches"] = {"names": [p.name for p in pasts], "count": len(pasts),
                             "dtype": dtype, "row_shape": None}
        desc["workspace"] = {"count": 0}
        weights = list(first.params)[cut + len(pasts):]
    desc["inputs"] = names[:cut]
    desc["weights"] = {"count": len(weights), "tupled": ALLOC_PARAMS in funcs,
                       "types": [_type(w.ty) for w in weights]}
    return desc


@tvm.transform.module_pass(opt_level=0, name="AttachMetadata")
class AttachMetadata:
    """Add ``_metadata() -> str``: :func:`describe` of the module, as JSON (see the module doc).
    ``options``: the build options to record; ``sink``: a list that receives the description
    (how ``compile_model`` writes it into the manifest without loading the library)."""

    def __init__(self, options: dict | None = None, sink: list | None = None):
        self.options, self.sink = options, sink

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        desc = describe(mod, self.options)
        if self.sink is not None:
            self.sink.append(desc)
        text = json.dumps(desc, sort_keys=True)
        # a Python str as the body becomes a Relax string constant: the VM returns it as is
        func = relax.Function([], text, relax.ObjectType(), is_pure=True)
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out[METADATA] = func.with_attr("global_symbol", METADATA)
        return out
