"""RPC: real TVM tracker and server processes on 127.0.0.1, the compiled SmolLM2, MetaSchedule.

One tracker with two servers under one key stands in for a farm of phones; the phone path differs
only in the key, the target and the cross-compiler.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import PROMPTS
from tvm_lite import convention as cv

pytestmark = pytest.mark.slow
KEY = "tvm-lite-ci"
# the decode o projection GEMV: [1, 576] x [576, 576] (weights panel-major, as a CPU build
# stores them), 30 calls per step: the smallest GEMV left once q/k/v and gate/up are merged
KERNEL = "matmul_1x1x576x576_float32_p32"


def _ports():
    base = random.Random(os.getpid() + time.time_ns()).randrange(20000, 50000, 200)
    return base, base + 100


def _rpc_processes():
    """Our descendants that are TVM RPC trackers, servers or their workers."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "tvm.exec.rpc_" in cmd or "tvm.exec.popen_worker" in cmd or "rpc tracker" in cmd \
                or "rpc server" in cmd:
            out.append((p.pid, cmd))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tvm_lite.rpc.processes import LocalCluster

    tracker_port, server_port = _ports()
    c = LocalCluster(key=KEY, servers=2, tracker_port=tracker_port, server_port=server_port,
                     log_dir=tmp_path_factory.mktemp("rpc_logs")).start()
    groups = [p.pid for p in c.processes()]
    yield c
    c.stop()
    from tvm_lite.rpc.processes import _group_members

    assert all(not _group_members(g) for g in groups), "RPC processes survived stop()"
    assert _rpc_processes() == []


def _sessions(server) -> int:
    return server.log_path.read_text(errors="replace").count("connected from")


def _loaded(server) -> int:
    """Kernels the server has loaded: a measurement is under way once it logs one."""
    return server.log_path.read_text(errors="replace").count("load_module")


def test_tracker_and_server_commands_start_list_and_stop(tmp_path):
    """`tvm-lite rpc tracker|server|status`: loopback only, and nothing left after SIGTERM."""
    from tvm_lite.rpc.processes import tracker_status

    port, server_port = _ports()
    exe = [sys.executable, "-m", "tvm_lite.cli", "rpc"]
    tracker = subprocess.Popen([*exe, "tracker", "--port", str(port), "--log-dir", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        line = tracker.stdout.readline()
        assert f"RPC tracker listening on 127.0.0.1:{port}" in line, line
        server = subprocess.Popen([*exe, "server", "--key", "cli", "--tracker",
                                   f"127.0.0.1:{port}", "--port", str(server_port), "--log-dir",
                                   str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        line = server.stdout.readline()
        assert "registered with the tracker" in line and "'cli'" in line, line
        status = json.loads(subprocess.run([*exe, "status", "--tracker", f"127.0.0.1:{port}",
                                            "--json"], capture_output=True, text=True,
                                           check=True).stdout)
        assert status["keys"]["cli"] == {"total": 1, "free": 1, "busy": 0, "pending": 0}
        (srv,) = status["servers"]
        assert srv["host"] == "127.0.0.1" and server_port <= srv["port"] < server_port + 100
        # bound to loopback only
        listening = {(c.laddr.ip, c.laddr.port) for p in psutil.Process(tracker.pid).children(
            recursive=True) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}
        table = subprocess.run([*exe, "status", "--tracker", f"127.0.0.1:{port}"],
                               capture_output=True, text=True, check=True).stdout
        assert "| cli" in table and "free" in table
        tree = [p.pid for proc in (tracker, server)
                for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 4  # each: the TVM process and its popen_worker
    finally:
        for proc in (server, tracker):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
    assert not [p for p in tree if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(Exception, match="no RPC tracker answers"):
        tracker_status(f"127.0.0.1:{port}")


def test_bench_over_rpc_generates_the_local_tokens(cluster, artifact, engine):
    """`tvm-lite bench --rpc ... ARTIFACT --json` runs the engine's loop on the remote device, with
    the default (in-place KV cache) artifact: its caches and workspaces live on the server."""
    from tvm_lite.bench import bench_engine, format_rows

    local = bench_engine(engine("dynamo"), [16, 64], decode_tokens=8, repeats=2)
    out = subprocess.run(
        [sys.executable, "-m", "tvm_lite.cli", "bench", str(artifact("dynamo")), "--rpc",
         cluster.address, "--key", KEY, "--prompt-len", "16,64", "--decode-tokens", "8",
         "--repeats", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    remote = json.loads(out.stdout)
    assert remote["where"] == f"rpc {cluster.address} key {KEY}" and remote["device"] == "cpu"
    assert [r["prompt_len"] for r in remote["rows"]] == [16, 64]
    for ours, theirs in zip(local, remote["rows"]):
        assert len(theirs["tokens"]) == 9  # the prefill's token + 8 decoded
        assert theirs["tokens"] == ours["tokens"], theirs["prompt_len"]
        for what in ("prefill", "decode"):
            assert 0 < theirs[f"{what}_min"] <= theirs[f"{what}_tok_s"] <= theirs[f"{what}_max"]
    table = format_rows(remote["rows"])
    assert "prefill tok/s" in table and "| 64" in table
    assert any(_sessions(s) for s in cluster.servers)


def test_remote_engine_in_place_chunks_sessions_and_copy(cluster, artifact):
    """In place over RPC, logits equal the local ones through chunked, padded prefill and decode,
    with two sessions interleaved (each its own server-side caches); the weights sit in one
    server-side tuple, so a step sends 7 arguments, not one more per weight; bad calls are clear
    errors; a past/present (copy) artifact runs over RPC too (its weights as separate tensors)."""
    from tvm_lite.engine import ContextLengthError, Engine, GenerationConfig, Session
    from tvm_lite.rpc.remote import remote_engine, request_session
    from tvm_lite.runners import InPlace, PastPresent, RemoteInPlace

    opts = dict(max_context=96, prefill_chunk=16, buckets=(16,))
    local = Engine(artifact("dynamo"), **opts)
    remote = remote_engine(artifact("dynamo"), request_session(cluster.address, KEY), **opts)
    assert isinstance(remote.runner, RemoteInPlace) and type(local.runner) is InPlace
    assert remote.convention["weights"]["tupled"] and len(remote.runner.param_args) == 1
    assert len(remote.params) == len(local.params) > 150  # 184 in this export (274 before q/k/v and gate/up were merged)
    assert remote.workspace_total_bytes == local.workspace_total_bytes > 0
    prompts = [list(range(100, 140)), list(range(300, 321))]  # 40 = 16+16+8 (padded), 21 = 16+5
    ours = [local.new_session() for _ in prompts]
    theirs = [remote.new_session() for _ in prompts]
    for a, b, ids in zip(ours, theirs, prompts):
        np.testing.assert_array_equal(local.prefill(a, ids), remote.prefill(b, ids))
        assert b.last_call == a.last_call == ("prefill", 16) and b.length == len(ids)
    for step in range(3):  # the two sessions interleaved, step by step
        for a, b in zip(ours, theirs):
            token = 42 + step
            np.testing.assert_array_equal(local.forward(a, [token]), remote.forward(b, [token]))
            assert b.last_call == ("decode", 1)
            # ids, mask, positions, past_len, the caches, the workspaces, the weights
            assert remote.last_call_args == 7
            assert local.last_call_args == 4 + 60 + len(local.runner.workspace["decode"]) + len(local.params)
    # a wrong buffer tuple is a clear error from the server, and the link stays usable
    wrong = Session(past=remote.runner.workspace["decode"][0])
    with pytest.raises(Exception, match=r"(?s)param=kv_caches.*expect a Tuple with 60 elements"):
        remote.forward(wrong, [7])
    with pytest.raises(ContextLengthError, match="exceeds max_context=96"):
        remote.prefill(theirs[0], [7] * 60)
    np.testing.assert_array_equal(local.forward(ours[0], [9]), remote.forward(theirs[0], [9]))
    # greedy steps: the token is taken on the server; a step is one shape and one call with the
    # 3 tuples, and the same token comes back as the local logits' argmax
    assert remote.runner.greedy_steps and local.runner.greedy_steps
    for a, b in zip(ours, theirs):
        want = int(np.argmax(local.forward(a, [21])[-1]))
        assert remote.decode_greedy(b, 21) == want and remote.last_call_args == 4
    # a prompt's chunks before its last run prefill_chain on the server (K/V rows only, no
    # logits, nothing read back; its workspace was sized for it): the same token
    fresh, calls, call = remote.new_session(), [], remote._call
    remote._call = lambda function, args, **kw: calls.append(function) or call(function, args, **kw)
    assert remote.runner.prefill_chain
    assert remote.prefill_greedy(fresh, prompts[0]) == \
        int(np.argmax(local.prefill(local.new_session(), prompts[0])))
    assert calls == [cv.PREFILL_CHAIN] * 2 + [cv.PREFILL_STEP]  # 40 tokens: 16 + 16 + 8
    del remote._call  # the method again
    # decode steps queued on the server (decode_chain: each step's token stays there and feeds
    # the next; the client reads them three at a time): the local one-by-one tokens
    remote.run_ahead = 3
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    assert remote.generate(np.array(prompts[1]), cfg).token_ids == \
        local.generate(np.array(prompts[1]), cfg).token_ids
    del remote, theirs, fresh

    copy = remote_engine(artifact("dynamo", "copy"), request_session(cluster.address, KEY),
                         max_context=96)
    assert isinstance(copy.runner, PastPresent)
    cfg = GenerationConfig(max_new_tokens=4, stop_token_ids=())
    ids = np.array(prompts[1])
    assert copy.generate(ids, cfg).token_ids == \
        Engine(artifact("dynamo", "copy"), max_context=96).generate(ids, cfg).token_ids


def test_rpc_errors_name_the_cause(cluster, artifact, tmp_path, monkeypatch):
    from tvm_lite import cli
    from tvm_lite.rpc.processes import RPCError
    from tvm_lite.rpc.remote import remote_engine, request_session
    from tvm_lite.tune import TuningError, check_database, make_runner, tune_model

    with pytest.raises(RPCError, match="no server under key 'phone'"):
        request_session(cluster.address, "phone")
    with pytest.raises(RPCError, match="no server under key 'phone'"):
        make_runner(cluster.address, "phone")
    # an in-place artifact without the tuple entry points (built before them): refused before
    # the weights are uploaded, with what to do
    monkeypatch.setattr("tvm_lite.rpc.remote.TUPLED_ENTRIES",
                        ("alloc_kv_caches", "prefill_tupled", "decode_tupled", "no_such_entry"))
    with pytest.raises(RPCError, match="has no no_such_entry .*recompile it"):
        remote_engine(artifact("dynamo"), request_session(cluster.address, KEY))
    monkeypatch.undo()
    with pytest.raises(TuningError, match="database_tuning_record.json"):
        check_database(tmp_path)
    assert cli.main(["compile", str(tmp_path / "model.onnx"), "--tuning-db", str(tmp_path)]) == 2
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(TuningError, match="TVM_NDK_CC"):
        tune_model(tmp_path / "model.onnx", "opencl -device=adreno", tmp_path / "db")


class _KillMidMeasurement(threading.Thread):
    """Kill ``server`` (its whole process group, as when a phone is unplugged) as soon as it has
    loaded a kernel to measure, once ``min_records`` records are in the database."""

    def __init__(self, server, db: Path, min_records: int):
        super().__init__(daemon=True)
        self.server, self.db, self.min_records = server, db, min_records
        self.records_at_kill: list[str] = []
        self.sessions_of: dict = {}
        self.done = threading.Event()

    def records(self) -> list[str]:
        f = self.db / "database_tuning_record.json"
        return f.read_text().splitlines() if f.exists() else []

    def run(self):
        while len(self.records()) < self.min_records and not self.done.is_set():
            time.sleep(0.05)
        n = _loaded(self.server)
        while _loaded(self.server) == n and not self.done.is_set():
            time.sleep(0.02)
        if not self.done.is_set():
            self.records_at_kill = self.records()
            self.server.kill()


def test_tune_over_rpc_loses_servers_resumes_and_builds(cluster, export_dir, artifact, engine,
                                                        tmp_path):
    """MetaSchedule through an RPCRunner on the farm: a server lost mid-measurement, then the
    last one; records kept; a rerun resumes; the build uses the records, same tokens."""
    import tvm_lite
    from tvm_lite.artifact import compile_model, load_manifest
    from tvm_lite.engine import Engine, GenerationConfig
    from tvm_lite.tune import tune_model, tuning_target, weights_as_built
    from tvm_lite.tuning_db import (RECORDS, RULES, measured, open_database,
                                    records_faster_than_rules)

    db = tmp_path / "db"
    mod = weights_as_built(tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx"),
                           tuning_target("llvm"), log=None)
    opts = dict(tracker=cluster.address, key=KEY, kernels=[KERNEL], trials_per_iter=8,
                population=64, min_repeat_ms=300, server_wait=10, progress=False,
                log=lambda *_: None)
    first, second = cluster.servers

    # 1. two servers measure in parallel; the first dies in the middle of a measurement
    killer = _KillMidMeasurement(first, db, min_records=8)
    killer.start()
    r1 = tune_model(mod, "llvm", db, trials=16, baseline=False, **opts)
    killer.done.set()
    print("run 1\n" + r1.table(), r1.trials, r1.lost)
    assert not first.alive() and not first.members()
    assert r1.stopped is None
    assert _sessions(first) >= 1 and _sessions(second) >= 1  # both measured
    lines = (db / RECORDS).read_text().splitlines()
    assert killer.records_at_kill and set(killer.records_at_kill) <= set(lines)
    # the measurement in flight was lost with its server and is not recorded as a failure
    assert r1.lost >= 1 and "device lost" in (db / "logs" / "tvm_lite_failures.log").read_text()
    assert r1.trials + r1.lost == 16 and len(lines) == r1.trials
    assert r1.kernels[0]["kernel"] == KERNEL and r1.kernels[0]["records"] >= 8

    # 2. the last server dies too: a clear stop, nothing measured is lost
    killer = _KillMidMeasurement(second, db, min_records=len(lines) + 1)
    killer.start()
    r2 = tune_model(mod, "llvm", db, trials=32, baseline=False, **opts)
    killer.done.set()
    print("run 2\n" + r2.table(), r2.trials, r2.lost, r2.stopped)
    assert r2.stopped and f"no RPC server left under key '{KEY}'" in r2.stopped
    after = (db / RECORDS).read_text().splitlines()
    assert set(lines) <= set(after) and set(killer.records_at_kill) <= set(after)
    assert len(after) < 32

    # 3. a server comes back: the rerun resumes from the database up to the budget
    cluster.add_servers(1)
    kernel = _kernel(mod)
    valid = len(measured(open_database(db), kernel))
    r3 = tune_model(mod, "llvm", db, trials=32, **opts)
    print("run 3\n" + r3.table(), r3.trials, r3.lost)
    assert r3.stopped is None
    row = r3.kernels[0]
    assert row["before"] == valid and 0 < valid < 32
    assert row["measured"] == r3.trials == 32 - valid - r3.lost
    assert row["records"] == len(measured(open_database(db), kernel)) > valid
    assert row["rules us"] > 0 and row["speedup"] == row["rules us"] / row["best us"]
    assert len((db / RECORDS).read_text().splitlines()) == r1.trials + r2.trials + r3.trials
    assert _rpc_processes_of_tuning() == []

    # 4. a build uses a tuned kernel only where it beat the rules' time kept next to the records
    rules = json.loads((db / RULES).read_text())
    assert list(rules.values()) == [pytest.approx(row["rules us"] / 1e6)]
    skipped = []
    records_faster_than_rules(db, skipped)
    assert len(skipped) == (row["best us"] >= row["rules us"])
    # without a rules time (a database tuned with baseline=False) the records are applied: the
    # build uses the tuned kernel and still generates the same tokens
    shutil.copytree(db, tmp_path / "db_records_only")
    (tmp_path / "db_records_only" / RULES).unlink()
    tuned = compile_model(export_dir("dynamo"), "llvm", out_dir=tmp_path / "tuned",
                          tuning_db=tmp_path / "db_records_only", progress=lambda *_: None)
    manifest = load_manifest(tuned)
    assert manifest["tuned_kernels"] == [KERNEL] and manifest["options"]["decode_function"]
    cfg = GenerationConfig(max_new_tokens=16, stop_token_ids=())
    ours = Engine(tuned)
    for prompt in PROMPTS:
        ids = np.array(engine("dynamo").encode_prompt(prompt))
        assert ours.generate(ids, cfg).token_ids == engine("dynamo").generate(ids, cfg).token_ids


def _kernel(mod):
    from tvm_lite.tune import extract_kernels, lower_for_tuning, select_kernels, tuning_target

    tgt = tuning_target("llvm")
    return select_kernels(extract_kernels(lower_for_tuning(mod, tgt), tgt), [KERNEL])[0].mod


def _rpc_processes_of_tuning():
    """MetaSchedule's builder/runner workers of this process (trackers/servers excluded)."""
    return [(pid, cmd) for pid, cmd in _rpc_processes()
            if "popen_worker" in cmd and psutil.Process(pid).ppid() == os.getpid()]


def test_cuda_tuning_space_of_a_4bit_decode_gemv_builds():
    """TVM 0.27's MultiLevelTilingTensorCore fails on an M = 1 dequant GEMV for CUDA ("Back
    optional access", which stopped the H200 tuning session); the space is built without it."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tvm_lite.quant.kernels import matmul_func
    from tvm_lite.tune import design_space, tuning_target

    gemv = matmul_func("e0m4", (1, 1), 576, 4096, 32, "float16")
    mod = tvm.IRModule({"main": gemv.with_attr("global_symbol", "main")})
    target = tuning_target("cuda -arch=sm_90")
    full = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                          task_name="full")
    with pytest.raises(Exception):  # the TVM bug itself: if this passes, the workaround can go
        full.generate_design_space()
    space, dropped = design_space(mod, target)
    assert set(dropped) == {"MultiLevelTilingTensorCore"}
    ctx = ms.TuneContext(mod=mod, target=target, space_generator=space, task_name="gemv")
    assert len(ctx.generate_design_space()) >= 1
    assert design_space(mod, tuning_target("llvm")) == ("post-order-apply", [])
