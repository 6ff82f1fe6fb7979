"""Run a compiled artifact on a device behind the tracker: the engine's own loop, remote kernels.

    session = request_session("127.0.0.1:9190", "android")
    engine = remote_engine("out/", session)        # uploads model.so and the weights
    print(engine.generate("Hi").text)              # prefill/decode run on the phone's GPU

The host keeps the tokenizer, sampling and the loop. A greedy step of an in-place artifact is one
shape made on the server and one call of ``decode_step``, whose result (the next token) crosses
back by value: the inputs are built and the argmax is taken on the device
(``relax_passes/add_step_entries.py``). Sampling with a temperature, and past/present builds, send
the ids, mask and positions and read the last row of logits back each step.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path

import numpy as np

from .. import convention
from ..artifact import LIBRARY, load_manifest
from ..engine import Engine
from .processes import RPCError, parse_address, tracker_status

# target kind in the manifest -> the device the artifact runs on
_DEVICE_OF_KIND = {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "opencl": "opencl",
                   "vulkan": "vulkan", "metal": "metal", "rocm": "rocm"}


def device_kind(manifest: dict) -> str:
    kind = manifest.get("target_kind", "llvm")
    if kind not in _DEVICE_OF_KIND:
        raise RPCError(f"no known device for target kind {kind!r}; pass --device")
    return _DEVICE_OF_KIND[kind]


# what TVM's RPC says when the other end is gone (a killed server, an unplugged phone)
_LOST_MARKERS = ("kShutdown", "Socket", "socket", "Connection", "connection", "Broken pipe",
                 "RPCSession", "rpc session")


@contextlib.contextmanager
def lost_server(what: str):
    """Run ``what`` (a bench, a remote call); if the RPC server goes away meanwhile, raise
    :class:`RPCError` saying so instead of TVM's internal check."""
    try:
        yield
    except RPCError:
        raise
    except (RuntimeError, OSError) as err:
        text = str(err)
        if not any(m in text for m in _LOST_MARKERS):
            raise
        last = text.strip().splitlines()[-1] if text.strip() else type(err).__name__
        raise RPCError(f"lost the RPC server during {what} ({last}): it was stopped, crashed or "
                       "its network went away; start it again and rerun") from err


def request_session(tracker: str, key: str, priority: int = 1, session_timeout: float = 0):
    """An RPC session on a free server under ``key`` (waits while all are busy); a clear error
    if the tracker has no server under ``key``."""
    from .processes import connect_tracker

    host, port = parse_address(tracker)
    keys = tracker_status(tracker)["keys"]
    if keys.get(key, {}).get("total", 0) == 0:
        have = sorted(k for k, v in keys.items() if v["total"])
        raise RPCError(f"the tracker at {host}:{port} has no server under key {key!r} "
                       f"(keys there: {have or 'none'}); start one with "
                       f"`tvm-lite rpc server --tracker {host}:{port} --key {key}`")
    return connect_tracker(tracker).request(key, priority=priority, session_timeout=session_timeout)


# what an in-place artifact needs to run over RPC (relax_passes/add_tupled_buffer_entries.py)
TUPLED_ENTRIES = convention.TUPLED_ENTRIES


def check_tupled_entries(vm, artifact) -> None:
    """An in-place artifact runs over RPC through its tuple entry points; one built before they
    existed gets a clear error instead of a failing view on the server."""
    missing = [f for f in TUPLED_ENTRIES if not vm.module.implements_function(f)]
    if missing:
        raise RPCError(f"{artifact}: this in-place KV-cache artifact has no {', '.join(missing)} "
                       "(built by an older tvm_lite): recompile it (`tvm-lite compile ... "
                       "--force`) to run it over RPC, or build it with `--kv-cache copy`")


class RemoteLink:
    """How the engine's values cross to a VM in an RPC ``session`` (``tvm_lite.runners``): a
    shape argument (an ``ffi.Shape`` cannot cross the link by value) is made on the server, a
    returned shape is read back as ints, and a returned tuple (an opaque handle here) is read
    into its remote tensors, one call per field, nothing copied. (``VirtualMachine.set_input``
    would work too, but copies every argument, the weights included, at every call.)"""

    remote = True
    upload_seconds = 0.0  # model.so and the weights, set by remote_engine
    upload_bytes = 0

    def __init__(self, session):
        self._make = session.get_function("ffi.Shape")
        self._to_tensor = session.get_function("relax.run.shape_to_tensor")
        self._size = session.get_function("ffi.ArraySize")
        self._get = session.get_function("ffi.ArrayGetItem")

    def make_shape(self, values):
        return self._make(*[int(v) for v in values])

    def read_shape(self, shape) -> list[int]:
        return [int(v) for v in self._to_tensor(shape).numpy()]

    def unpack(self, out):
        import tvm

        if isinstance(out, tvm.runtime.Tensor):
            return out
        return [self._get(out, i) for i in range(self._size(out))]

    def check_entries(self, vm, artifact) -> None:
        check_tupled_entries(vm, artifact)

    @staticmethod
    def guard(what: str):
        return lost_server(what)


_UPLOADS = itertools.count()


def remote_engine(artifact, session, device: str | None = None, max_context: int | None = None,
                  **options):
    """An ``Engine`` whose model runs in ``session``: uploads ``model.so``, loads it there, and
    copies the weights to the remote device. ``device``: "cpu", "cuda", "opencl", "cuda:1"...
    (default: the artifact's target kind); ``options``: the Engine's (``buckets``,
    ``prefill_chunk``...). ``engine.link.upload_seconds``/``upload_bytes``: what the upload took.

    Both KV-cache conventions run. An in-place artifact (the default build) keeps each session's
    caches, and the engine's workspace buffers, on the server: TVM's RPC hands a remote function
    its tensor arguments as raw ``DLTensor*``, and the model reads caches and workspaces through
    views (``runtime.TVMTensorCreateView``) that need ``ffi.Tensor`` objects. So the engine
    allocates them with the model's ``alloc_kv_caches``/``alloc_workspace``, whose returned tuples
    stay on the server (a handle here), and calls ``prefill_tupled``/``decode_tupled``, which take
    those tuples and call ``prefill``/``decode`` with their fields inside the VM; the tensors
    arrive there as objects and nothing is copied. The weights, too, are one server-side tuple
    (``alloc_params``, filled once here), so a step passes 7 arguments, not one more per weight.
    Per step only the ids, mask and positions go over, and the last row of logits comes back.
    An in-place artifact built before these entry points existed is refused with a clear error
    (rebuild it); one built before ``alloc_params`` passes its weights as separate arguments."""
    path = Path(artifact)
    manifest = load_manifest(path)
    kind, _, index = (device or device_kind(manifest)).partition(":")
    t0 = time.perf_counter()
    # a fresh name per upload: overwriting a library the server has loaded already (a second
    # engine in one session) makes its next dlopen crash the server
    remote_name = f"model-{os.getpid()}-{next(_UPLOADS)}.so"
    session.upload(str(path / LIBRARY), remote_name)
    lib = session.load_module(remote_name)
    dev = session.device(kind, int(index or 0))
    if not dev.exist:
        raise RPCError(f"the RPC server has no {kind}:{index or 0} device (the artifact targets "
                       f"{manifest.get('target_kind')})")
    link = RemoteLink(session)
    engine = Engine(path, device=dev, max_context=max_context, module=lib, link=link, **options)
    link.upload_seconds = time.perf_counter() - t0
    link.upload_bytes = (path / LIBRARY).stat().st_size + sum(
        int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in engine.params)
    return engine
