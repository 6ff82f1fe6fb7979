"""Generation benchmarks: every one runs the engine's own loop (``Engine.tokens``: prefill, then
one decode step per token, greedy on the device where the model has step entries), so what they
report is what a user's generation costs.

``bench_engine``  ``tvm-lite bench`` and ``tvm-lite bench ARTIFACT [--rpc ...]``: per prompt length,
                  a warm-up, then ``repeats`` fresh sessions (prefill + ``decode_tokens`` greedy
                  tokens); medians with their spread, and the greedy tokens.
``bench_kv_cache`` ``tvm-lite bench-kv``: decode speed of each KV-cache path at growing contexts.
``bench_interleaved`` several builds of one model, their steps interleaved (A, B, A, B...).
``bench_onnxruntime`` the same prefill + greedy decode through onnxruntime (the reference).
``bench_side_by_side`` ``tvm-lite bench``: builds and onnxruntime interleaved round by round, with
                  each round's speed relative to onnxruntime's.
"""

from __future__ import annotations

import time

import numpy as np


def prompt_ids(engine, n: int) -> list[int]:
    """A real-text prompt of exactly ``n`` tokens (English prose shipped with CPython)."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    ids = engine.tokenizer.encode(text)
    if len(ids) < n:
        raise ValueError(f"the benchmark text has only {len(ids)} tokens, {n} asked")
    return ids[:n]


def generate_tokens(engine, session, ids, decode_tokens: int, clock=None) -> tuple[list, list]:
    """Prefill ``ids`` and take ``decode_tokens`` greedy decode steps through the engine's loop:
    (the tokens, the seconds of each call: the prefill first). ``clock`` (e.g.
    ``time.process_time``): time each call with it instead of the engine's wall-clock seconds."""
    tokens, seconds = [], []
    loop = engine.tokens(session, ids)
    while len(tokens) <= decode_tokens:
        t0 = clock() if clock else 0.0
        step = next(loop, None)
        if step is None:
            break
        tokens.append(step.token)
        seconds.append(clock() - t0 if clock else step.seconds)
    loop.close()
    return tokens, seconds


def bench_engine(engine, prompt_lens=(64, 256, 1024), decode_tokens: int = 32,
                 repeats: int = 3, warmup: bool = True, progress=None) -> list[dict]:
    """For each prompt length: ``repeats`` times a fresh session prefills a real-text prompt of
    exactly that many tokens, then decodes ``decode_tokens`` greedy tokens (after one warm-up
    run: the first calls of a shape allocate, which a steady device does not). Speeds are the
    median over the repeats with their spread (min, max); the greedy tokens are reported too, so
    two devices (or local and RPC) can be checked to compute the same thing."""
    rows = []
    for n in prompt_lens:
        ids = prompt_ids(engine, n)
        if n + decode_tokens > engine.max_context:
            raise ValueError(f"prompt {n} + decode {decode_tokens} tokens exceeds the model's "
                             f"context ({engine.max_context})")
        if warmup:
            generate_tokens(engine, engine.new_session(), ids, min(decode_tokens, 1))
        prefill, decode, tokens = [], [], None
        for r in range(repeats):
            if progress:
                progress(f"prompt {n}: repeat {r + 1}/{repeats}")
            out, seconds = generate_tokens(engine, engine.new_session(), ids, decode_tokens)
            prefill.append(seconds[0])
            decode.append(sum(seconds[1:]))
            if tokens is None:
                tokens = out
            elif out != tokens:
                raise RuntimeError(f"prompt {n}: repeat {r + 1} generated other greedy tokens "
                                   f"than repeat 1 ({out[:8]}... vs {tokens[:8]}...)")
        rows.append(_row(n, decode_tokens, prefill, decode, tokens))
    return rows


def _row(n: int, decode_tokens: int, prefill: list, decode: list, tokens) -> dict:
    """tok/s over the repeats' seconds: medians and the spread."""
    pre = np.array([n / t for t in prefill])
    dec = np.array([decode_tokens / t for t in decode]) if decode_tokens else np.array([np.nan])
    return {"prompt_len": n, "decode_tokens": decode_tokens, "repeats": len(prefill),
            "prefill_tok_s": float(np.median(pre)), "prefill_min": float(pre.min()),
            "prefill_max": float(pre.max()),
            "decode_tok_s": float(np.median(dec)), "decode_min": float(dec.min()),
            "decode_max": float(dec.max()), "tokens": tokens}


def bench_tvm(engine, prompt_len: int, decode_tokens: int, repeats: int = 3) -> dict:
    """One prompt length of :func:`bench_engine` (prefill and decode tok/s, medians)."""
    (row,) = bench_engine(engine, [prompt_len], decode_tokens, repeats)
    return row


def _spread(row, what: str) -> str:
    med, lo, hi = row[f"{what}_tok_s"], row[f"{what}_min"], row[f"{what}_max"]
    if not med or med != med:
        return ""
    return f"{lo:.1f}-{hi:.1f} (±{50 * (hi - lo) / med:.1f}%)"


def format_rows(rows: list[dict], first: tuple = ()) -> str:
    """:func:`bench_engine`'s rows as a table; ``first``: keys of the rows shown as the first
    columns (e.g. which engine). Rows of :func:`bench_side_by_side` also show their speed
    relative to onnxruntime (median of the rounds' ratios)."""
    table = [{**{k: r.get(k) for k in first}, "prompt": r["prompt_len"],
              "prefill tok/s": r["prefill_tok_s"], "prefill min-max": _spread(r, "prefill"), "decode tok/s": r["decode_tok_s"],
              "decode min-max": _spread(r, "decode"), "decoded": r["decode_tokens"],
              "repeats": r["repeats"]} for r in rows]
    for t, r in zip(table, rows):
        if "vs_ort_decode" in r:
            t.update({"prefill vs ort": f"{r['vs_ort_prefill']:.2f}x",
                      "decode vs ort": f"{r['vs_ort_decode']:.2f}x"})
    return format_table(table, list(max(table, key=len)))


class OnnxRuntimeGeneration:
    """The same prefill + greedy decode through an onnxruntime session (the reference): one
    :meth:`run` = one fresh generation, its seconds and tokens."""

    def __init__(self, onnx_path, model_cfg: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.layers = int(model_cfg["num_layers"])
        self.kv = (1, int(model_cfg["num_kv_heads"]), 0, int(model_cfg["head_dim"]))

    def _step(self, ids, past, length):
        n = len(ids)
        feeds = {"input_ids": np.array([ids], "int64"),
                 "attention_mask": np.ones((1, length + n), "int64"),
                 "position_ids": np.arange(length, length + n, dtype="int64")[None]}
        feeds.update(zip(self.names[3:], past))
        out = self.sess.run(None, {k: v for k, v in feeds.items() if k in self.names})
        return out[0][0, -1], out[1:]

    def run(self, prompt_ids: list[int], decode_tokens: int,
            clock=time.perf_counter) -> tuple[list, float, float]:
        """(greedy tokens, prefill seconds, seconds of the ``decode_tokens`` decode steps)."""
        past = [np.zeros(self.kv, "float32") for _ in range(2 * self.layers)]
        t0 = clock()
        logits, past = self._step(prompt_ids, past, 0)
        prefill = clock() - t0
        length = len(prompt_ids)
        token = int(np.argmax(logits))
        tokens = [token]
        t1 = clock()
        for _ in range(decode_tokens):
            logits, past = self._step([token], past, length)
            length += 1
            token = int(np.argmax(logits))
            tokens.append(token)
        return tokens, prefill, clock() - t1


def bench_onnxruntime(onnx_path, model_cfg: dict, prompt_ids: list[int], decode_tokens: int,
                      repeats: int = 3, threads: int | None = None) -> dict:
    ort = OnnxRuntimeGeneration(onnx_path, model_cfg, threads)
    runs = [ort.run(prompt_ids, decode_tokens) for _ in range(repeats + 1)][1:]  # 1st: warm-up
    return _row(len(prompt_ids), decode_tokens, [r[1] for r in runs], [r[2] for r in runs], None)


def bench_side_by_side(engines: dict, ort: "OnnxRuntimeGeneration | None", prompt_len: int,
                       decode_tokens: int = 32, repeats: int = 3, progress=None,
                       clock=None) -> list[dict]:
    """``tvm-lite bench``: every build (``{"label": engine}``) and onnxruntime on the same real-text
    prompt, their generations interleaved (build A, build B, onnxruntime, A, B, ...: a machine
    that other work slows, slows them alike), after one warm-up round; per row the medians with
    their spread, the greedy tokens, and each repeat's speed relative to onnxruntime's in the
    same round (``vs_ort_prefill``/``vs_ort_decode``: the medians of those ratios).

    ``clock=time.process_time`` times every call in CPU seconds of this process: with one thread
    per engine (``TVM_NUM_THREADS=1``, onnxruntime's ``threads=1``) the time other jobs take the
    cores from this one does not count (their memory traffic still does)."""
    ids = prompt_ids(next(iter(engines.values())), prompt_len)
    for engine in engines.values():
        if prompt_len + decode_tokens > engine.max_context:
            raise ValueError(f"prompt {prompt_len} + decode {decode_tokens} tokens exceeds the "
                             f"model's context ({engine.max_context})")
    labels = list(engines) + ([ORT] if ort is not None else [])
    seconds = {k: ([], []) for k in labels}
    tokens = {}
    for r in range(repeats + 1):  # round 0 warms up
        if progress and r:
            progress(f"prompt {prompt_len}: round {r}/{repeats}")
        for label in labels:
            if label == ORT:
                out, pre, dec = ort.run(ids, decode_tokens, clock or time.perf_counter)
            else:
                engine = engines[label]
                out, secs = generate_tokens(engine, engine.new_session(), ids, decode_tokens,
                                            clock)
                pre, dec = secs[0], sum(secs[1:])
            if r:
                seconds[label][0].append(pre)
                seconds[label][1].append(dec)
                if tokens.setdefault(label, out) != out:
                    raise RuntimeError(f"{label}: round {r} generated other greedy tokens than "
                                       f"round 1 ({out[:8]}... vs {tokens[label][:8]}...)")
    rows = []
    for label in labels:
        pre, dec = seconds[label]
        row = {"engine": label, **_row(prompt_len, decode_tokens, pre, dec, tokens[label])}
        if ort is not None:  # per round: the same round's onnxruntime seconds over this row's
            opre, odec = seconds[ORT]
            row["vs_ort_prefill"] = float(np.median([o / t for o, t in zip(opre, pre)]))
            row["vs_ort_decode"] = float(np.median([o / t for o, t in zip(odec, dec)]))
            row["tokens_as_ort"] = tokens[label] == tokens[ORT]
        rows.append(row)
    return rows


ORT = "onnxruntime (CPU)"


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    line = "| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def bench_kv_cache(engines: dict, contexts=(128, 512, 2048), decode_tokens: int = 16,
                   progress=print) -> list[dict]:
    """Decode speed at growing contexts for each KV-cache path (``{"inplace": engine, "copy":
    engine}``), in one run.

    One session per path is prefilled with real text up to each context in turn (the same session
    continues, so the cache really holds that many tokens), then decodes ``decode_tokens`` greedy
    tokens; a row gives the median step's tok/s and the KV bytes the engine copied per step.
    """
    rows = []
    for mode, engine in engines.items():
        text = prompt_ids(engine, max(contexts))
        cursor = 0
        session = engine.new_session()
        for context in contexts:
            need = max(context - 1 - session.length, 1)  # the first step brings it to `context`
            progress(f"{mode}: prefill {need} tokens to reach {context}")
            steps, copied = [], []
            loop = engine.tokens(session, text[cursor:cursor + need], chunk_size=512)
            cursor += need
            next(loop)  # the prefill
            for _ in range(decode_tokens):
                steps.append(next(loop).seconds)
                copied.append(session.last_step_kv_bytes_copied)
            loop.close()
            rows.append({"context": context, "kv_cache": mode,
                         "decode_tok_s": 1.0 / float(np.median(steps)),
                         "kv_bytes_copied_per_step": int(np.median(copied)),
                         "kv_MB_at_max_context": engine.kv_cache_bytes() / 1e6})
    return rows


def bench_interleaved(engines: dict, prefill_lens=(128, 256), contexts=(128, 512, 1024),
                      decode_tokens: int = 16, repeats: int = 5) -> list[dict]:
    """Prefill and decode speed of several builds of one model (``{"label": engine}``), their
    steps interleaved (A, B, A, B...) so that a busy machine slows them alike; medians.

    Prefill: ``prefill_lens`` tokens of real text into an empty cache, ``repeats`` times. Decode:
    one session per engine grows through ``contexts`` (prefilled with real text), then
    ``decode_tokens`` greedy steps each."""
    text = prompt_ids(next(iter(engines.values())), max(max(contexts), max(prefill_lens)))
    rows = []
    for n in prefill_lens:
        times: dict = {k: [] for k in engines}
        for _ in range(repeats):
            for label, engine in engines.items():
                times[label].append(next(engine.tokens(engine.new_session(), text[:n])).seconds)
        rows += [{"phase": f"prefill {n}", "build": k, "tok_s": n / float(np.median(t))}
                 for k, t in times.items()]
    sessions = {k: e.new_session() for k, e in engines.items()}
    for context in contexts:
        loops = {}
        for label, engine in engines.items():  # (untimed) prefill up to the context
            session = sessions[label]
            need = max(context - 1 - session.length, 1)
            loops[label] = engine.tokens(session, text[session.length:session.length + need])
            next(loops[label])
        times = {k: [] for k in engines}
        for _ in range(decode_tokens):
            for label in engines:
                times[label].append(next(loops[label]).seconds)
        rows += [{"phase": f"decode @ {context}", "build": k, "tok_s": 1.0 / float(np.median(t))}
                 for k, t in times.items()]
    return rows
