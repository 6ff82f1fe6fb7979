"""How the engine calls a compiled model: one small runner per calling convention.

The compiled module describes its convention (``_metadata``: ``relax_passes/attach_metadata.py``);
:func:`read_convention` reads it, and :func:`make_runner` picks the runner:

``PastPresent``  (``kv_cache="copy"``) the exported interface: every step passes the whole past
                 and gets fresh ``present`` tensors back, which become the next step's past.
``InPlace``      one cache per layer, allocated once per session and written at ``past_len``;
                 workspace buffers allocated once per engine; greedy steps through the
                 ``*_step`` entries with the buffers as ``ffi.Array`` tuples.
``RemoteInPlace`` the same over TVM RPC: caches, workspace and weights live in tuples the
                 model's ``alloc_*`` functions make on the server (a remote function gets tensor
                 arguments as raw ``DLTensor*``, which the cache views cannot take; a tuple it
                 returned crosses back as the object itself), and the calls go to ``*_tupled``.

A runner owns the buffers (weights, workspace) and makes each call's function name and
arguments; the engine makes the call. How values cross to the VM is the ``link``'s business:
:class:`LocalLink` here, ``tvm_lite.rpc.remote.RemoteLink`` over RPC.

Runs in a runtime-only TVM process (``tvm.runtime`` only).
"""

from __future__ import annotations

import contextlib

import json

import numpy as np
import tvm

from . import convention as cv


class LocalLink:
    """Values to and from a VM in this process: shapes and tuples by value."""

    remote = False

    @staticmethod
    def make_shape(values):
        return tvm.runtime.ShapeTuple([int(v) for v in values])

    @staticmethod
    def read_shape(shape) -> list[int]:
        return [int(v) for v in shape]

    @staticmethod
    def unpack(out):
        return out

    def check_entries(self, vm, artifact) -> None:
        """Nothing to check locally (over RPC: the tuple entry points must be there)."""

    @staticmethod
    def guard(_what: str):
        """Around the model's calls: nothing locally (over RPC: a lost server is an RPCError)."""
        return contextlib.nullcontext()


# -- the calling convention ----------------------------------------------------------------------
def read_convention(vm, manifest: dict) -> dict:
    """The model's description of its calling convention: its ``_metadata`` function, else the
    manifest's copy, else (an artifact built before either) derived from the manifest's options
    and the functions the module has."""
    if vm.module.implements_function(cv.METADATA):
        return json.loads(str(vm[cv.METADATA]()))
    if manifest.get("convention"):
        return manifest["convention"]
    options = manifest.get("options", {})
    has = vm.module.implements_function
    inplace = options.get("kv_cache") == cv.KV_INPLACE
    return {"kv_cache": cv.KV_INPLACE if inplace else cv.KV_COPY,
            "decoders": list(cv.DECODERS) if inplace else
            [cv.MAIN] + ([cv.DECODE] if options.get("decode_function") else []),
            "tupled": all(has(f) for f in cv.TUPLED_ENTRIES),
            "steps": inplace and has(cv.PREFILL_STEP) and has(cv.DECODE_STEP),
            "workspace": {"count": 1 if inplace and options.get("memory_plan") == "arena" else 0},
            "weights": {"tupled": inplace and has(cv.ALLOC_PARAMS)}, "options": options}


class Runner:
    """What every runner has: the weights on the device and the model's shapes."""

    greedy_steps = False  # whether ``prefill_step``/``decode_step`` are used (greedy on the device)
    padded_steps = False  # whether ``decode_padded_flat`` is there (in this process)
    chain_steps = False  # whether ``decode_chain`` is there (device tokens in and out)
    prefill_chain = False  # whether ``prefill_chain_flat`` is there (in this process)
    inplace = False
    last_row_prefill = False  # whether ``prefill_last`` gives a prefill's last logits alone

    def __init__(self, vm, dev, link, convention: dict, model: dict):
        self.vm, self.dev, self.link, self.convention = vm, dev, link, convention
        self.num_layers = int(model["num_layers"])
        self.kv_heads, self.head_dim = int(model["num_kv_heads"]), int(model["head_dim"])
        self.kv_dtype = model.get("dtype", "float32")
        self.weights: list = []  # the weights as tensors on the device
        self.param_args: list = []  # what a call passes for them

    def load_weights(self, arrays, count: int) -> None:
        self.weights = [tvm.runtime.tensor(w, self.dev) for w in arrays]
        self.param_args = self.weights

    def set_weights(self, arrays) -> None:
        """Overwrite the weights in place (every argument list and tuple holds these tensors)."""
        for dst, src in zip(self.weights, arrays):
            dst.copyfrom(np.ascontiguousarray(src))

    def allocate(self, max_context: int, prefill_chunk: int | None) -> None:
        """After the weights: the buffers calls need besides a session's caches (none here)."""

    def kv_row_bytes(self) -> int:
        """KV bytes of one token over all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim \
            * np.dtype(self.kv_dtype).itemsize

    def inputs(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> list:
        return [tvm.runtime.tensor(a, self.dev) for a in (ids, mask, pos)]


class PastPresent(Runner):
    """``kv_cache="copy"``: ``main`` (``decode`` for one token, where the build has it) takes the
    past and returns the logits and the presents."""

    def __init__(self, *args):
        super().__init__(*args)
        decoders = self.convention.get("decoders", [cv.MAIN])
        self._decode = cv.DECODE if cv.DECODE in decoders else cv.MAIN

    def new_past(self, max_context: int) -> list:
        shape = (1, self.kv_heads, 0, self.head_dim)
        return [tvm.runtime.empty(shape, self.kv_dtype, self.dev)
                for _ in range(2 * self.num_layers)]

    def call(self, session, ids: np.ndarray, mask, pos) -> tuple[str, list]:
        function = self._decode if ids.shape[1] == 1 else cv.MAIN
        return function, [*self.inputs(ids, mask, pos), *session.past, *self.param_args]

    def advance(self, session, out) -> int:
        """present -> past; returns the KV bytes the step copied (every past row, into the
        presents)."""
        copied = sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in session.past)
        session.past = [out[i] for i in range(1, 2 * self.num_layers + 1)]
        return copied

    def kv_cache_bytes(self, context: int) -> int:
        return 2 * self.kv_row_bytes() * context  # the past and the present, during a step


class InPlace(Runner):
    """``kv_cache="inplace"``, in this process: ``prefill``/``decode`` take the caches, the
    workspace buffers and the weights as separate tensors."""

    inplace = True

    def __init__(self, *args):
        super().__init__(*args)
        self.greedy_steps = bool(self.convention.get("steps"))
        # decode_chain: the token stays on the device, so steps can queue (Engine(run_ahead=))
        self.chain_steps = self.greedy_steps and bool(self.convention.get("chain"))
        # a prompt's chunks before the last write K/V rows and read nothing back: the entry
        # step_entry(PREFILL_CHAIN) names (prefill_chain_flat here, prefill_chain over RPC)
        self.prefill_chain = self.greedy_steps \
            and self.step_entry(cv.PREFILL_CHAIN) in self.convention.get("entries", {})
        # decode_padded (flat): a step that reads and advances its token on the device, on a
        # context padded to a bucket -- what CUDA graphs replay (tvm_lite/cuda_graphs.py)
        self.padded_steps = self.chain_steps and bool(self.convention.get("padded")) \
            and bool(self.convention.get("flat_steps")) and not self.link.remote
        self.last_row_prefill = cv.PREFILL_LAST in self.convention.get("entries", {})
        self.workspace: dict = {}  # decoder -> the workspace arguments of its calls
        self._need: dict = {}  # decoder -> the bytes of each of its workspace buffers
        self._limits = (0, 0)  # (max_context, prefill_chunk) the workspace is sized for
        self.workspace_total_bytes = 0
        self._buffers: list = []
        self._step_tuples: list = []

    # -- buffers --------------------------------------------------------------------------------
    def cache_rows(self, max_context: int) -> list[int]:
        """The rows of each cache: a ring cache's window (``_metadata``'s ``kv_caches.rows``),
        else ``max_context``."""
        rows = self.convention.get("kv_caches", {}).get("rows") or [None] * (2 * self.num_layers)
        return [max_context if r is None else int(r) for r in rows]

    @property
    def has_rings(self) -> bool:
        """Whether any cache is a ring (a sliding-window layer's)."""
        return any(r is not None for r in self.convention.get("kv_caches", {}).get("rows") or ())

    def workspace_bytes(self, function: str, tokens: int, past: int) -> list[int]:
        """The planned bytes of each workspace buffer of ``function`` for a call with ``tokens``
        new tokens after ``past`` cached ones (computed by the compiled model itself)."""
        size_of = self.vm[cv.workspace_bytes(function)]
        ids = tvm.runtime.empty((1, tokens), "int64", self.dev)
        mask = tvm.runtime.empty((1, past + tokens), "int64", self.dev)
        # only their shapes' types are checked: no rows, a ring cache's static rows
        empty = [tvm.runtime.empty((rows, self.kv_heads, self.head_dim), self.kv_dtype, self.dev)
                 for rows in self.cache_rows(0)]
        return self.link.read_shape(size_of(ids, mask, ids, self.link.make_shape([past]), *empty))

    def allocate(self, max_context: int, prefill_chunk: int) -> None:
        """After the weights: the workspace buffers, then the tuples the step entries take."""
        self._limits = (max_context, prefill_chunk)
        if self.convention.get("workspace", {}).get("count"):
            # what generation runs: decode, and prefill_last where the model has it (else prefill)
            # (and prefill_fill, a prompt's chunks before its last, where prefill_chain runs it)
            fill = [cv.PREFILL_FILL] if self.prefill_chain \
                and cv.PREFILL_FILL in self.convention.get("entries", {}) else []
            self._grow_workspace([*fill, cv.DECODE, cv.PREFILL_LAST if self.last_row_prefill
                                  else cv.PREFILL])
        else:
            self._step_tuples = self._make_step_tuples()

    def _grow_workspace(self, functions: list) -> None:
        """One set of buffers for every decoder (they never run at once), each sized for the
        largest call of the decoders ``functions`` adds to those it holds already: every size is
        a product of dims, so it grows with tokens and past alike. ``prefill``'s every-row
        logits (Gemma's 256k vocabulary: 131 MB of fp16 for a 256-token chunk) are allocated
        the first time a call needs them (:meth:`call`), not for generation, which runs
        ``prefill_last``. As many buffers as the decoder with the most (the entries take them
        all; one not needed yet is 1 byte)."""
        max_context, chunk = self._limits
        for name in functions:
            self._need[name] = self.workspace_bytes(name, 1 if name == cv.DECODE else chunk,
                                                    max_context)
        count = max([int(self.convention["workspace"].get("count", 0))]
                    + [len(v) for v in self._need.values()])
        sizes = [max(v[i] if i < len(v) else 0 for v in self._need.values()) for i in range(count)]
        self.workspace_total_bytes = sum(sizes)
        self._make_workspace(self._need, [max(s, 1) for s in sizes])
        self._step_tuples = self._make_step_tuples()

    def _make_workspace(self, need: dict, sizes: list[int]) -> None:
        self._buffers = [tvm.runtime.empty((size,), "uint8", self.dev) for size in sizes]
        self.workspace = {name: self._buffers[:len(v)] for name, v in need.items()}

    def new_past(self, max_context: int) -> list:
        """The one allocation of a session's KV memory: ``max_context`` rows per cache, a
        sliding-window layer's ring ``window`` rows."""
        return [tvm.runtime.empty((rows, self.kv_heads, self.head_dim), self.kv_dtype, self.dev)
                for rows in self.cache_rows(max_context)]

    # -- calls ----------------------------------------------------------------------------------
    def call(self, session, function: str, inputs: list) -> tuple[str, list]:
        """``function`` (prefill or decode) with ``inputs`` (ids, mask, positions, past_len)."""
        self._ensure_workspace(function)
        return function, [*inputs, *session.past, *self.workspace.get(function, ()),
                          *self.param_args]

    def _ensure_workspace(self, function: str) -> None:
        if self._need and function not in self._need:
            self._grow_workspace([function])

    def _make_step_tuples(self) -> list:
        """The workspace and weights as the ``*_step`` entries take them: ``ffi.Array`` tuples
        of this runner's own buffers."""
        out = [tvm.runtime.convert(self._buffers)] if self._buffers else []
        if self.convention.get("weights", {}).get("tupled"):
            return out + [tvm.runtime.convert(self.weights)]
        return out + list(self.weights)

    def step_entry(self, entry: str) -> str:
        """The step entry to call for ``entry`` (``decode_step``...): in this process its
        ``_flat`` variant where the model has one (the buffers as separate arguments: no tuple
        unpacked by the VM at each step)."""
        return cv.flat(entry) if self.convention.get("flat_steps") else entry

    def step_buffers(self, session) -> list:
        """The caches, workspace and weights as the :meth:`step_entry` takes them."""
        if self.convention.get("flat_steps"):
            return [*session.past, *self._buffers, *self.weights]
        if session.past_tuple is None:
            session.past_tuple = tvm.runtime.convert(list(session.past))
        return [session.past_tuple, *self._step_tuples]

    def kv_cache_bytes(self, context: int) -> int:
        """What :meth:`new_past` allocates for ``context`` rows (ring caches: their window)."""
        return self.kv_row_bytes() // (2 * self.num_layers) * sum(self.cache_rows(context))


class RemoteInPlace(InPlace):
    """``kv_cache="inplace"`` over TVM RPC: the buffers in server-side tuples (module doc)."""

    def load_weights(self, arrays, count: int) -> None:
        """The weights in one tuple on the server, made by the model's ``alloc_params`` (empty
        tensors of the weights' types) and filled here, one upload per weight, once; each step
        passes the tuple's handle instead of one argument per weight. A build without
        ``alloc_params`` passes them separately."""
        if not self.convention.get("weights", {}).get("tupled"):
            return super().load_weights(arrays, count)
        packed = self.vm[cv.ALLOC_PARAMS]()
        tensors = self.link.unpack(packed)
        if len(tensors) != count:
            raise ValueError(f"the model's {cv.ALLOC_PARAMS} makes {len(tensors)} weights, the "
                             f"artifact holds {count}")
        for dst, src in zip(tensors, arrays):
            dst.copyfrom(src)
        self.weights, self.param_args = tensors, [packed]

    def _make_workspace(self, need: dict, sizes: list[int]) -> None:
        if sizes:  # one tuple on the server; each decoder unpacks the buffers it has
            buffers = self.vm[cv.ALLOC_WORKSPACE](self.link.make_shape(sizes))
            self.workspace = {name: [buffers] for name in need}

    def new_past(self, max_context: int):
        """The same allocation, made on the server and kept there as a tuple (a handle here)."""
        return self.vm[cv.ALLOC_KV_CACHES](self.link.make_shape([max_context]))

    def call(self, session, function: str, inputs: list) -> tuple[str, list]:
        self._ensure_workspace(function)
        return cv.tupled(function), [*inputs, session.past, *self.workspace.get(function, ()),
                                     *self.param_args]

    def _make_step_tuples(self) -> list:
        return []  # the server-side tuples are the step entries' arguments already

    def step_entry(self, entry: str) -> str:
        return entry  # the tuple entries: a remote tensor argument cannot be viewed

    def step_buffers(self, session) -> list:
        return [session.past, *self.workspace.get(cv.DECODE, ()), *self.param_args]


def make_runner(vm, dev, link, convention: dict, model: dict, artifact) -> Runner:
    """The runner for ``convention`` (what :func:`read_convention` returned) and ``link``."""
    if convention.get("kv_cache") != cv.KV_INPLACE:
        return PastPresent(vm, dev, link, convention, model)
    if link.remote:
        link.check_entries(vm, artifact)
        return RemoteInPlace(vm, dev, link, convention, model)
    return InPlace(vm, dev, link, convention, model)
