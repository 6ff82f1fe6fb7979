"""The ``tvm-lite rpc ...``, ``tvm-lite tune`` and ``tvm-lite bench ARTIFACT`` commands."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from ..options import KV_CACHE_MODES, BuildOptions
from .processes import LOOPBACK


def _log(msg: str) -> None:
    print(f"[tvm-lite] {msg}", file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"tvm-lite: error: expected comma-separated integers, got {text!r}")


# -- tvm-lite rpc tracker | server | status -------------------------------------------------------
def _serve(proc) -> int:
    """Stay in the foreground until Ctrl-C / SIGTERM, then stop ``proc`` and its workers."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and proc.alive():
        stop.wait(0.5)
    died = not stop.is_set()
    proc.stop()
    if died:
        _log(f"the RPC {proc.kind} exited (code {proc.popen.returncode}); its log:\n"
             f"{proc.log_tail()}")
        return 1
    _log(f"RPC {proc.kind} stopped")
    return 0


def cmd_tracker(args) -> int:
    from .processes import start_tracker

    proc = start_tracker(args.host, args.port, args.port_end, log_dir=args.log_dir)
    print(f"RPC tracker listening on {proc.address} (log {proc.log_path}); Ctrl-C stops it",
          flush=True)
    return _serve(proc)


def cmd_server(args) -> int:
    from .processes import start_server

    proc = start_server(args.tracker, args.key, host=args.host, port=args.port,
                        port_end=args.port_end, log_dir=args.log_dir, no_fork=args.no_fork,
                        load_library=args.load_library, custom_addr=args.custom_addr)
    print(f"RPC server {proc.address} registered with the tracker {args.tracker} under key "
          f"{args.key!r} (log {proc.log_path}); Ctrl-C stops it", flush=True)
    return _serve(proc)


def cmd_status(args) -> int:
    from tvm_lite.bench import format_table

    from .processes import tracker_status

    status = tracker_status(args.tracker)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    rows = [{"key": k, "servers": v["total"], "free": v["free"], "busy": v["busy"],
             "queued requests": v["pending"]} for k, v in sorted(status["keys"].items())]
    print(f"tracker {args.tracker}")
    if rows:
        print(format_table(rows, list(rows[0])))
        servers = [{"key": s["key"], "server": f"{s['host']}:{s['port']}"}
                   for s in sorted(status["servers"], key=lambda s: (s["key"], s["port"] or 0))]
        if servers:
            print(format_table(servers, ["key", "server"]))
    else:
        print("no servers")
    return 0


# -- tvm-lite tune --------------------------------------------------------------------------------
def cmd_tune(args) -> int:
    from tvm_lite.bench import format_table
    from tvm_lite.cli_common import quant_config as _quant_config
    from tvm_lite.cli_common import resolve_onnx

    from tvm_lite.tune import extract_kernels, import_model, lower_for_tuning, tune_model, tuning_target

    onnx = resolve_onnx(args.model, args.exporter)
    if args.list:
        tgt = tuning_target(args.target, args.num_cores)
        mod = import_model(onnx, _quant_config(args), _log)
        tasks = extract_kernels(lower_for_tuning(mod, tgt, args.kv_cache), tgt)
        rows = [{"kernel": t.name, "calls": t.weight, "MFLOP": t.flops / 1e6,
                 "MFLOP x calls": t.total_flops / 1e6, "tunable": "yes" if t.static else
                 "no (dynamic shape)"} for t in tasks]
        print(format_table(rows, list(rows[0])))
        return 0
    if not args.db:
        raise SystemExit("tvm-lite tune: error: --db DIR is required (the MetaSchedule database)")
    report = tune_model(onnx, args.target, args.db, tracker=args.rpc, key=args.key,
                        trials=args.trials, top=args.top,
                        kernels=args.kernels.split(",") if args.kernels else None,
                        num_cores=args.num_cores, trials_per_iter=args.trials_per_iter,
                        population=args.population, min_repeat_ms=args.min_repeat_ms,
                        session_timeout=args.session_timeout,
                        server_wait=args.server_wait, baseline=not args.no_baseline,
                        progress=not args.json, kv_cache=args.kv_cache,
                        quant=_quant_config(args), log=_log)
    if args.json:
        print(json.dumps({"database": str(report.database), "kernels": report.kernels,
                          "trials": report.trials, "lost": report.lost,
                          "stopped": report.stopped, "seconds": report.seconds}, indent=1))
    else:
        print(report.table())
        _log(f"{report.trials} trials measured in {report.seconds:.0f} s"
             + (f", {report.lost} lost with their device (not recorded)" if report.lost else "")
             + f"; database {report.database} (build with --tuning-db {report.database})")
    if report.stopped:
        print(f"tvm-lite: error: tuning stopped: {report.stopped}. The records measured so far are "
              f"in {report.database}; rerun the same command to resume.", file=sys.stderr)
        return 3
    return 0


# -- tvm-lite bench ARTIFACT [--rpc] ---------------------------------------------------------------
def cmd_device_bench(args) -> int:
    from tvm_lite.artifact import load_manifest
    from tvm_lite.cli_common import resolve_artifact
    from tvm_lite.engine import Engine

    from tvm_lite.bench import bench_engine, format_rows
    from .remote import device_kind, remote_engine, request_session

    artifact = Path(args.artifact) if args.artifact else \
        resolve_artifact(args.model, args.target, args.exporter)
    manifest = load_manifest(artifact)
    device = args.device or device_kind(manifest)
    if args.rpc:
        if not args.key:
            raise SystemExit("tvm-lite bench: error: --rpc needs --key (the servers' tracker key)")
        _log(f"requesting a server under {args.key!r} from the tracker at {args.rpc}")
        session = request_session(args.rpc, args.key, session_timeout=args.session_timeout)
        engine = remote_engine(artifact, session, device)
        _log(f"uploaded {engine.link.upload_bytes / 1e6:.0f} MB in {engine.link.upload_seconds:.1f} s; "
             f"running on the remote {device}")
        where = f"rpc {args.rpc} key {args.key}"
    else:
        engine = Engine(artifact, device=device)
        where = "local"
    lens = _int_list(args.prompt_len) if args.prompt_len else [64, 256, 1024]
    rows = bench_engine(engine, lens, args.decode_tokens, args.repeats,
                        progress=None if args.json else _log)
    info = {"artifact": str(artifact), "target": manifest.get("target"), "device": device,
            "where": where, "rpc": args.rpc, "key": args.key,
            "tuned_kernels": manifest.get("tuned_kernels")}
    if args.rpc:
        info["upload_seconds"] = engine.link.upload_seconds
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=1))
    else:
        print(f"{manifest.get('model', {}).get('architecture', 'model')} on {device} ({where}), "
              f"target {manifest.get('target_kind')}")
        print(format_rows(rows))
    return 0


# -- registration ---------------------------------------------------------------------------------
def add_commands(sub) -> None:
    """Add ``rpc`` and ``tune`` to the ``tvm-lite`` subcommands."""
    p = sub.add_parser("rpc", help="TVM RPC tracker/servers for devices (phones, a farm)")
    rsub = p.add_subparsers(dest="rpc_command", required=True)

    t = rsub.add_parser("tracker", help="run TVM's RPC tracker (foreground; Ctrl-C stops it)")
    t.add_argument("--host", default=LOOPBACK, help="address to bind (default: loopback only)")
    t.add_argument("--port", type=int, default=9190)
    t.add_argument("--port-end", type=int, default=None, help="search ports up to this one")
    t.add_argument("--log-dir", default=None)
    t.set_defaults(fn=cmd_tracker)

    s = rsub.add_parser("server", help="run TVM's RPC server under a key (foreground)")
    s.add_argument("--key", required=True, help="the device kind, e.g. android, cuda, local")
    s.add_argument("--tracker", default=f"{LOOPBACK}:9190", help="HOST:PORT of the tracker")
    s.add_argument("--host", default=LOOPBACK, help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--port-end", type=int, default=None)
    s.add_argument("--no-fork", action="store_true", help="spawn session processes (OpenCL)")
    s.add_argument("--load-library", default=None)
    s.add_argument("--custom-addr", default=None, help="address to report to the tracker")
    s.add_argument("--log-dir", default=None)
    s.set_defaults(fn=cmd_server)

    q = rsub.add_parser("status", help="keys and free/busy servers at a tracker")
    q.add_argument("--tracker", default=f"{LOOPBACK}:9190")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_status)

    p = sub.add_parser("tune", help="tune the model's kernels with MetaSchedule (over RPC)")
    p.add_argument("model", nargs="?", default=None,
                   help="ONNX file or export dir (or .gguf / HF folder; default: SmolLM2)")
    p.add_argument("--target", default="llvm")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--db", default=None, help="the MetaSchedule database directory")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT", help="the tracker to measure on")
    p.add_argument("--key", default=None, help="the tracker key of the device servers")
    p.add_argument("--trials", type=int, default=64, help="trial budget, split over the kernels")
    p.add_argument("--top", type=int, default=4, help="tune the N kernels with the most FLOPs")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names (see --list)")
    p.add_argument("--list", action="store_true", help="list the model's kernels and exit")
    p.add_argument("--num-cores", type=int, default=None, help="CPU targets: the device's cores")
    p.add_argument("--trials-per-iter", type=int, default=16)
    p.add_argument("--population", type=int, default=256, help="evolutionary search population")
    p.add_argument("--min-repeat-ms", type=int, default=0,
                   help="measure each candidate for at least this long (noisy devices)")
    p.add_argument("--session-timeout", type=float, default=60.0,
                   help="RPC session limit per measurement (s)")
    p.add_argument("--server-wait", type=float, default=60.0,
                   help="stop when no server is under the key for this long (s)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not measure tvm_lite's own schedule of each kernel")
    p.add_argument("--kv-cache", default=BuildOptions.kv_cache, choices=KV_CACHE_MODES,
                   help="as the build will use (it decides the kernels)")
    from tvm_lite.cli_common import add_quant_args

    add_quant_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_tune)


def add_bench_args(p) -> None:
    """``tvm-lite bench``'s device-benchmark arguments."""
    p.add_argument("artifact", nargs="?", default=None,
                   help="a compiled artifact dir: benchmark it on a device (local or --rpc)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT", help="the tracker")
    p.add_argument("--key", default=None, help="the tracker key of the device servers")
    p.add_argument("--device", default=None, help="cpu, cuda, opencl... (default: the target's)")
    p.add_argument("--session-timeout", type=float, default=0,
                   help="RPC session limit in s (0: none)")
