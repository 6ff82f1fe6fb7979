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
TUPLED_ENTRIES = ("alloc_kv_caches", "prefill_tupled", "decode_tupled")


def _tuple_reader(session):
    """Read a tuple a remote function returned (an opaque handle here) into a list of its
    remote tensors: one call per field, nothing copied. (``VirtualMachine.set_input`` would
    work too, but copies every argument, the weights included, at every call.)"""
    import tvm

    size, get = session.get_function("ffi.ArraySize"), session.get_function("ffi.ArrayGetItem")

    def read(out):
        if isinstance(out, tvm.runtime.Tensor):
            return out
        return [get(out, i) for i in range(size(out))]

    return read


def check_tupled_entries(vm, artifact) -> None:
    """An in-place artifact runs over RPC through its tuple entry points; one built before they
    existed gets a clear error instead of a failing view on the server."""
    missing = [f for f in TUPLED_ENTRIES if not vm.module.implements_function(f)]
    if missing:
        raise RPCError(f"{artifact}: this in-place KV-cache artifact has no {', '.join(missing)} "
                       "(built by an older tvm_lite): recompile it (`tvm-lite compile ... "
                       "--force`) to run it over RPC, or build it with `--kv-cache copy`")


def remote_calls(session):
    """What the engine needs to call a VM in ``session``: ``unpack`` (a returned tuple -> its
    remote tensors), ``make_shape`` (a shape argument, such as the in-place cache's ``past_len``:
    an ``ffi.Shape`` cannot cross the link by value, so it is made on the server) and
    ``read_shape`` (a returned shape, such as the workspace sizes, read back as ints)."""
    make = session.get_function("ffi.Shape")
    to_tensor = session.get_function("relax.run.shape_to_tensor")

    def make_shape(values):
        return make(*[int(v) for v in values])

    def read_shape(shape):
        return [int(v) for v in to_tensor(shape).numpy()]

    return _tuple_reader(session), make_shape, read_shape


_UPLOADS = itertools.count()


def remote_engine(artifact, session, device: str | None = None, max_context: int | None = None,
                  **options):
    """An ``Engine`` whose model runs in ``session``: uploads ``model.so``, loads it there, and
    copies the weights to the remote device. ``device``: "cpu", "cuda", "opencl", "cuda:1"...
    (default: the artifact's target kind); ``options``: the Engine's (``buckets``,
    ``prefill_chunk``...).

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
    from tvm_lite.artifact import LIBRARY, load_manifest
    from tvm_lite.engine import Engine

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
    engine = Engine(path, device=dev, max_context=max_context, module=lib, session=session,
                    **options)
    engine.upload_seconds = time.perf_counter() - t0
    engine.upload_bytes = (path / LIBRARY).stat().st_size + sum(
        int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in engine.params)
    return engine
