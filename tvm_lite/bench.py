"""``tvm-lite bench``: import/compile time and prefill/decode speed, next to onnxruntime.

Both engines run the same ONNX file with the same loop (prefill a prompt of N tokens, then greedy
decode M tokens feeding present -> past), in the same process, so the ratio is meaningful.
"""

from __future__ import annotations

import time

import numpy as np


def _prompt_ids(engine, n: int) -> list[int]:
    """A real-text prompt of exactly ``n`` tokens (English prose shipped with CPython)."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    ids = engine.tokenizer.encode(text)
    return ids[:n]


def bench_tvm(engine, prompt_len: int, decode_tokens: int, repeats: int = 3) -> dict:
    ids = _prompt_ids(engine, prompt_len)
    prefill, decode = [], []
    for _ in range(repeats):
        session = engine.new_session()
        t0 = time.perf_counter()
        logits = engine.prefill(session, ids)
        prefill.append(time.perf_counter() - t0)
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            token = int(np.argmax(engine.forward(session, [token])[-1]))
        decode.append(time.perf_counter() - t1)
    return {"prefill_tok_s": prompt_len / float(np.median(prefill)),
            "decode_tok_s": decode_tokens / float(np.median(decode))}


def bench_onnxruntime(onnx_path, model_cfg: dict, prompt_ids: list[int], decode_tokens: int,
                      repeats: int = 3, threads: int | None = None) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    layers = int(model_cfg["num_layers"])
    kv = (1, int(model_cfg["num_kv_heads"]), 0, int(model_cfg["head_dim"]))

    def step(ids, past, length):
        n = len(ids)
        feeds = {"input_ids": np.array([ids], "int64"),
                 "attention_mask": np.ones((1, length + n), "int64"),
                 "position_ids": np.arange(length, length + n, dtype="int64")[None]}
        feeds.update(zip(names[3:], past))
        out = sess.run(None, {k: v for k, v in feeds.items() if k in names})
        return out[0][0, -1], out[1:]

    prefill, decode = [], []
    for _ in range(repeats):
        past = [np.zeros(kv, "float32") for _ in range(2 * layers)]
        t0 = time.perf_counter()
        logits, past = step(prompt_ids, past, 0)
        prefill.append(time.perf_counter() - t0)
        length = len(prompt_ids)
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            logits, past = step([token], past, length)
            length += 1
            token = int(np.argmax(logits))
        decode.append(time.perf_counter() - t1)
    return {"prefill_tok_s": len(prompt_ids) / float(np.median(prefill)),
            "decode_tok_s": decode_tokens / float(np.median(decode))}


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
        text = _prompt_ids(engine, max(contexts))
        cursor = 0
        session = engine.new_session()
        token = text[0]
        for context in contexts:
            need = context - 1 - session.length  # the first decode step brings it to `context`
            if need > 0:
                progress(f"{mode}: prefill {need} tokens to reach {context}")
                logits = engine.prefill(session, text[cursor:cursor + need], chunk_size=512)
                cursor += need
                token = int(np.argmax(logits))
            steps, copied = [], []
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                logits = engine.forward(session, [token])[-1]
                steps.append(time.perf_counter() - t0)
                copied.append(session.last_step_kv_bytes_copied)
                token = int(np.argmax(logits))
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
    text = _prompt_ids(next(iter(engines.values())), max(max(contexts), max(prefill_lens)))
    rows = []
    for n in prefill_lens:
        times: dict = {k: [] for k in engines}
        for _ in range(repeats):
            for label, engine in engines.items():
                session = engine.new_session()
                t0 = time.perf_counter()
                engine.prefill(session, text[:n])
                times[label].append(time.perf_counter() - t0)
        rows += [{"phase": f"prefill {n}", "build": k, "tok_s": n / float(np.median(t))}
                 for k, t in times.items()]
    sessions = {k: e.new_session() for k, e in engines.items()}
    for context in contexts:
        tokens = {}
        for label, engine in engines.items():
            session = sessions[label]
            need = context - 1 - session.length
            if need > 0:
                engine.prefill(session, text[session.length:session.length + need])
            tokens[label] = text[context - 1]
        times = {k: [] for k in engines}
        for _ in range(decode_tokens):
            for label, engine in engines.items():
                t0 = time.perf_counter()
                logits = engine.forward(sessions[label], [tokens[label]])[-1]
                times[label].append(time.perf_counter() - t0)
                tokens[label] = int(np.argmax(logits))
        rows += [{"phase": f"decode @ {context}", "build": k, "tok_s": 1.0 / float(np.median(t))}
                 for k, t in times.items()]
    return rows
