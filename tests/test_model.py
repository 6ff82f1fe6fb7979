"""tvm_lite on the real SmolLM2-135M-Instruct, exported by both of torch's ONNX exporters."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROMPTS
from tvm_lite.engine import ContextLengthError, GenerationConfig

pytestmark = pytest.mark.slow
EXPORTERS = ["dynamo", "torchscript"]
NEW_TOKENS = 32


def _hf_greedy(hf_model, ids, n):
    import torch

    model, _ = hf_model
    seq = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq, use_cache=False).logits[0, -1]
            token = int(torch.argmax(logits))
            out.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_greedy_tokens_match_transformers(exporter, engine, hf_model):
    eng = engine(exporter)
    for prompt in PROMPTS:
        ids = eng.encode_prompt(prompt)
        ours = eng.generate(np.array(ids), GenerationConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=()))
        assert len(ours.token_ids) == NEW_TOKENS
        assert ours.token_ids == _hf_greedy(hf_model, ids, NEW_TOKENS), prompt


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_imported_module_has_symbolic_dims_and_no_shape_kernels(exporter, export_dir):
    import tvm_lite
    from tvm_lite.analysis import shape_computing_calls, symbolic_dims, unknown_shape_tensors

    mod = tvm_lite.from_onnx(export_dir(exporter) / "model.onnx")
    assert {v.name for v in symbolic_dims(mod)} == {"seq", "past_seq"}
    assert shape_computing_calls(mod) == []  # no shape_of / shape_to_tensor / tensor_to_shape
    assert unknown_shape_tensors(mod) == 0  # every tensor has a symbolic shape expression
    text = mod["main"].script(show_meta=False)
    assert "R.Tensor((1, seq, 49152)" in text  # logits
    assert "R.Tensor((1, 3, past_seq + seq, 64)" in text  # presents: shape expression
    stats = mod.attrs["tvm_lite.import_stats"]
    assert int(stats["host_evaluated"]) > 0


def test_chunked_prefill_equals_one_call(engine):
    eng = engine("dynamo")
    ids = eng.encode_prompt(PROMPTS[1])
    one = eng.prefill(eng.new_session(), ids)
    chunked = eng.prefill(eng.new_session(), ids, chunk_size=len(ids) // 2 + 1)
    # fp32: the two orders of summation differ only in rounding
    np.testing.assert_allclose(chunked, one, rtol=1e-4, atol=2e-4)
    assert int(np.argmax(chunked)) == int(np.argmax(one))


@pytest.mark.parametrize("kv_cache", ["inplace", "copy"])
def test_kv_copy_counter_and_context_limit(artifact, kv_cache):
    from tvm_lite.engine import Engine

    eng = Engine(artifact("dynamo", kv_cache), max_context=48)
    session = eng.new_session()
    ids = eng.encode_prompt("Hi")
    eng.prefill(session, ids)
    eng.forward(session, [ids[-1]])
    per_token = 2 * eng.num_layers * eng.kv_heads * eng.head_dim * 4
    expected = 0 if kv_cache == "inplace" else per_token * len(ids)
    assert session.last_step_kv_bytes_copied == expected
    before = session.length
    with pytest.raises(ContextLengthError, match="max_context=48"):
        eng.prefill(session, list(range(100, 160)))
    assert session.length == before  # nothing ran, the session stays usable
    eng.forward(session, [ids[-1]])
    assert session.length == before + 1


def test_sampling_is_seeded(engine):
    eng = engine("dynamo")
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, stop_token_ids=())
    a = eng.generate(PROMPTS[1], cfg).token_ids
    b = eng.generate(PROMPTS[1], cfg).token_ids
    c = eng.generate(PROMPTS[1], GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9,
                                                  seed=8, stop_token_ids=())).token_ids
    assert a == b and a != c


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tvm_lite.cli", *args], capture_output=True,
                          text=True, env=env, timeout=1200)


def test_cli_run_answers_paris(artifact):
    res = _cli("run", "What is the capital of France?", "--model", str(artifact("dynamo")))
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "prefill" in res.stderr and "tok/s" in res.stderr


def test_artifact_loads_in_runtime_only_tvm(artifact, engine):
    """The artifact directory loads with TVM_USE_RUNTIME_LIB=1 (no compiler) and generates the
    same greedy tokens as in-process."""
    path = artifact("dynamo")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["num_layers"] == 30 and manifest["tvm_lite_version"]
    code = (
        "import sys, json, tvm, numpy as np\n"
        "assert not hasattr(tvm, 'relax') or 'tvm.relax' not in sys.modules\n"
        "from tvm_lite.engine import Engine, GenerationConfig\n"
        f"e = Engine({str(path)!r})\n"
        "r = e.generate('What is the capital of France?', GenerationConfig(max_new_tokens=8))\n"
        "assert 'tvm.relax' not in sys.modules\n"
        "print(json.dumps(r.token_ids))\n"
    )
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    remote = json.loads(res.stdout.strip().splitlines()[-1])
    local = engine("dynamo").generate("What is the capital of France?",
                                      GenerationConfig(max_new_tokens=8)).token_ids
    assert remote == local


def test_compile_is_cached(export_dir, artifact):
    from tvm_lite.artifact import compile_model

    path = artifact("dynamo")
    stamp = (path / "model.so").stat().st_mtime
    assert compile_model(export_dir("dynamo"), "llvm") == path
    assert (path / "model.so").stat().st_mtime == stamp


def test_builds_with_the_same_weights_share_one_file(tmp_path, monkeypatch):
    """params.npz of two artifacts with the same weights is one file on disk (a hard link to the
    cache's weight store); other weights get their own; a stored copy no artifact links to any
    more is removed at the next save."""
    import numpy as np

    from tvm_lite.artifact import WEIGHT_STORE, save_params

    monkeypatch.setenv("TVM_LITE_CACHE", str(tmp_path / "cache"))
    w = [np.arange(6, dtype="float32").reshape(2, 3), np.ones(4, "float16")]
    a, b, c = (tmp_path / n / "params.npz" for n in "abc")
    save_params(a, w)
    save_params(b, [x.copy() for x in w])
    assert a.stat().st_ino == b.stat().st_ino and a.stat().st_nlink == 3
    save_params(c, [w[0], w[1] + 1])
    assert c.stat().st_ino != a.stat().st_ino
    with np.load(c) as z:
        assert np.array_equal(z["p0"], w[0]) and np.array_equal(z["p1"], w[1] + 1)
    store = tmp_path / "cache" / WEIGHT_STORE
    assert len(list(store.glob("*.npz"))) == 2
    c.unlink()
    save_params(a.parent / "again.npz", w)
    assert len(list(store.glob("*.npz"))) == 1  # c's weights went with c


def test_a_library_rebuilt_at_the_same_path_is_loaded_anew(tmp_path):
    """dlopen returns the library it already loaded from a path name: the engine's loader must
    not run an old model from a folder rebuilt (or a temporary folder reused) in this process."""
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    from tvm_lite.engine import load_library

    def library(add: float):
        @T.prim_func
        def main(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
            for i in range(4):
                b[i] = a[i] + T.float32(add)

        return tvm.compile(tvm.IRModule({"main": main}), target="llvm")

    path = tmp_path / "model.so"
    outs = []
    for add in (1.0, 2.0):
        library(add).export_library(str(path))
        a, b = tvm.runtime.tensor(np.zeros(4, "float32")), tvm.runtime.empty((4,), "float32")
        load_library(path)["main"](a, b)
        outs.append(b.numpy()[0])
    assert outs == [1.0, 2.0]


def test_adreno_build_emits_opencl_for_the_whole_model(opencl_source):
    src = opencl_source("adreno")
    kernels = src.count("__kernel void")
    assert kernels > 50
    # the matmuls, the attention (fused, or its softmax) and the norms
    # (relax_passes/fuse_add_rms_norm.py) all became OpenCL kernels
    assert "attention_decode" in src or "softmax" in src
    for name in ("matmul", "rms_norm"):
        assert f"__kernel void {name}" in src or f"void fused_{name}" in src or name in src
    assert "get_local_id" in src  # scheduled onto work-items, not single-threaded


def _hold_lock(path, seconds, out):
    import time

    from tvm_lite.export import cache_lock

    with cache_lock(path):
        start = time.monotonic()
        time.sleep(seconds)
        out.put((start, time.monotonic()))


def test_cache_lock_lets_one_process_build_an_entry_at_a_time(tmp_path):
    """Exports and artifacts are built under a lock on their cache entry, so two processes (test
    workers, shells) asking for the same one never write it at the same time: one waits."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hold_lock, args=(tmp_path / "entry", 1.0, out)) for _ in range(2)]
    for p in procs:
        p.start()
    spans = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert spans[1][0] >= spans[0][1]  # the second held it only after the first let go
    assert (tmp_path / "entry.lock").exists()
