"""The generation loop over a compiled artifact: prefill, then decode.

Runs in a runtime-only TVM process (``TVM_USE_RUNTIME_LIB=1``): it imports ``tvm.runtime`` only.

The KV cache here still round-trips through the model's ``past``/``present`` tensors: every step
the model concatenates the whole past with the new rows into fresh ``present`` tensors. The engine
counts those bytes (``Session.kv_bytes_copied``) so the in-place KV cache can show the saving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from .artifact import LIBRARY, PARAMS, load_manifest
from .tokenizer import Tokenizer


class ContextLengthError(ValueError):
    """A prompt that does not fit in the context window; nothing was run."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple | None = None  # default: the model's


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "context"
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tok_s(self) -> float:
        steps = self.decode_steps  # the first new token comes from prefill
        return steps / self.decode_seconds if self.decode_seconds and steps else float("nan")


@dataclass
class Session:
    """One conversation's state: the KV tensors and the tokens they hold."""

    past: list
    length: int = 0
    tokens: list = field(default_factory=list)
    kv_bytes_copied: int = 0  # total, over all steps
    last_step_kv_bytes_copied: int = 0


def _device(name: str):
    kind, _, index = name.partition(":")
    return tvm.device(kind, int(index or 0))


class Engine:
    """Load an artifact and generate text with it."""

    def __init__(self, artifact, device="cpu", max_context: int | None = None, *, module=None):
        self.path = Path(artifact)
        self.manifest = load_manifest(self.path)
        self.model = self.manifest.get("model", {})
        # [rpc] ``device`` may be a tvm.runtime.Device, an RPC session's included, and ``module``
        # the artifact's library already loaded (``remote.load_module``): see tvm_lite.rpc.
        self.dev = _device(device) if isinstance(device, str) else device
        lib = module if module is not None else tvm.runtime.load_module(str(self.path / LIBRARY))
        self.vm = VirtualMachine(lib, self.dev)
        self._main = self.vm["main"]
        # [rpc] builds with a tuning database add a ``decode`` function: main with seq = 1,
        # whose static-shape kernels are the ones MetaSchedule tuned.
        self._entry_decode = "decode" if self.manifest.get("options", {}).get("decode_function") \
            else "main"
        self.unpack = None  # [rpc] set by tvm_lite.rpc.remote_engine
        with np.load(self.path / PARAMS) as weights:
            self.params = [tvm.runtime.tensor(weights[f"p{i}"], self.dev)
                           for i in range(len(weights.files))]
        self.tokenizer = Tokenizer(self.path, self.model.get("chat_template"),
                                   self.model.get("bos_token_id"))
        self.num_layers = int(self.model["num_layers"])
        self.kv_shape = (1, int(self.model["num_kv_heads"]), 0, int(self.model["head_dim"]))
        self.kv_dtype = self.model.get("dtype", "float32")
        limit = int(self.model.get("max_context", 2048))
        self.max_context = min(max_context, limit) if max_context else limit
        self.stop_token_ids = tuple(self.model.get("stop_token_ids", ()))

    # -- the model, one call ----------------------------------------------------------------------
    def new_session(self) -> Session:
        empty = np.zeros(self.kv_shape, self.kv_dtype)
        return Session(past=[tvm.runtime.tensor(empty, self.dev) for _ in range(2 * self.num_layers)])

    def _call(self, name: str, args: list):
        out = (self._main if name == "main" else self.vm[name])(*args)
        # [rpc] a remote VM's output tuple arrives as a handle; tvm_lite.rpc sets ``unpack``
        return self.unpack(out) if self.unpack is not None else out

    def _last_row(self, logits, n: int) -> np.ndarray:
        """[rpc] logits[0, n-1] without copying the other rows to the host (200 MB for 1024
        tokens of a 49k vocabulary: what an RPC link would otherwise carry per prefill)."""
        vocab, dtype = int(logits.shape[-1]), str(logits.dtype)
        row = logits._create_view((1, vocab), dtype,
                                  relative_byte_offset=(n - 1) * vocab * np.dtype(dtype).itemsize)
        # copied on the device first: an RPC copy to the host ignores a view's offset
        dst = tvm.runtime.empty((1, vocab), dtype, self.dev)
        row.copyto(dst)
        return dst.numpy()

    def forward(self, session: Session, ids, last_only: bool = False) -> np.ndarray:
        """Run ``ids`` through the model after ``session``'s tokens; return the logits of every
        position ([n, vocab]), or of the last one only ([1, vocab]), and advance the session."""
        ids = np.asarray(ids, dtype="int64").reshape(1, -1)
        n = ids.shape[1]
        if session.length + n > self.max_context:
            raise ContextLengthError(
                f"{session.length} tokens in the session + {n} new tokens = {session.length + n} "
                f"exceeds max_context={self.max_context}")
        total = session.length + n
        mask = np.ones((1, total), "int64")
        pos = np.arange(session.length, total, dtype="int64")[None]
        args = [tvm.runtime.tensor(a, self.dev) for a in (ids, mask, pos)]
        out = self._call(self._entry_decode if n == 1 else "main",
                         [*args, *session.past, *self.params])
        # present -> past: the model has copied every past row into the new present tensors.
        copied = sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in session.past)
        session.past = [out[i] for i in range(1, 2 * self.num_layers + 1)]
        session.last_step_kv_bytes_copied = copied
        session.kv_bytes_copied += copied
        session.length = total
        session.tokens.extend(int(t) for t in ids[0])
        return self._last_row(out[0], n) if last_only else out[0].numpy()[0]

    def prefill(self, session: Session, ids, chunk_size: int | None = None) -> np.ndarray:
        """Feed a prompt (in chunks of ``chunk_size`` tokens); return the last position's logits."""
        ids = list(ids)
        if session.length + len(ids) > self.max_context:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens after {session.length} in the session exceeds "
                f"max_context={self.max_context}")
        step = chunk_size or len(ids)
        logits = None
        for start in range(0, len(ids), step):
            logits = self.forward(session, ids[start:start + step], last_only=True)
        return logits[-1]

    # -- generation -------------------------------------------------------------------------------
    def encode_prompt(self, prompt, chat: bool = True) -> list[int]:
        if isinstance(prompt, list):  # chat messages
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt))
        if chat and self.tokenizer.chat_template:
            return self.tokenizer.encode(
                self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        return self.tokenizer.encode(prompt)

    @staticmethod
    def _sample(logits: np.ndarray, cfg: GenerationConfig, rng) -> int:
        if cfg.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype("float64") / cfg.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < cfg.top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(rng.choice(len(probs), p=probs))

    def stream(self, prompt, config: GenerationConfig | None = None, chat: bool = True,
               session: Session | None = None, chunk_size: int | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece; the final GenerationResult is ``self.last``."""
        cfg = config or GenerationConfig()
        stops = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else self.stop_token_ids)
        rng = np.random.default_rng(cfg.seed)
        session = session or self.new_session()
        prompt_ids = self.encode_prompt(prompt, chat) if not isinstance(prompt, np.ndarray) else list(prompt)
        t0 = time.perf_counter()
        logits = self.prefill(session, prompt_ids, chunk_size)
        t_prefill = time.perf_counter() - t0
        new: list[int] = []
        text = ""
        reason = "length"
        steps = 0
        t_decode = 0.0
        while True:
            token = self._sample(logits, cfg, rng)
            if token in stops:
                reason = "stop"
                break
            new.append(token)
            full = self.tokenizer.decode(new)
            if len(full) > len(text) and not full.endswith("\ufffd"):
                yield full[len(text):]
                text = full
            if len(new) >= cfg.max_new_tokens:
                break
            if session.length + 1 > self.max_context:
                reason = "context"
                break
            t1 = time.perf_counter()
            logits = self.forward(session, [token])[-1]
            t_decode += time.perf_counter() - t1
            steps += 1
        self.last = GenerationResult(self.tokenizer.decode(new), new, len(prompt_ids), reason,
                                     t_prefill, t_decode, steps)

    def generate(self, prompt, config: GenerationConfig | None = None, **kwargs) -> GenerationResult:
        for _ in self.stream(prompt, config, **kwargs):
            pass
        return self.last
