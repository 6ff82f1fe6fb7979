"""The generation loop over a compiled artifact: prefill, then decode.

Runs in a runtime-only TVM process (``TVM_USE_RUNTIME_LIB=1``): it imports ``tvm.runtime`` only.

Two KV-cache conventions, chosen at compile time (``manifest["options"]["kv_cache"]``):

* ``inplace`` (default): the model takes one ``(max_context, kv_heads, head_dim)`` cache per layer
  and K/V, allocated once per session, plus the write offset ``past_len``; it writes the new rows in
  place and returns only the logits (``relax_passes/inplace_kv_cache.py``). Nothing is copied
  between steps.
* ``copy``: the exported past/present interface. Every step the model concatenates the whole past
  with the new rows into fresh ``present`` tensors, which become the next step's past.

``Session.kv_bytes_copied`` counts the KV bytes the present -> past round trip copies (0 in place),
and ``Engine.kv_cache_bytes`` the KV memory each convention holds.

Over TVM RPC (``tvm_lite.rpc.remote_engine``) an in-place artifact keeps its caches and workspace
buffers on the server, in tuples that the model's ``alloc_kv_caches``/``alloc_workspace`` return,
and calls ``prefill_tupled``/``decode_tupled`` with those tuples (a remote function receives
tensor arguments as raw ``DLTensor*``, which the cache and workspace views cannot take; a tuple
returned by the server crosses back as the object itself:
``relax_passes/add_tupled_buffer_entries.py``). The weights live there in one tuple too
(``alloc_params``, filled once per engine): a step passes a handful of arguments, not one more
per weight.

Greedy generation of an in-place artifact takes one call per step (``prefill_greedy``,
``decode_greedy``): the model's ``prefill_step``/``decode_step`` build the ids, mask and positions
on the device from a shape of integers, run the decoder and return the argmax of the last real
row as an integer (``relax_passes/add_step_entries.py``), so no logits leave the device. Sampling
with a temperature (and ``forward``) reads the logits back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from .artifact import LIBRARY, MANIFEST, PARAMS, load_manifest
from .tokenizer import Tokenizer


DEFAULT_BUCKETS = (16, 32, 64, 128, 256)  # prefill calls are padded up to one of these


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
    """One conversation's state: the KV tensors and the tokens they hold.

    ``past``: the caches (in place: allocated once at ``max_context`` rows and written in place;
    copy: the last step's presents; in place over RPC: the handle of the server-side tuple that
    holds them). ``length``: the tokens they hold (the next write offset).
    """

    past: list  # (or, in place over RPC, a tvm.runtime.RPCObjectRef to a tuple of the caches)
    length: int = 0
    tokens: list = field(default_factory=list)
    kv_bytes_copied: int = 0  # total, over all steps
    last_step_kv_bytes_copied: int = 0
    last_call: tuple = ()  # (function, padded token count) of the last in-place call
    past_tuple: object = None  # locally, ``past`` as one ffi.Array for the *_step entries


def _device(name: str):
    kind, _, index = name.partition(":")
    return tvm.device(kind, int(index or 0))


class Engine:
    """Load an artifact and generate text with it."""

    def __init__(self, artifact, device="cpu", max_context: int | None = None,
                 buckets=DEFAULT_BUCKETS, prefill_chunk: int | None = None, *, module=None,
                 gpu_slice: int | None = None, priority: str = "normal", session=None):
        """``buckets``: the token counts a prefill call is padded up to (``None``/``()``: no
        padding); ``prefill_chunk``: the most tokens one prefill call takes (default: the largest
        bucket, or 256). In-place artifacts only: the copy path neither pads nor chunks.
        ``device``: "cpu", "cuda:0"... or a ``tvm.runtime.Device`` (an RPC session's too), and
        ``module`` the artifact's library already loaded there, ``session`` the RPC session it is
        in (``tvm_lite.rpc.remote_engine`` passes all three).
        Against UI lag on phones (``tvm_lite/gpu_slice.py``): ``gpu_slice`` = at most this many
        kernels between two flushes of the device queue during prefill (None: no slicing), and
        ``priority="low"`` asks for a low-priority queue where the runtime allows it."""
        self.path = Path(artifact)
        if module is None and not (self.path / MANIFEST).exists():
            # an ONNX file / export folder / .gguf / HF folder: compiled (cached) for the device
            from .artifact import compile_model

            self.path = compile_model(self.path, "cuda" if str(device).startswith("cuda") else "llvm")
        self.manifest = load_manifest(self.path)
        self.model = self.manifest.get("model", {})
        self.dev = _device(device) if isinstance(device, str) else device
        lib = module if module is not None else tvm.runtime.load_module(str(self.path / LIBRARY))
        self.vm = VirtualMachine(lib, self.dev)
        options = self.manifest.get("options", {})
        self.kv_mode = options.get("kv_cache", "copy")
        self.split = self.kv_mode == "inplace"  # in-place decoders come as prefill + decode
        self.arena = self.split and options.get("memory_plan") == "arena"
        # a past/present build with a tuning database also has ``decode`` (main with one token)
        self._copy_decode = "decode" if options.get("decode_function") else "main"
        # how a call's shapes and outputs cross to the VM: by value here, through the link over RPC
        self.unpack = None
        self._make_shape = lambda values: tvm.runtime.ShapeTuple(values)
        self._read_shape = lambda shape: [int(v) for v in shape]
        if session is not None:
            from tvm_lite.rpc.remote import remote_calls

            self.unpack, self._make_shape, self._read_shape = remote_calls(session)
        # in place over RPC: caches and workspaces live in server-side tuples (see the module doc)
        self.tupled = self.split and session is not None
        if self.tupled:
            from tvm_lite.rpc.remote import check_tupled_entries

            check_tupled_entries(self.vm, self.path)
        from .gpu_slice import GpuSlicer, set_priority

        GpuSlicer(self.dev, gpu_slice)  # validates the option
        self.gpu_slice = gpu_slice
        self.slice_record = None  # a gpu_slice.Submissions to record prefill submissions into
        self.priority, self.sync = set_priority(self.dev, priority)
        # ``params``: the weights as tensors on the device; ``param_args``: what a call passes for
        # them (the same list, or over RPC one server-side tuple that holds them)
        self.params_tupled = self.tupled and self.vm.module.implements_function("alloc_params")
        with np.load(self.path / PARAMS) as weights:  # one weight in host memory at a time
            count = len(weights.files)
            arrays = (weights[f"p{i}"] for i in range(count))
            if self.params_tupled:
                self.params, self.param_args = self._upload_params_tuple(arrays, count)
            else:  # locally; over RPC a copy build, or an in-place one built before alloc_params
                self.params = [tvm.runtime.tensor(w, self.dev) for w in arrays]
                self.param_args = self.params
        self.last_call_args = 0  # arguments the last call of the model passed
        self._functions = {}  # the VM's functions by name (over RPC a lookup is a round trip)
        # one call per greedy step, ints in and the token out (relax_passes/add_step_entries.py)
        self.steps = self.split and all(self.vm.module.implements_function(f)
                                        for f in ("prefill_step", "decode_step"))
        self._weights_tupled = self.split and self.vm.module.implements_function("alloc_params")
        self.tokenizer = Tokenizer(self.path, self.model.get("chat_template"),
                                   self.model.get("bos_token_id"))
        self.num_layers = int(self.model["num_layers"])
        self.kv_heads, self.head_dim = int(self.model["num_kv_heads"]), int(self.model["head_dim"])
        self.kv_dtype = self.model.get("dtype", "float32")
        limit = int(self.model.get("max_context", 2048))
        self.max_context = min(max_context, limit) if max_context else limit
        self.buckets = tuple(sorted(buckets)) if (buckets and self.split) else ()
        self.prefill_chunk = (prefill_chunk or (self.buckets[-1] if self.buckets else 256)) \
            if self.split else None
        if self.buckets and self.prefill_chunk > self.buckets[-1]:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} exceeds the largest bucket "
                             f"{self.buckets[-1]}")
        self.workspace = self._allocate_workspace() if self.arena else {}
        # locally, the workspace and weights as the *_step entries take them (ffi.Array tuples;
        # over RPC they are server-side tuples already)
        self._local_tuples = []
        if self.steps and not self.tupled:
            buffers = getattr(self, "_workspace_buffers", [])
            self._local_tuples = [tvm.runtime.convert(buffers)] if buffers else []
            self._local_tuples += [tvm.runtime.convert(self.params)] if self._weights_tupled \
                else list(self.params)
        self.stop_token_ids = tuple(self.model.get("stop_token_ids", ()))

    def _upload_params_tuple(self, arrays, count: int) -> tuple[list, list]:
        """Over RPC: the weights in one tuple on the server, made by the model's ``alloc_params``
        (empty tensors of the weights' types) and filled here, one upload per weight, once. Each
        step then passes the tuple's handle instead of one argument per weight (every argument
        of a remote call crosses the link at every call)."""
        packed = self.vm["alloc_params"]()
        tensors = self.unpack(packed)
        if len(tensors) != count:
            raise ValueError(f"{self.path}: the model's alloc_params makes {len(tensors)} weights, "
                             f"{PARAMS} holds {count}")
        for dst, src in zip(tensors, arrays):
            dst.copyfrom(src)
        return tensors, [packed]

    # -- the model, one call ----------------------------------------------------------------------
    # -- activation memory: allocated once (relax_passes/plan_symbolic_arena.py) ----------------
    def workspace_bytes(self, function: str, tokens: int, past: int) -> list[int]:
        """The planned bytes of each workspace buffer of ``function`` for a call with ``tokens``
        new tokens after ``past`` cached ones (computed by the compiled model itself)."""
        size_of = self.vm[f"{function}_workspace_bytes"]
        ids = tvm.runtime.empty((1, tokens), "int64", self.dev)
        mask = tvm.runtime.empty((1, past + tokens), "int64", self.dev)
        empty = [tvm.runtime.empty((0, self.kv_heads, self.head_dim), self.kv_dtype, self.dev)
                 for _ in range(2 * self.num_layers)]  # only their shapes' types are checked
        return self._read_shape(size_of(ids, mask, ids, self._make_shape([past]), *empty))

    def _allocate_workspace(self) -> dict:
        """One set of buffers for both functions (they never run at once), sized for the largest
        call: every size is a product of dims, so it grows with tokens and past alike."""
        need = {"decode": self.workspace_bytes("decode", 1, self.max_context),
                "prefill": self.workspace_bytes("prefill", self.prefill_chunk, self.max_context)}
        count = max(len(v) for v in need.values())
        sizes = [max(v[i] if i < len(v) else 0 for v in need.values()) for i in range(count)]
        self.workspace_total_bytes = sum(sizes)
        if self.tupled:  # one tuple on the server; each function unpacks the buffers it has
            if not count:
                return {}
            buffers = self.vm["alloc_workspace"](self._make_shape([max(s, 1) for s in sizes]))
            return {name: [buffers] for name in need}
        buffers = [tvm.runtime.empty((max(size, 1),), "uint8", self.dev) for size in sizes]
        self._workspace_buffers = buffers
        return {name: buffers[:len(v)] for name, v in need.items()}

    def kv_cache_bytes(self, context: int | None = None) -> int:
        """KV memory a session holds at ``context`` tokens (default ``max_context``): one cache
        instance in place; during a copy-path step, the past and the present are both alive."""
        context = self.max_context if context is None else context
        one = 2 * self.num_layers * context * self.kv_heads * self.head_dim \
            * np.dtype(self.kv_dtype).itemsize
        return one if self.kv_mode == "inplace" else 2 * one

    def new_session(self) -> Session:
        if self.tupled:  # the same allocation, made on the server and kept there as a tuple
            return Session(past=self.vm["alloc_kv_caches"](self._make_shape([self.max_context])))
        if self.kv_mode == "inplace":  # the one allocation of the session's KV memory
            shape = (self.max_context, self.kv_heads, self.head_dim)
        else:
            shape = (1, self.kv_heads, 0, self.head_dim)
        return Session(past=[tvm.runtime.empty(shape, self.kv_dtype, self.dev)
                             for _ in range(2 * self.num_layers)])

    def padded_length(self, n: int, past: int) -> int:
        """The bucket ``n`` new tokens are padded to (``n`` itself without buckets, for decode, or
        when the bucket would not fit in the cache)."""
        if n == 1 or not self.buckets:
            return n
        bucket = next((b for b in self.buckets if b >= n), n)
        return bucket if past + bucket <= self.max_context else n

    def _function(self, name: str):
        if name not in self._functions:
            self._functions[name] = self.vm[name]
        return self._functions[name]

    def _call(self, function: str, args: list):
        self.last_call_args = len(args)
        if not function.startswith("decode") and (self.gpu_slice is not None
                                                  or self.slice_record is not None):
            from .gpu_slice import GpuSlicer

            slicer = GpuSlicer(self.dev, self.gpu_slice, self.sync)
            out = slicer.run(self.vm, lambda: self.vm[function](*args))
            if self.slice_record is not None:
                self.slice_record.seconds += slicer.record.seconds
                self.slice_record.kernels += slicer.record.kernels
        else:
            out = self._function(function)(*args)
        # over RPC, a remote VM's output tuple arrives as a handle (see tvm_lite.rpc.remote); the
        # step entries return an int, which crosses by value
        if self.unpack is None or isinstance(out, int):
            return out
        return self.unpack(out)

    def _last_row(self, logits, n: int) -> np.ndarray:
        """logits[0, n-1] as [1, vocab], without copying the other rows to the host (200 MB for
        1024 tokens of a 49k vocabulary: what an RPC link would otherwise carry per prefill)."""
        vocab, dtype = int(logits.shape[-1]), str(logits.dtype)
        row = logits._create_view((1, vocab), dtype,
                                  relative_byte_offset=(n - 1) * vocab * np.dtype(dtype).itemsize)
        # copied on the device first: an RPC copy to the host ignores a view's offset
        dst = tvm.runtime.empty((1, vocab), dtype, self.dev)
        row.copyto(dst)
        return dst.numpy()

    def forward(self, session: Session, ids, last_only: bool = False) -> np.ndarray:
        """Run ``ids`` through the model after ``session``'s tokens; return the logits of every
        position ([n, vocab]), or of the last one only ([1, vocab]), and advance the session.

        In place, one new token runs ``decode``; more run ``prefill``, padded up to a bucket: the
        padding sits after the real tokens with attention mask 0, so causal attention keeps it
        out of every real position, and its K/V rows (past the session's length) are overwritten
        by the next tokens."""
        ids = np.asarray(ids, dtype="int64").reshape(1, -1)
        n = ids.shape[1]
        self._check_room(session, n)
        if self.prefill_chunk and n > self.prefill_chunk:
            raise ValueError(f"forward takes at most prefill_chunk={self.prefill_chunk} tokens, got "
                             f"{n}: use prefill(), which chunks")
        if self.kv_mode == "inplace":
            padded = self.padded_length(n, session.length)
            total = session.length + padded
            mask = np.zeros((1, total), "int64")
            mask[0, :session.length + n] = 1
            pos = np.arange(session.length, total, dtype="int64")[None]
            ids = np.pad(ids, ((0, 0), (0, padded - n)))
            args = [tvm.runtime.tensor(a, self.dev) for a in (ids, mask, pos)]
            function = "decode" if padded == 1 else "prefill"
            # the model writes rows [length, total) of each cache in place
            caches = [session.past] if self.tupled else session.past
            out = self._call(function + "_tupled" if self.tupled else function,
                             [*args, self._make_shape([session.length]), *caches,
                              *self.workspace.get(function, ()), *self.param_args])
            session.last_call = (function, padded)
            copied = 0
            total = session.length + n
        else:
            total = session.length + n
            mask = np.ones((1, total), "int64")
            pos = np.arange(session.length, total, dtype="int64")[None]
            args = [tvm.runtime.tensor(a, self.dev) for a in (ids, mask, pos)]
            out = self._call(self._copy_decode if n == 1 else "main",
                             [*args, *session.past, *self.params])
            # present -> past: the model has copied every past row into the new present tensors.
            copied = sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize
                         for p in session.past)
            session.past = [out[i] for i in range(1, 2 * self.num_layers + 1)]
        session.last_step_kv_bytes_copied = copied
        session.kv_bytes_copied += copied
        session.tokens.extend(int(t) for t in ids[0, :n])
        session.length = total
        return self._last_row(out[0], n) if last_only else out[0].numpy()[0, :n]

    # -- greedy steps: one call each, the token computed on the device -------------------------
    def _tuple_args(self, session: Session) -> list:
        """The caches, workspace and weights as the ``*_tupled``/``*_step`` entries take them: the
        server-side tuples over RPC, ``ffi.Array``s of the engine's own buffers locally."""
        if self.tupled:
            return [session.past, *self.workspace.get("decode", ()), *self.param_args]
        if session.past_tuple is None:
            session.past_tuple = tvm.runtime.convert(list(session.past))
        return [session.past_tuple, *self._local_tuples]

    def _check_room(self, session: Session, n: int) -> None:
        if session.length + n > self.max_context:
            raise ContextLengthError(
                f"{session.length} tokens in the session + {n} new tokens = {session.length + n} "
                f"exceeds max_context={self.max_context}")

    def decode_greedy(self, session: Session, token: int) -> int:
        """Feed one token; return the greedy next token. Needs ``self.steps``: one call of the
        model's ``decode_step`` (ids, mask and positions made on the device, the argmax taken
        there, one integer back), so over RPC a step is two round trips and moves no logits."""
        self._check_room(session, 1)
        args = [self._make_shape([int(token), session.length]), *self._tuple_args(session)]
        nxt = int(self._call("decode_step", args))
        session.last_call = ("decode", 1)
        session.last_step_kv_bytes_copied = 0
        session.tokens.append(int(token))
        session.length += 1
        return nxt

    def prefill_greedy(self, session: Session, ids, chunk_size: int | None = None) -> int:
        """``prefill`` that returns the greedy next token instead of the logits (``self.steps``:
        each chunk is one ``prefill_step`` call, padded to a bucket as ``forward`` pads)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("prefill_greedy needs at least one token")
        self._check_room(session, len(ids))
        step = min(chunk_size or len(ids), self.prefill_chunk or len(ids))
        nxt = None
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            n = len(chunk)
            padded = self.padded_length(n, session.length)
            if padded == 1:
                nxt = self.decode_greedy(session, chunk[0])
                continue
            tokens = tvm.runtime.tensor(np.array([chunk + [0] * (padded - n)], "int64"), self.dev)
            args = [tokens, self._make_shape([session.length, n]), *self._tuple_args(session)]
            nxt = int(self._call("prefill_step", args))  # (sliced, as prefill is, if asked)
            session.last_call = ("prefill", padded)
            session.last_step_kv_bytes_copied = 0
            session.tokens.extend(chunk)
            session.length += n
        return nxt

    def prefill(self, session: Session, ids, chunk_size: int | None = None) -> np.ndarray:
        """Feed a prompt (in chunks of ``chunk_size`` tokens); return the last position's logits."""
        ids = list(ids)
        if session.length + len(ids) > self.max_context:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens after {session.length} in the session exceeds "
                f"max_context={self.max_context}")
        step = min(chunk_size or len(ids), self.prefill_chunk or len(ids))
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
        # greedy with step entries: the token comes back from the device, never the logits
        greedy = cfg.temperature <= 0 and self.steps
        t0 = time.perf_counter()
        if greedy:
            token = self.prefill_greedy(session, prompt_ids, chunk_size)
        else:
            logits = self.prefill(session, prompt_ids, chunk_size)
        t_prefill = time.perf_counter() - t0
        new: list[int] = []
        text = ""
        reason = "length"
        steps = 0
        t_decode = 0.0
        while True:
            if not greedy:
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
            if greedy:
                token = self.decode_greedy(session, token)
            else:
                logits = self.forward(session, [token])[-1]
            t_decode += time.perf_counter() - t1
            steps += 1
        self.last = GenerationResult(self.tokenizer.decode(new), new, len(prompt_ids), reason,
                                     t_prefill, t_decode, steps)

    def generate(self, prompt, config: GenerationConfig | None = None, **kwargs) -> GenerationResult:
        for _ in self.stream(prompt, config, **kwargs):
            pass
        return self.last
