"""The generation loop over a compiled artifact: prefill, then decode.

Runs in a runtime-only TVM process (``TVM_USE_RUNTIME_LIB=1``): it imports ``tvm.runtime`` only.

The compiled model describes its calling convention (its ``_metadata`` function,
``relax_passes/attach_metadata.py``); the engine reads it and calls the model through one runner
(``tvm_lite/runners.py``):

* in place (the default build): one ``(max_context, kv_heads, head_dim)`` cache per layer,
  allocated once per session, written at ``past_len`` by the model, which returns only the
  logits (``relax_passes/inplace_kv_cache.py``); nothing is copied between steps. Greedy
  generation takes one call per step (``prefill_step``/``decode_step``: the ids, mask and
  positions are made on the device and the argmax taken there, ``relax_passes/add_step_entries.py``),
  so no logits leave the device. Sampling with a temperature (and ``forward``) reads the logits.
* past/present (``kv_cache="copy"``): every step the model concatenates the whole past with the
  new rows into fresh ``present`` tensors, which become the next step's past.
* in place over TVM RPC (``tvm_lite.rpc.remote_engine``): the caches, workspace and weights live
  in server-side tuples and the calls go to the ``*_tupled`` entries.

``Engine.tokens`` is the one generation loop (prefill, then one decode step per token; greedy on
the device or sampling on the host); ``stream``, ``generate`` and every benchmark
(``tvm_lite/bench.py``, ``gpu_slice.profile_prefill``) run it.

``Session.kv_bytes_copied`` counts the KV bytes the present -> past round trip copies (0 in place),
and ``Engine.kv_cache_bytes`` the KV memory each convention holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from . import convention as cv
from . import cuda_graphs as graphs_module  # (PROMPT_CHUNKS read at each Engine: a switch)
from .cuda_graphs import Driver, StepGraphs, bucket_end, make_stream
from .artifact import LIBRARY, MANIFEST, PARAMS, check_artifact
from .gpu_slice import GpuSlicer, Submissions, no_instrument, set_priority
from .runners import LocalLink, make_runner, read_convention
from .tokenizer import Tokenizer
from .checks import check_request
from .errors import UserError


DEFAULT_BUCKETS = (16, 32, 64, 128, 256)  # prefill calls are padded up to one of these
# greedy decode steps queued on a GPU before the host reads their tokens (Engine(run_ahead=))
DEFAULT_RUN_AHEAD = 4
_KDL_CPU = 1
_KDL_CUDA = 2


class ContextLengthError(UserError):
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
    graphs: object = None  # CUDA graphs of decode_padded and prompt chunks on these caches (StepGraphs)
    padded_ready: bool = False  # the caches' unwritten rows zeroed for decode_padded


def _device(name: str):
    kind, _, index = name.partition(":")
    return tvm.device(kind, int(index or 0))


@dataclass
class Step:
    """One token of the generation loop and what it cost: ``seconds`` of the call that made it
    (the prefill for the first token, one decode step for the others)."""

    token: int
    seconds: float


_LOADED: dict = {}  # library path -> (device, inode, mtime, size) of the file loaded from there


def load_library(path) -> "tvm.runtime.Module":
    """``tvm.runtime.load_module(path)``, never a stale one. ``dlopen`` hands back the library it
    already loaded from the same path name without reading the file again, so a process that
    loads an artifact rebuilt in the same folder (``compile_model(..., force=True)``, a reused
    temporary folder) would run the old model with the new weights; a file that changed since
    this process loaded it is loaded from a private copy instead."""
    import shutil
    import tempfile

    path = Path(path).resolve()
    st = path.stat()
    ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if _LOADED.setdefault(str(path), ident) == ident:
        return tvm.runtime.load_module(str(path))
    folder = tempfile.mkdtemp(prefix="tvm_lite_lib_")
    try:
        shutil.copyfile(path, Path(folder) / path.name)
        return tvm.runtime.load_module(str(Path(folder) / path.name))
    finally:  # the loaded library stays mapped
        shutil.rmtree(folder, ignore_errors=True)


class Engine:
    """Load an artifact and generate text with it."""

    def __init__(self, artifact, device=None, max_context: int | None = None,
                 buckets=DEFAULT_BUCKETS, prefill_chunk: int | None = None, *, module=None,
                 gpu_slice: int | None = None, priority: str = "normal", link=None,
                 run_ahead: int | None = None, cuda_graphs: bool | None = None):
        """``buckets``: the token counts a prefill call is padded up to (``None``/``()``: no
        padding); ``prefill_chunk``: the most tokens one prefill call takes (default: the largest
        bucket, or 256). In-place artifacts only: the copy path neither pads nor chunks.
        ``device``: "cpu", "cuda:0"... (default: the build's device) or a ``tvm.runtime.Device``
        (an RPC session's too), and ``module`` the artifact's library already loaded there,
        ``link`` how values cross to it (``tvm_lite.rpc.remote_engine`` passes all three;
        default: this process).
        Against UI lag on phones (``tvm_lite/gpu_slice.py``): ``gpu_slice`` = at most this many
        kernels between two flushes of the device queue during prefill (None: no slicing), and
        ``priority="low"`` asks for a low-priority queue where the runtime allows it.
        ``run_ahead``: greedy decode steps queued on the device before the host reads their
        tokens (``decode_chain``: each step feeds the last one's token on the device), so the
        GPU does not wait for the host between steps; a stop token is seen up to
        ``run_ahead - 1`` steps late (those steps are computed and dropped). Default
        ``DEFAULT_RUN_AHEAD`` on a GPU, 1 (each token read before the next step) on the CPU,
        where kernels run as they are called, and for models with sliding-window (ring) caches,
        whose dropped steps would overwrite rows the window still holds.
        ``cuda_graphs``: greedy decode steps through ``decode_padded``, each bucket's step
        recorded once as a CUDA graph and replayed (``tvm_lite/cuda_graphs.py``): one launch a
        step; and (``cuda_graphs.PROMPT_CHUNKS``) a prompt's chunks before its last, each
        recorded per (first row, length) and replayed by later prompts. Default: on for a CUDA
        device when the model has ``decode_padded``."""
        self.path = Path(artifact)
        if module is None and not (self.path / MANIFEST).exists():
            # an ONNX file / export folder / .gguf / HF folder: compiled (cached) for the device
            from .artifact import compile_model

            self.path = compile_model(self.path, "cuda" if str(device).startswith("cuda") else "llvm")
        self.manifest = check_artifact(self.path, local=link is None)  # version, files
        self.model = self.manifest.get("model", {})
        if module is None and link is None:  # locally: at once if this TVM cannot run it
            from .target import check_runnable

            checked = check_runnable(self.manifest.get("target_kind", "llvm"),
                                     device if isinstance(device, str) else None)
            device = checked if device is None else device  # default: the build's device
        self.dev = _device(device) if isinstance(device, str) else device
        lib = module if module is not None else load_library(self.path / LIBRARY)
        self.vm = VirtualMachine(lib, self.dev)
        self.link = link or LocalLink()
        self.convention = read_convention(self.vm, self.manifest)
        self.runner = make_runner(self.vm, self.dev, self.link, self.convention, self.model,
                                  self.path)
        # the model's shape (from its config): what sizes the caches
        self.num_layers, self.kv_dtype = self.runner.num_layers, self.runner.kv_dtype
        self.kv_heads, self.head_dim = self.runner.kv_heads, self.runner.head_dim
        GpuSlicer(self.dev, gpu_slice)  # validates the option
        self.gpu_slice = gpu_slice
        self.slice_record = None  # a gpu_slice.Submissions that records prefill submissions
        self.priority, self.sync = set_priority(self.dev, priority)
        with np.load(self.path / PARAMS) as weights:  # one weight in host memory at a time
            count = len(weights.files)
            self.runner.load_weights((weights[f"p{i}"] for i in range(count)), count)
        self.last_call_args = 0  # arguments the last call of the model passed
        self._functions = {}  # the VM's functions by name (over RPC a lookup is a round trip)
        self.tokenizer = Tokenizer(self.path, self.model.get("chat_template"),
                                   self.model.get("bos_token_id"))
        limit = int(self.model.get("max_context", 2048))
        self.max_context = min(max_context, limit) if max_context else limit
        inplace = self.runner.inplace
        self.buckets = tuple(sorted(buckets)) if (buckets and inplace) else ()
        self.prefill_chunk = (prefill_chunk or (self.buckets[-1] if self.buckets else 256)) \
            if inplace else None
        if self.buckets and self.prefill_chunk > self.buckets[-1]:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} exceeds the largest bucket "
                             f"{self.buckets[-1]}")
        if inplace and self.runner.has_rings:
            # a ring cache keeps a call's last rows, so padding rows after the real ones would
            # overwrite real ones: calls are not padded (the CPU kernels take any token count)
            self.buckets = ()
        self.runner.allocate(self.max_context, self.prefill_chunk)
        self.stop_token_ids = tuple(self.model.get("stop_token_ids", ()))
        self.run_ahead = self._check_run_ahead(run_ahead)
        self.cuda_graphs = self._check_cuda_graphs(cuda_graphs)
        # a prompt's chunks before its last (prefill_chain) as CUDA graphs too (see prefill_greedy)
        self.chunk_graphs = bool(self.cuda_graphs and self.runner.prefill_chain
                                 and graphs_module.PROMPT_CHUNKS)
        self._chunk_ids: dict = {}  # (first row, padded length) -> the ids buffer its graph reads
        self._driver = self._stream = None
        if self.cuda_graphs:
            self._driver = Driver()
            self._stream = getattr(self.sync, "stream", None)  # priority="low" made one
            if self._stream is None:
                self._stream = make_stream(self.dev, self._driver)
                self.sync = lambda: self._driver("cuStreamSynchronize", self._stream)
        # decode_padded's state on the device, made before any graph records their addresses:
        # the tokens (the fed one at a session's length, each step's at the next row) and the
        # position of the token a step feeds
        self._padded_tokens = self._padded_position = None
        self._spare: list = []  # (caches, graphs) of sessions that are gone (new_session)
        if self.runner.padded_steps:
            self._padded_tokens = tvm.runtime.empty((self.max_context + 1,), "int64", self.dev)
            self._padded_position = tvm.runtime.empty((1,), "int64", self.dev)
        self.last: GenerationResult | None = None  # the last stream's / generate's result

    def _check_cuda_graphs(self, wanted: bool | None) -> bool:
        on_cuda = int(self.dev.dlpack_device_type()) == _KDL_CUDA  # (not over RPC)
        if wanted is None:
            return bool(self.runner.padded_steps and on_cuda)
        if not isinstance(wanted, bool):
            raise UserError(f"cuda_graphs={wanted!r}: expected True, False or None (default)")
        if wanted and not on_cuda:
            raise UserError(f"cuda_graphs=True needs a local CUDA device, not {self.dev}")
        if wanted and not self.runner.padded_steps:
            raise UserError("cuda_graphs=True: this model has no decode_padded entry (a model "
                            "with sliding-window caches, or built before it: rebuild it)")
        return wanted

    def _check_run_ahead(self, run_ahead: int | None) -> int:
        can = self.runner.chain_steps and not (self.runner.inplace and self.runner.has_rings)
        if run_ahead is None:
            on_cpu = int(self.dev.dlpack_device_type()) % 128 == _KDL_CPU
            return DEFAULT_RUN_AHEAD if can and not on_cpu else 1
        if isinstance(run_ahead, bool) or not isinstance(run_ahead, int) or run_ahead < 1:
            raise UserError(f"run_ahead={run_ahead!r}: expected an integer >= 1 (decode steps "
                            "queued before their tokens are read; 1: none)")
        if run_ahead > 1 and not can:
            why = ("its sliding-window (ring) caches would lose rows to dropped steps"
                   if self.runner.chain_steps else "it has no decode_chain entry (rebuild it)")
            raise UserError(f"run_ahead={run_ahead}: this model cannot queue decode steps: {why}")
        return run_ahead

    # -- what the runner holds --------------------------------------------------------------------
    @property
    def kv_mode(self) -> str:
        return self.convention["kv_cache"]

    @property
    def params(self) -> list:
        """The weights as tensors on the device."""
        return self.runner.weights

    def set_weights(self, arrays) -> None:
        """Overwrite the weights (numpy arrays, in the artifact's order) in place."""
        self.runner.set_weights(arrays)

    @property
    def workspace_total_bytes(self) -> int:
        return getattr(self.runner, "workspace_total_bytes", 0)

    def workspace_bytes(self, function: str, tokens: int, past: int) -> list[int]:
        """The planned bytes of each workspace buffer of ``function`` (in place only)."""
        return self.runner.workspace_bytes(function, tokens, past)

    def kv_cache_bytes(self, context: int | None = None) -> int:
        """KV memory a session holds at ``context`` tokens (default ``max_context``): one cache
        instance in place; during a copy-path step, the past and the present are both alive."""
        return self.runner.kv_cache_bytes(self.max_context if context is None else context)

    def new_session(self) -> Session:
        """A session with its own caches. With ``cuda_graphs``, the caches (and the graphs
        recorded on them) of a session that is gone are reused: a graph holds its caches'
        addresses, so each new generation would otherwise record its graphs again."""
        if self._spare:
            past, graphs = self._spare.pop()
            # (a bucket ran once only after its rows were zeroed: _zero_unwritten_rows)
            session = Session(past=past, graphs=graphs, padded_ready=bool(graphs.warm))
        else:
            with self.link.guard("a new session"):  # over RPC: the caches are allocated there
                session = Session(past=self.runner.new_past(self.max_context))
            if self.cuda_graphs:
                session.graphs = StepGraphs(self._driver, self._stream)
        if session.graphs is not None:  # given back when the session is collected
            weakref.finalize(session, self._spare.append, (session.past, session.graphs))
        return session

    def padded_length(self, n: int, past: int) -> int:
        """The bucket ``n`` new tokens are padded to (``n`` itself without buckets, for decode, or
        when the bucket would not fit in the cache)."""
        if n == 1 or not self.buckets:
            return n
        bucket = next((b for b in self.buckets if b >= n), n)
        return bucket if past + bucket <= self.max_context else n

    # -- the model, one call ----------------------------------------------------------------------
    def _function(self, name: str):
        if name not in self._functions:
            self._functions[name] = self.vm[name]
        return self._functions[name]

    @contextlib.contextmanager
    def submissions(self, gpu_slice: int | None = None) -> Iterator[Submissions]:
        """Inside the block, prefill calls run sliced every ``gpu_slice`` kernels (None: not
        sliced) and their submissions are recorded in the ``Submissions`` this yields; the
        engine's own setting is restored after."""
        GpuSlicer(self.dev, gpu_slice)  # validates
        saved = self.gpu_slice, self.slice_record
        self.gpu_slice, self.slice_record = gpu_slice, Submissions()
        try:
            yield self.slice_record
        finally:
            self.gpu_slice, self.slice_record = saved

    @contextlib.contextmanager
    def instrumented(self, instrument):
        """Inside the block, every VM call runs under ``instrument`` (a VM instrument function)
        and nothing is sliced."""
        saved = self.gpu_slice, self.slice_record
        self.gpu_slice = self.slice_record = None
        self.vm.set_instrument(instrument)
        try:
            yield
        finally:
            self.vm.set_instrument(no_instrument)
            self.gpu_slice, self.slice_record = saved

    def _call(self, function: str, args: list, read: bool = True):
        """``function(*args)``, sliced where ``gpu_slice`` asks; its result unpacked (over RPC
        a returned tuple is read field by field), or None where ``read`` is False."""
        self.last_call_args = len(args)
        if not function.startswith(cv.DECODE) and (self.gpu_slice is not None
                                                   or self.slice_record is not None):
            slicer = GpuSlicer(self.dev, self.gpu_slice, self.sync)
            out = slicer.run(self.vm, lambda: self.vm[function](*args))
            if self.slice_record is not None:
                self.slice_record.seconds += slicer.record.seconds
                self.slice_record.kernels += slicer.record.kernels
        else:
            out = self._function(function)(*args)
        # over RPC, a remote VM's output tuple arrives as a handle; the step entries return an
        # int, which crosses by value
        if not read:
            return None
        return out if isinstance(out, int) else self.link.unpack(out)

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

    def _check_room(self, session: Session, n: int) -> None:
        if session.length + n > self.max_context:
            raise ContextLengthError(
                f"{session.length} tokens in the session + {n} new tokens = {session.length + n} "
                f"exceeds max_context={self.max_context}")

    def _advance(self, session: Session, tokens: list, length: int, copied: int = 0) -> None:
        session.last_step_kv_bytes_copied = copied
        session.kv_bytes_copied += copied
        session.tokens.extend(int(t) for t in tokens)
        session.length = length

    def forward(self, session: Session, ids, last_only: bool = False) -> np.ndarray:
        """Run ``ids`` through the model after ``session``'s tokens; return the logits of every
        position ([n, vocab]), or of the last one only ([1, vocab]: computed alone, by the
        model's ``prefill_last`` where it has one), and advance the session.

        In place, one new token runs ``decode``; more run ``prefill``, padded up to a bucket: the
        padding sits after the real tokens with attention mask 0, so causal attention keeps it
        out of every real position, and its K/V rows (past the session's length) are overwritten
        by the next tokens. (A model with ring caches is not padded: a ring keeps a call's last
        rows.)"""
        ids = np.asarray(ids, dtype="int64").reshape(1, -1)
        n = ids.shape[1]
        self._check_room(session, n)
        if self.prefill_chunk and n > self.prefill_chunk:
            raise ValueError(f"forward takes at most prefill_chunk={self.prefill_chunk} tokens, got "
                             f"{n}: use prefill(), which chunks")
        if self.runner.inplace:
            padded = self.padded_length(n, session.length)
            total = session.length + padded
            mask = np.zeros((1, total), "int64")
            mask[0, :session.length + n] = 1
            pos = np.arange(session.length, total, dtype="int64")[None]
            ids_in = np.pad(ids, ((0, 0), (0, padded - n)))
            function = cv.DECODE if padded == 1 else cv.PREFILL
            # for the last row alone, prefill_last: its lm_head (and what else works row by row
            # at the end of the model) runs on that one row
            called = cv.PREFILL_LAST if last_only and function == cv.PREFILL \
                and self.runner.last_row_prefill else function
            # the model writes rows [length, total) of each cache in place
            inputs = [*self.runner.inputs(ids_in, mask, pos),
                      self.link.make_shape([session.length])]
            out = self._call(*self.runner.call(session, called, inputs))
            session.last_call = (function, padded)
            self._advance(session, ids[0], session.length + n)
            if called == cv.PREFILL_LAST:
                return self._last_row(out[0], 1)
        else:
            total = session.length + n
            mask = np.ones((1, total), "int64")
            pos = np.arange(session.length, total, dtype="int64")[None]
            out = self._call(*self.runner.call(session, ids, mask, pos))
            self._advance(session, ids[0], total, self.runner.advance(session, out))
        return self._last_row(out[0], n) if last_only else out[0].numpy()[0, :n]

    def prefill(self, session: Session, ids, chunk_size: int | None = None) -> np.ndarray:
        """Feed a prompt (in chunks of ``chunk_size`` tokens); return the last position's logits."""
        ids = list(ids)
        self._check_room(session, len(ids))
        step = min(chunk_size or len(ids), self.prefill_chunk or len(ids))
        logits = None
        for start in range(0, len(ids), step):
            logits = self.forward(session, ids[start:start + step], last_only=True)
        return logits[-1]

    # -- greedy steps: one call each, the token computed on the device -------------------------
    def decode_greedy(self, session: Session, token: int) -> int:
        """Feed one token; return the greedy next token. Needs ``runner.greedy_steps``: one call
        of the model's ``decode_step`` (ids, mask and positions made on the device, the argmax
        taken there, one integer back), so over RPC a step is two round trips and moves no
        logits."""
        self._check_room(session, 1)
        args = [self.link.make_shape([int(token), session.length]),
                *self.runner.step_buffers(session)]
        nxt = int(self._call(self.runner.step_entry(cv.DECODE_STEP), args))
        session.last_call = (cv.DECODE, 1)
        self._advance(session, [token], session.length + 1)
        return nxt

    def decode_run_ahead(self, session: Session, token: int) -> Iterator[Step]:
        """Greedy decode from ``token`` (the last token, not yet in the cache), one
        :class:`Step` per new token, ``run_ahead`` steps queued at a time: each
        ``decode_chain`` call feeds the previous call's token tensor on the device, then the
        host reads the batch's tokens (the first read waits for the batch). Each token's
        ``seconds`` is its batch's wall time over the batch. The session advances as tokens are
        taken: a caller who stops early leaves it at the last token taken (the rows the queued
        steps wrote after it are past the session's length, and the next call overwrites them).
        Runs until the context is full."""
        chain = self._function(self.runner.step_entry(cv.DECODE_CHAIN))
        buffers = self.runner.step_buffers(session)  # the same every step (the one cache)
        current = tvm.runtime.tensor(np.array([token], "int64"), self.dev)
        fed = int(token)
        while session.length + 1 <= self.max_context:
            count = min(self.run_ahead, self.max_context - session.length)
            t0 = time.perf_counter()
            outs = []
            for i in range(count):
                current = chain(current, self.link.make_shape([session.length + i]), *buffers)
                outs.append(current)
            tokens = [int(t.numpy()[0]) for t in outs]
            seconds = (time.perf_counter() - t0) / count
            for nxt in tokens:
                session.last_call = (cv.DECODE, 1)
                self._advance(session, [fed], session.length + 1)
                fed = nxt
                yield Step(nxt, seconds)

    def decode_padded_steps(self, session: Session, token: int) -> Iterator[Step]:
        """Greedy decode from ``token`` as :meth:`decode_run_ahead` does (``run_ahead`` steps
        queued, then their tokens read at once), through ``decode_padded``: the token and its
        position live in device buffers the step reads and advances, and the context is padded
        to the next multiple of ``PADDED_BUCKET`` keys (the keys after the position masked), so
        all the steps of a bucket are the same call -- with ``cuda_graphs``, one graph launch
        each (``tvm_lite/cuda_graphs.py``). Elsewhere (the CPU) each step is a call of the same
        entry, which is how the tests check it."""
        entry = self._function(self.runner.step_entry(cv.DECODE_PADDED))
        buffers = self.runner.step_buffers(session)
        tokens, position = self._padded_tokens, self._padded_position
        self._zero_unwritten_rows(session)
        fed = int(token)
        start = session.length
        self._copy_in(tokens, start, [fed])
        self._copy_in(position, 0, [start])
        while session.length + 1 <= self.max_context:
            count = min(self.run_ahead, self.max_context - session.length)
            t0 = time.perf_counter()
            for i in range(count):
                length = session.length + i  # the fed token's row
                past = min(bucket_end(length, cv.PADDED_BUCKET), self.max_context) - 1
                shape = self.link.make_shape([past])

                def step(shape=shape):
                    return entry(tokens, position, shape, *buffers)

                if self.cuda_graphs and session.graphs is not None:
                    session.graphs.run(past, step)
                else:
                    step()
            new = tokens._create_view((count,), "int64",
                                      relative_byte_offset=(session.length + 1) * 8).numpy()
            seconds = (time.perf_counter() - t0) / count
            for nxt in new:
                session.last_call = (cv.DECODE, 1)
                self._advance(session, [fed], session.length + 1)
                fed = int(nxt)
                yield Step(fed, seconds)

    def _copy_in(self, buffer, offset: int, values: list) -> None:
        """``buffer[offset:offset + len(values)] = values`` (int64), one upload."""
        view = buffer._create_view((len(values),), "int64", relative_byte_offset=offset * 8)
        view.copyfrom(np.asarray(values, "int64"))

    def _zero_unwritten_rows(self, session: Session) -> None:
        """Zero the cache rows a session has not written, once: ``decode_padded`` reads the
        rows between its position and the bucket's end and masks them, which gives 0 for any
        finite value but not for a NaN left in fresh memory."""
        if session.padded_ready:
            return
        for cache in session.past:
            rows = int(cache.shape[0]) - session.length
            if rows <= 0:
                continue
            row = int(np.prod(cache.shape[1:])) * np.dtype(str(cache.dtype)).itemsize
            view = cache._create_view((rows, *cache.shape[1:]), str(cache.dtype),
                                      relative_byte_offset=session.length * row)
            if self._driver is not None:
                self._driver("cuMemsetD8Async", ctypes.c_uint64(view.data_ptr()),
                             ctypes.c_ubyte(0), ctypes.c_size_t(rows * row), self._stream)
            else:
                view.copyfrom(np.zeros(view.shape, str(cache.dtype)))
        session.padded_ready = True

    def prefill_greedy(self, session: Session, ids, chunk_size: int | None = None) -> int:
        """``prefill`` that returns the greedy next token instead of the logits
        (``runner.greedy_steps``: each chunk is one ``prefill_step`` call, padded to a bucket as
        ``forward`` pads).

        In a prompt of several chunks, the chunks before the last run ``prefill_chain_flat``
        (over RPC its tuple form, ``prefill_chain``) where the model has it: they write their
        K/V rows and compute no logits (``prefill_fill``), nothing is read back, and every
        chunk's ids are uploaded before the first runs (an upload waits for the device), so the
        host queues each chunk while the GPU runs the one before instead of waiting for it.

        With ``chunk_graphs`` (CUDA, not sliced), a fresh session's chunks run through its
        :class:`~tvm_lite.cuda_graphs.StepGraphs`, keyed by (first row, tokens, padded length):
        each reads its ids from a buffer kept for that key, so a later fresh prompt (its chunks
        start at the same rows) replays the graphs an earlier one recorded instead of launching
        ~200 kernels one by one."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("prefill_greedy needs at least one token")
        self._check_room(session, len(ids))
        step = min(chunk_size or len(ids), self.prefill_chunk or len(ids))
        chunks, length = [], session.length
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            chunks.append((chunk, self.padded_length(len(chunk), length), length))
            length += len(chunk)
        chained = self.runner.prefill_chain and len(chunks) > 1
        # (only a fresh session's prompt: its chunks' rows, 0, c, 2c..., are the ones a later
        # prompt starts at again; a follow-up prompt's rows would add keys, buffers and graphs
        # that nothing replays)
        graphed = (chained and self.chunk_graphs and session.graphs is not None
                   and session.length == 0 and self.gpu_slice is None
                   and self.slice_record is None)

        def upload(chunk, padded, row, last):  # the chunk's ids, padded, on the device
            host = np.array([chunk + [0] * (padded - len(chunk))], "int64")
            if not graphed or last:
                return tvm.runtime.tensor(host, self.dev)
            buffer = self._chunk_ids.get((row, padded))  # the address its graph records
            if buffer is None:
                buffer = self._chunk_ids[(row, padded)] = tvm.runtime.empty(host.shape, "int64",
                                                                            self.dev)
            buffer.copyfrom(host)  # (ordered after the work queued before: see module doc)
            return buffer

        uploads = [upload(c, p, row, i == len(chunks) - 1) if chained and p > 1 else None
                   for i, (c, p, row) in enumerate(chunks)]
        nxt = None
        for i, (chunk, padded, row) in enumerate(chunks):
            n = len(chunk)
            if padded == 1:
                nxt = self.decode_greedy(session, chunk[0])
                continue
            tokens = uploads[i] if chained else upload(chunk, padded, row, True)
            args = [tokens, self.link.make_shape([session.length, n]),
                    *self.runner.step_buffers(session)]
            # (sliced, as prefill is, if asked)
            if chained and i < len(chunks) - 1:  # K/V rows only: nothing to read back
                entry = self.runner.step_entry(cv.PREFILL_CHAIN)
                if graphed:
                    call = self._function(entry)
                    session.graphs.run((entry, row, n, padded), lambda: call(*args))
                else:
                    self._call(entry, args, read=False)
            else:
                nxt = int(self._call(self.runner.step_entry(cv.PREFILL_STEP), args))
            session.last_call = (cv.PREFILL, padded)
            self._advance(session, chunk, session.length + n)
        return nxt

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

    def tokens(self, session: Session, prompt_ids, config: GenerationConfig | None = None,
               chunk_size: int | None = None) -> Iterator[Step]:
        """The generation loop: prefill ``prompt_ids`` after ``session``'s tokens, then one decode
        step per further ``next()``, each feeding the token before. Yields every new token with
        the seconds its call took (the first: the prefill). Greedy (temperature 0) runs on the
        device where the model has step entries, one call per token; otherwise the logits come
        back and the token is sampled here. Ends when the context is full; the caller stops it
        sooner (a stop token, a token budget) by not asking for more."""
        cfg = config or GenerationConfig()
        on_device = cfg.temperature <= 0 and self.runner.greedy_steps
        rng = np.random.default_rng(cfg.seed)
        with self.link.guard("generation"):  # over RPC: a lost server is an RPCError
            t0 = time.perf_counter()
            if on_device:
                token = self.prefill_greedy(session, prompt_ids, chunk_size)
            else:
                token = self._sample(self.prefill(session, prompt_ids, chunk_size), cfg, rng)
            yield Step(token, time.perf_counter() - t0)
            if on_device and self.cuda_graphs:
                yield from self.decode_padded_steps(session, token)
                return
            if on_device and self.run_ahead > 1:
                yield from self.decode_run_ahead(session, token)
                return
            while session.length + 1 <= self.max_context:
                t0 = time.perf_counter()
                if on_device:
                    token = self.decode_greedy(session, token)
                else:
                    token = self._sample(self.forward(session, [token])[-1], cfg, rng)
                yield Step(token, time.perf_counter() - t0)

    def stream(self, prompt, config: GenerationConfig | None = None, chat: bool = True,
               session: Session | None = None, chunk_size: int | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece; the final GenerationResult is ``self.last``."""
        cfg = config or GenerationConfig()
        check_request(prompt, cfg)  # empty prompt, temperature < 0, top_p outside (0, 1]...
        stops = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else self.stop_token_ids)
        session = session or self.new_session()
        prompt_ids = self.encode_prompt(prompt, chat) if not isinstance(prompt, np.ndarray) \
            else list(prompt)
        new: list[int] = []
        text, reason, seconds = "", "context", []
        for step in self.tokens(session, prompt_ids, cfg, chunk_size):
            seconds.append(step.seconds)
            if step.token in stops:
                reason = "stop"
                break
            new.append(step.token)
            full = self.tokenizer.decode(new)
            if len(full) > len(text) and not full.endswith("\ufffd"):
                yield full[len(text):]
                text = full
            if len(new) >= cfg.max_new_tokens:
                reason = "length"
                break
        self.last = GenerationResult(self.tokenizer.decode(new), new, len(prompt_ids), reason,
                                     seconds[0], sum(seconds[1:]), len(seconds) - 1)

    def generate(self, prompt, config: GenerationConfig | None = None, **kwargs) -> GenerationResult:
        for _ in self.stream(prompt, config, **kwargs):
            pass
        return self.last
