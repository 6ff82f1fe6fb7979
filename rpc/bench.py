"""``tvm-lite bench ARTIFACT [--rpc HOST:PORT --key K]``: prefill and decode speed of a compiled
artifact on a device, local or behind the tracker, through the engine's own loop.

For each prompt length: ``repeats`` times a fresh session prefills a real-text prompt of exactly
that many tokens, then decodes ``decode_tokens`` greedy tokens. Speeds are the median over the
repeats, with their spread (min and max); the greedy tokens are reported too, so two devices (or
local and RPC) can be checked to compute the same thing.

Artifacts with step entries (``engine.steps``: in-place builds) take the greedy token on the
device, one call per step, as ``Engine.generate`` does; others read the logits back and take the
argmax here.
"""

from __future__ import annotations

import time

import numpy as np


def bench_engine(engine, prompt_lens=(64, 256, 1024), decode_tokens: int = 32,
                 repeats: int = 3, warmup: bool = True, progress=None) -> list[dict]:
    from .remote import lost_server

    with lost_server("the benchmark"):  # a server killed mid-bench: an RPCError, not TVM's check
        return _bench_engine(engine, prompt_lens, decode_tokens, repeats, warmup, progress)


def _bench_engine(engine, prompt_lens, decode_tokens, repeats, warmup, progress) -> list[dict]:
    from tvm_lite.bench import _prompt_ids

    if engine.steps:
        first, step = engine.prefill_greedy, engine.decode_greedy
    else:
        def first(session, ids):
            return int(np.argmax(engine.prefill(session, ids)))

        def step(session, token):
            return int(np.argmax(engine.forward(session, [token])[-1]))

    rows = []
    for n in prompt_lens:
        ids = _prompt_ids(engine, n)
        if len(ids) < n:
            raise ValueError(f"the benchmark text has only {len(ids)} tokens, {n} asked")
        if n + decode_tokens > engine.max_context:
            raise ValueError(f"prompt {n} + decode {decode_tokens} tokens exceeds the model's "
                             f"context ({engine.max_context})")
        if warmup:  # first calls of a shape allocate; not what a steady device does
            session = engine.new_session()
            step(session, first(session, ids))
        prefill, decode, tokens = [], [], None
        for r in range(repeats):
            if progress:
                progress(f"prompt {n}: repeat {r + 1}/{repeats}")
            session = engine.new_session()
            t0 = time.perf_counter()
            out = [first(session, ids)]
            prefill.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            for _ in range(decode_tokens):
                out.append(step(session, out[-1]))
            decode.append(time.perf_counter() - t1)
            if tokens is None:
                tokens = out
            elif out != tokens:
                raise RuntimeError(f"prompt {n}: repeat {r + 1} generated other greedy tokens "
                                   f"than repeat 1 ({out[:8]}... vs {tokens[:8]}...)")
        pre = np.array([n / t for t in prefill])
        dec = np.array([decode_tokens / t for t in decode]) if decode_tokens else np.array([np.nan])
        rows.append({
            "prompt_len": n, "decode_tokens": decode_tokens, "repeats": repeats,
            "prefill_tok_s": float(np.median(pre)), "prefill_min": float(pre.min()),
            "prefill_max": float(pre.max()),
            "decode_tok_s": float(np.median(dec)), "decode_min": float(dec.min()),
            "decode_max": float(dec.max()),
            "tokens": tokens,
        })
    return rows


def _spread(row, what: str) -> str:
    med, lo, hi = row[f"{what}_tok_s"], row[f"{what}_min"], row[f"{what}_max"]
    if not med or med != med:
        return ""
    return f"{lo:.1f}-{hi:.1f} (±{50 * (hi - lo) / med:.1f}%)"


def format_rows(rows: list[dict]) -> str:
    from tvm_lite.bench import format_table

    table = [{"prompt": r["prompt_len"], "prefill tok/s": r["prefill_tok_s"],
              "prefill min-max": _spread(r, "prefill"), "decode tok/s": r["decode_tok_s"],
              "decode min-max": _spread(r, "decode"), "decoded": r["decode_tokens"],
              "repeats": r["repeats"]} for r in rows]
    return format_table(table, list(table[0]))
