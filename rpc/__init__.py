"""tvm_lite.rpc: devices behind TVM's RPC tracker (phones, or a farm): processes and sessions.

Everything goes through TVM's own RPC: ``tvm.exec.rpc_tracker`` / ``rpc_server`` processes
(a phone runs TVM's Android RPC app instead), ``tvm.rpc`` sessions, MetaSchedule's ``RPCRunner``.

    processes.py   start/stop trackers and servers on loopback; tracker status; LocalCluster
    remote.py      an Engine whose model runs in an RPC session (upload, load, weights)
    cli.py         tvm-lite rpc tracker|server|status, tvm-lite tune, tvm-lite bench ARTIFACT
    loopback.py    local vs RPC bench on one machine (rpc/gpu_loopback.sh on the GPU machine)

MetaSchedule tuning through the tracker is ``tvm_lite.tune`` (``tune_model``); the benchmark
that runs here is ``tvm_lite.bench.bench_engine``.
"""

_EXPORTS = {
    "RPCError": "processes",
    "LocalCluster": "processes",
    "start_tracker": "processes",
    "start_server": "processes",
    "tracker_status": "processes",
    "wait_for_servers": "processes",
    "request_session": "remote",
    "remote_engine": "remote",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tvm_lite.rpc' has no attribute {name!r}")


__all__ = list(_EXPORTS)
