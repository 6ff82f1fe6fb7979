"""A catalogue of bad inputs: each raises tvm_lite's documented error type (tvm_lite/errors.py)
with a message naming the cause, and leaves caches and artifacts as they were.

One tiny random-weight decoder (tiny-llama: 2 layers, hidden 64) is exported and compiled once
for the module; every case that needs an artifact damages a copy of it. ``CATALOGUE`` is the
table of the README's "Bad input" section: (case, error type, what the message must say).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import tvm_lite
from conftest import cnn_onnx_model
from tvm_lite.artifact import ArtifactError
from tvm_lite.checks import WeightsError
from tvm_lite.errors import CompileError, GenerationConfigError, TvmLiteError, UserError
from tvm_lite.export import ExportError
from tvm_lite.frontend import OnnxImportError
from tvm_lite.quant import QuantConfig
from tvm_lite.quant.format import QuantFormatError
from tvm_lite.quant.gptq import gptq
from tvm_lite.quant.rtn import rtn
from tvm_lite.rpc import RPCError
from tvm_lite.rpc.processes import connect_tracker
from tvm_lite.rpc.remote import request_session
from tvm_lite.tuning_db import TuningError
from tvm_lite.target import DeviceUnavailableError, TargetError, check_runnable

QUIET = dict(progress=lambda *_: None)


# -- shared inputs: one tiny export, one compile ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_decoder):
    """(HF folder, export folder, llvm artifact) of the tiny decoder (conftest.py), compiled once
    (cached under $TVM_LITE_CACHE like any artifact)."""
    hf, onnx_dir = tiny_decoder
    return hf, onnx_dir, tvm_lite.compile_model(onnx_dir, "llvm", **QUIET)


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    return tvm_lite.Engine(tiny[2], max_context=64)


def _digest(folder: Path) -> dict:
    """What a folder holds, file by file (to show a failed call left it as it was)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- the catalogue ---------------------------------------------------------------------------------
# Every case: (id, error type, message regex, function(ctx) that must raise it). ``ctx`` gives
# the tiny model's folders, a scratch folder and the shared engine.
class Ctx:
    def __init__(self, tiny, engine, tmp: Path):
        self.hf, self.onnx_dir, self.art = tiny
        self.engine, self.tmp = engine, tmp

    def artifact_copy(self, edit=None) -> Path:
        dst = _copy(self.art, self.tmp / "art")
        if edit:
            edit(dst)
        return dst

    def manifest_edit(self, **changes):
        def edit(dst):
            m = json.loads((dst / "manifest.json").read_text())
            m.update(changes)
            (dst / "manifest.json").write_text(json.dumps(m))
        return edit


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _onnx_file(ctx, mutate) -> Path:
    model = onnx.load(str(ctx.onnx_dir / "model.onnx"))
    mutate(model)
    path = ctx.tmp / "bad.onnx"
    onnx.save(model, str(path))
    return path


def _bad_bytes(ctx, name: str, data: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(data)
    return path


def _engine_of(ctx, edit):
    return tvm_lite.Engine(ctx.artifact_copy(edit))


def _generate(ctx, prompt="hi", **cfg):
    return ctx.engine.generate(prompt, tvm_lite.GenerationConfig(max_new_tokens=2, **cfg))


def _drop_first_node_input(model):
    node = model.graph.node[len(model.graph.node) // 2]
    node.input[0] = "no_such_tensor"


def _unknown_op(model):
    model.graph.node[3].op_type = "NoSuchOp"
    model.graph.node[3].domain = "com.example"


def _nan_weight(ctx):
    model = onnx.load(str(ctx.onnx_dir / "model.onnx"))
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(big).copy()
    arr.flat[7] = np.nan
    big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
    folder = _copy(ctx.onnx_dir, ctx.tmp / "nan_export")
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def _inf_matrix():
    w = np.ones((64, 32), np.float32)
    w[3, 4] = np.inf
    return w


def _foreign_tuning_db(path: Path) -> Path:
    """A MetaSchedule database holding one kernel of another model (a 7x7 scale)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def scale(a: T.Buffer((7, 7), "float32"), b: T.Buffer((7, 7), "float32")):
        for i, j in T.grid(7, 7):
            with T.sblock("b"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] * T.float32(3)

    path.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    mod = tvm.IRModule({"main": scale})
    workload = db.commit_workload(mod)
    db.commit_tuning_record(ms.database.TuningRecord(
        tvm.s_tir.Schedule(mod).trace, workload, [1e-6], tvm_lite.parse_target("llvm"),
        ms.arg_info.ArgInfo.from_prim_func(scale)))
    return path


def _mlp():
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class MLP:
        @R.function
        def main(x: R.Tensor((4, 16), "float32"), w: R.Tensor((16, 32), "float32")):
            with R.dataflow():
                y = R.nn.silu(R.matmul(x, w))
                R.output(y)
            return y

    return MLP


def _tvm_fails_inside():
    """A module TVM's own compiler rejects deep inside its passes: a shape var ``n`` that no input
    defines (VMShapeLower: "has not been computed")."""
    from tvm import relax, tirx

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    n = tirx.Var("n", "int64")
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.zeros(relax.ShapeExpr([n]), "float32")))
    return bb.get()


CATALOGUE = [
    # files: ONNX, GGUF, params, manifest, library, tokenizer
    ("ONNX file truncated", OnnxImportError, r"cannot read ONNX file .*bad\.onnx",
     lambda c: tvm_lite.from_onnx(_bad_bytes(c, "bad.onnx", (c.onnx_dir / "model.onnx")
                                             .read_bytes()[:5000]))),
    ("ONNX file of random bytes", OnnxImportError, r"cannot read ONNX file",
     lambda c: tvm_lite.from_onnx(_bad_bytes(c, "bad.onnx", os.urandom(4096)))),
    ("ONNX file missing", OnnxImportError, r"ONNX file not found: .*nope\.onnx",
     lambda c: tvm_lite.from_onnx(c.tmp / "nope.onnx")),
    ("ONNX node reads a tensor no node makes", OnnxImportError,
     r"node '.*' \(\w+\) reads 'no_such_tensor', which no graph input, initializer or earlier",
     lambda c: tvm_lite.from_onnx(_onnx_file(c, _drop_first_node_input))),
    ("ONNX op of an unknown domain", OnnxImportError, r"unsupported ONNX op: .*com\.example",
     lambda c: tvm_lite.from_onnx(_onnx_file(c, _unknown_op))),
    ("ONNX of a CNN given to compile_model", ArtifactError, r"not a decoder-with-past LLM",
     lambda c: tvm_lite.compile_model(_bad_bytes(c, "cnn.onnx", cnn_onnx_model().SerializeToString()),
                                      "llvm", out_dir=c.tmp / "out", **QUIET)),
    ("GGUF file truncated", ExportError, r"cannot read the GGUF file .*bad\.gguf",
     lambda c: tvm_lite.export_onnx(_bad_bytes(c, "bad.gguf", b"GGUF\x03\x00\x00\x00trunc"),
                                    out_dir=c.tmp / "e", **QUIET)),
    ("model source missing", ExportError, r"model source not found: .*none\.gguf",
     lambda c: tvm_lite.export_onnx(c.tmp / "none.gguf", out_dir=c.tmp / "e", **QUIET)),
    ("params.npz truncated", ArtifactError, r"cannot read the weights .*params\.npz",
     lambda c: _engine_of(c, lambda d: _truncate(d / "params.npz"))),
    ("params.npz with a weight missing", ArtifactError, r"params\.npz holds \d+ weights, the manifest",
     lambda c: _engine_of(c, lambda d: np.savez(d / "params.npz", p0=np.zeros(3)))),
    ("manifest.json corrupt", ArtifactError, r"corrupt .*manifest\.json",
     lambda c: _engine_of(c, lambda d: _truncate(d / "manifest.json"))),
    ("manifest.json missing", ArtifactError, r"not a tvm_lite artifact \(no manifest\.json\)",
     lambda c: _engine_of(c, lambda d: (d / "manifest.json").unlink())),
    ("artifact from another tvm_lite version", ArtifactError,
     r"built by tvm_lite 0\.0\.1; this is tvm_lite .*recompile",
     lambda c: _engine_of(c, c.manifest_edit(tvm_lite_version="0.0.1"))),
    ("artifact from another TVM version", ArtifactError, r"built with TVM 0\.19\.0",
     lambda c: _engine_of(c, c.manifest_edit(tvm_version="0.19.0"))),
    ("artifact for another target (Adreno OpenCL)", DeviceUnavailableError,
     r"no opencl runtime.*tvm-lite bench out/ --rpc",
     lambda c: _engine_of(c, c.manifest_edit(target_kind="opencl"))),
    ("artifact for another CPU (aarch64)", ArtifactError, r"built for aarch64-linux-android",
     lambda c: _engine_of(c, c.manifest_edit(
         target='{"kind": "llvm", "mtriple": "aarch64-linux-android"}'))),
    ("model.so truncated", ArtifactError, r"model\.so is truncated",
     lambda c: _engine_of(c, lambda d: _truncate(d / "model.so"))),
    ("tokenizer missing", ArtifactError, r"has no tokenizer\.json",
     lambda c: _engine_of(c, lambda d: (d / "tokenizer.json").unlink())),
    # requests
    ("empty prompt", GenerationConfigError, r"empty prompt", lambda c: _generate(c, "  ")),
    ("prompt past the context", tvm_lite.ContextLengthError, r"context",
     lambda c: _generate(c, "word " * 200)),
    ("temperature < 0", GenerationConfigError, r"temperature=-0\.5", lambda c: _generate(c, temperature=-0.5)),
    ("temperature NaN", GenerationConfigError, r"temperature=nan",
     lambda c: _generate(c, temperature=float("nan"))),
    ("top_p = 0", GenerationConfigError, r"top_p=0.*\(0, 1\]", lambda c: _generate(c, top_p=0.0)),
    ("top_p > 1", GenerationConfigError, r"top_p=1\.5", lambda c: _generate(c, top_p=1.5)),
    ("max_new_tokens = 0", GenerationConfigError, r"max_new_tokens=0",
     lambda c: c.engine.generate("hi", tvm_lite.GenerationConfig(max_new_tokens=0))),
    # weights
    ("NaN weight in the ONNX model", WeightsError, r"weight .* has 1 NaN/inf value",
     lambda c: tvm_lite.compile_model(_nan_weight(c), "llvm", out_dir=c.tmp / "out", **QUIET)),
    ("inf in a matrix to quantize", QuantFormatError, r"1 NaN/inf value",
     lambda c: rtn(_inf_matrix())),
    ("weights beyond fp16's range to quantize", QuantFormatError, r"beyond fp16's range",
     lambda c: gptq(
         np.full((64, 8), 1e6, np.float32), np.eye(64))),
    ("group size not a multiple of 8", QuantFormatError, r"group size must be a positive multiple of 8",
     lambda c: rtn(np.ones((64, 8)), "e0m4", 12)),
    ("unknown 4-bit format", QuantFormatError, r"--quant 'fp4': choose one of",
     lambda c: QuantConfig.parse("fp4")),
    # targets and devices
    ("unknown target kind", TargetError, r"unknown target kind 'opengl' .*known kinds: .*opencl",
     lambda c: tvm_lite.parse_target("opengl")),
    ("unknown device", TargetError, r"unknown device 'foo' for opencl.*adreno, mali",
     lambda c: tvm_lite.parse_target("opencl -device=foo")),
    ("unknown target option", TargetError, r"Unknown config option 'colour'. Known options",
     lambda c: tvm_lite.parse_target("opencl -colour=red")),
    ("unknown CUDA arch", TargetError, r"unknown CUDA arch 'sm_xx'",
     lambda c: tvm_lite.parse_target("cuda -arch=sm_xx")),
    ("Metal build run on Linux", DeviceUnavailableError, r"no metal runtime",
     lambda c: check_runnable("metal")),
    ("target without a code generator (Vulkan)", TargetError, r"no vulkan code generator",
     lambda c: tvm_lite.build(_mlp(), "vulkan")),
    # modules
    ("kv_cache='inplace' on a module without a KV cache", UserError, r"no present outputs",
     lambda c: tvm_lite.build(_mlp(), "llvm", kv_cache="inplace")),
    ("TVM fails inside its own pass", CompileError, r"compile failed \(llvm\), in pass VMShapeLower .*function main: InternalError",
     lambda c: tvm_lite.build(_tvm_fails_inside(), "llvm")),
    # tuning databases
    ("tuning database folder without records", TuningError,
     r"no MetaSchedule database .*database_workload\.json",
     lambda c: tvm_lite.build(_mlp(), "llvm", tuning_db=c.tmp)),
    ("tuning database of another model", TuningError,
     r"1 tuned kernel\(s\) \(scale\), none of them a kernel of this build",
     lambda c: tvm_lite.build(_mlp(), "llvm", tuning_db=_foreign_tuning_db(c.tmp / "db"))),
    # RPC
    ("RPC tracker unreachable", RPCError,
     r"no RPC tracker answers at 127\.0\.0\.1:9",
     lambda c: connect_tracker("127.0.0.1:9", timeout=1.0)),
    ("RPC address malformed", RPCError, r"bad address 'phone:x'",
     lambda c: request_session("phone:x", "k")),
]


@pytest.mark.parametrize("case, error, message, call", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_raises_the_documented_error(case, error, message, call, tiny, tiny_engine,
                                               tmp_path):
    before = _digest(tiny[2]), _digest(tiny[1])
    with pytest.raises(error, match=message) as info:
        call(Ctx(tiny, tiny_engine, tmp_path))
    assert isinstance(info.value, TvmLiteError)
    assert (_digest(tiny[2]), _digest(tiny[1])) == before  # the shared export and artifact intact
    leftovers = [p.name for p in tmp_path.glob(".*tmp-*")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


# -- RPC: unknown key, a server killed in the middle of a benchmark ---------------------------------
def test_rpc_unknown_key_and_server_killed_mid_bench(tiny):
    from tvm_lite.bench import bench_engine
    from tvm_lite.rpc.processes import LocalCluster
    from tvm_lite.rpc.remote import remote_engine

    base = 20000 + (os.getpid() * 7919) % 29000 // 200 * 200
    with LocalCluster(key="badinput", servers=1, tracker_port=base, server_port=base + 100) as farm:
        with pytest.raises(RPCError, match="no server under key 'nope'.*keys there: \\['badinput'\\]"):
            request_session(farm.address, "nope")
        engine = remote_engine(tiny[2], request_session(farm.address, "badinput"))
        assert bench_engine(engine, [16], decode_tokens=2, repeats=1)[0]["tokens"]
        farm.servers[0].kill()
        with pytest.raises(RPCError, match="lost the RPC server during (a new session|generation)"):
            bench_engine(engine, [16], decode_tokens=2, repeats=1)


# -- interrupted runs leave the cache usable ----------------------------------------------------------
class _Interrupt:
    """A progress callback that raises KeyboardInterrupt (Ctrl-C) at the message ``at``."""

    def __init__(self, at: str):
        self.at = at

    def __call__(self, msg: str):
        if msg.startswith(self.at):
            raise KeyboardInterrupt


def test_interrupted_compile_keeps_the_previous_artifact(tiny, tmp_path):
    _, onnx_dir, art = tiny
    out = _copy(art, tmp_path / "art")
    before = _digest(out)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while TVM compiles a forced rebuild
        tvm_lite.compile_model(onnx_dir, "llvm", out_dir=out, force=True,
                               progress=_Interrupt("compiling"))
    assert _digest(out) == before
    # no temporary directory left (the entry's lock file stays: it is the lock, not data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "art.lock"]
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        tvm_lite.compile_model(onnx_dir, "llvm", out_dir=fresh, progress=_Interrupt("compiling"))
    assert not fresh.exists()  # nothing half-written that a later run would take as built


def test_killed_compile_leaves_no_entry_and_the_next_run_cleans_up(tiny, tmp_path):
    """kill -9 in the middle of a compile: the entry does not exist, the killed run's temporary
    directory is removed by the next compile of that entry, which then succeeds."""
    _, onnx_dir, _ = tiny
    out = tmp_path / "art"
    code = (f"import os, signal, tvm_lite\n"
            f"def progress(msg):\n"
            f"    if msg.startswith('importing'): os.kill(os.getpid(), signal.SIGKILL)\n"
            f"tvm_lite.compile_model({str(onnx_dir)!r}, 'llvm', out_dir={str(out)!r}, "
            f"progress=progress)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    temps = list(tmp_path.glob(".art.tmp-*"))
    assert temps, "the killed compile left no temporary directory to clean up (test is vacuous)"
    tvm_lite.compile_model(onnx_dir, "llvm", out_dir=out, **QUIET)
    assert not any(p.exists() for p in temps)
    assert tvm_lite.Engine(out).generate("hi", tvm_lite.GenerationConfig(max_new_tokens=1))


def test_interrupted_export_leaves_nothing(tiny, tmp_path):
    hf = tiny[0]
    with pytest.raises(KeyboardInterrupt):
        tvm_lite.export_onnx(hf, out_dir=tmp_path / "e", exporter="torchscript",
                             progress=_Interrupt("exporting"))
    assert [p.name for p in tmp_path.iterdir()] == ["e.lock"]


def test_output_dir_of_other_files_is_refused(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="is not a tvm_lite artifact"):
        tvm_lite.compile_model(tiny[1], "llvm", out_dir=tmp_path, **QUIET)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tuning_record_cut_short_is_dropped_and_a_corrupt_line_named(tmp_path):
    from tvm_lite.tuning_db import RECORDS, check_database

    db = _foreign_tuning_db(tmp_path / "db")
    records = db / RECORDS
    whole = records.read_text()
    records.write_text(whole + whole[: len(whole) // 2])  # a killed tuner's half-appended line
    check_database(db)
    assert records.read_text() == whole
    records.write_text("{not json\n" + whole)
    with pytest.raises(TuningError, match="database_tuning_record.json, line 1"):
        check_database(db)


def test_unreadable_quantized_weights_cache_is_quantized_again(tiny, tmp_path, monkeypatch):
    from tvm_lite.quant import quantize_weights

    monkeypatch.setenv("TVM_LITE_CACHE", str(tmp_path))
    mod = tvm_lite.from_onnx(tiny[1] / "model.onnx")
    cfg = QuantConfig("e0m4", "rtn", 32, clip_search=False)
    first = quantize_weights(mod, cfg, progress=None)
    (entry,) = (tmp_path / "quant").glob("*.npz")
    _truncate(entry)
    again = quantize_weights(mod, cfg, progress=None)
    assert sorted(again) == sorted(first)
    name = sorted(first)[0]
    np.testing.assert_array_equal(again[name].codes, first[name].codes)
    assert [p.name for p in (tmp_path / "quant").iterdir()] == [entry.name]


# -- the command line: one line, exit status 2, --debug for the chain ---------------------------------
def test_cli_prints_one_line_and_exits_2(capsys):
    from tvm_lite import cli

    assert cli.main(["run", "--target", "opencl -device=adreno", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tvm-lite: error: ")
    assert "no opencl runtime" in err[0] and "tvm-lite bench out/ --rpc" in err[0]
    assert cli.main(["run", "--target", "opencl -device=foo", "hi"]) == 2
    assert "known devices: adreno, mali" in capsys.readouterr().err
    assert cli.main(["--debug", "run", "--top-p", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tvm-lite: error: top_p=2")


def test_cli_compile_error_is_one_line_naming_the_pass(tmp_path, capsys, monkeypatch):
    """A TVM failure inside compilation: one line naming stage, pass and function; exit 1 (not the
    user's fault); --debug shows TVM's original error chained."""
    from tvm_lite.errors import run_reporting_errors

    def build():
        tvm_lite.build(_tvm_fails_inside(), "llvm")

    assert run_reporting_errors(build) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "in pass VMShapeLower" in line and "function main" in line
    assert run_reporting_errors(build, debug=True) == 1
    err = capsys.readouterr().err
    assert "InternalError" in err and "The above exception was the direct cause" in err



def test_a_compile_error_crosses_a_process_boundary_whole():
    """A build in another process (``python -m tvm_lite.profile --jobs``) hands its CompileError
    back pickled: the same message, stage, pass and function (TVM's original as text only),
    where an unpicklable error left only "a process in the pool was terminated"."""
    import pickle

    with pytest.raises(CompileError) as caught:
        tvm_lite.build(_tvm_fails_inside(), "llvm")
    err = caught.value
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CompileError and str(back) == str(err)
    assert (back.stage, back.pass_name, back.function) == (err.stage, err.pass_name, err.function)
    assert back.pass_name == "VMShapeLower" and back.original is None

def _has_cuda_gpu() -> bool:
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # pylint: disable=broad-except
        return False


@pytest.mark.skipif(_has_cuda_gpu(), reason="checks the message of a machine without a CUDA GPU")
@pytest.mark.parametrize("module, argv", [
    ("tvm_lite.bench.attention", ["--contexts", "512"]),
    ("tvm_lite.bench.norm", ["--rows", "1"]),
    ("tvm_lite.bench.prefill", ["--parts", "gemm"]),
    ("tvm_lite.bench.gemv_plans", ["--model", "gemma-2b"]),
    ("tvm_lite.bench.window", []),
    ("tvm_lite.bench.greedy", []),
    ("tvm_lite.profile", ["--shapes", "smollm2-135m"]),
])
def test_gpu_benches_say_there_is_no_cuda_gpu(module, argv, tmp_path, monkeypatch):
    """The CUDA-only benches and the model profile, run where no CUDA GPU is, stop at once with
    a line naming the tool and the cause, not a traceback from torch or TVM's device API, and
    the profile exports and builds nothing first."""
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(argv)
    tool = module.removeprefix("tvm_lite.") if ".bench." in module else module
    assert str(info.value) == (f"{tool}: no CUDA GPU here (it times CUDA kernels through TVM "
                               "and torch; run it on the GPU machine)")
    assert not any(tmp_path.iterdir())
