"""The in-place KV cache (relax_passes/inplace_kv_cache.py) against the exported past/present path."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I, relax as R, tirx as T

import tvm_lite
from conftest import PROMPTS
from tvm_lite.engine import ContextLengthError, Engine, GenerationConfig
from tvm_lite.relax_passes import KVCacheRewriteError

NEW_TOKENS = 32


def _phase1(mod, kv_cache="inplace"):
    """The module after tvm_lite's graph phase (where the KV rewrite happens), without the
    fusion passes (FuseKVAppend merges each layer's two kv_write calls; test_fusion.py)."""
    from tvm_lite.pipeline import phases

    name, passes = phases(tvm.target.Target({"kind": "llvm"}), kv_cache, fusion=False)[0]
    assert name == "1_graph"
    return tvm.transform.Sequential(passes)(mod)


# -- the pass on small graphs ----------------------------------------------------------------------
def _decoder_layer(sliced: bool):
    """A one-layer "decoder with past" in the exported layout; ``sliced``: a sliding window that
    slices the past before the concat (not the pattern the pass rewrites)."""

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((1, "seq", 8), "float32"), past_k: R.Tensor((1, 2, "past_seq", 4), "float32"),
                 w: R.Tensor((8, 8), "float32")):
            R.func_attr({"num_input": 2, "tvm_lite.input_names": ["x", "past.k"],
                         "tvm_lite.output_names": ["logits", "present.k"]})
            seq = T.int64()
            past_seq = T.int64()
            with R.dataflow():
                h = R.matmul(x, w)
                k = R.permute_dims(R.reshape(h, R.shape([1, seq, 2, 4])), [0, 2, 1, 3])
                p = R.strided_slice(past_k, [2], [1], [past_seq]) if sliced else past_k
                present = R.concat([p, k], axis=2)
                q = R.permute_dims(R.reshape(h, R.shape([1, seq, 2, 4])), [0, 2, 1, 3])
                scores = R.matmul(q, R.permute_dims(present, [0, 1, 3, 2]))
                gv = (scores, present)
                R.output(gv)
            return gv

    return Mod


def test_pass_rewrites_a_small_decoder_and_runs_in_place():
    mod = _phase1(_decoder_layer(sliced=False))
    assert {gv.name_hint for gv in mod.get_global_vars()} >= {"prefill", "decode"}
    main = mod["prefill"]
    assert [p.name for p in main.params] == ["x", "past_len", "cache_k", "w"]
    assert list(main.attrs["tvm_lite.output_names"]) == ["logits"]
    assert "concat" not in main.script()
    ex = tvm_lite.build(mod, "llvm", kv_cache="copy", memory_plan="tvm")  # already rewritten
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype("float32")
    cache = tvm.runtime.tensor(np.zeros((10, 2, 4), "float32"))
    xs = rng.standard_normal((1, 5, 8)).astype("float32")
    # two calls (3 tokens, then 2) write rows 0..4 of the one cache buffer
    vm["prefill"](tvm.runtime.tensor(xs[:, :3]), tvm.runtime.ShapeTuple([0]), cache, tvm.runtime.tensor(w))
    out = vm["prefill"](tvm.runtime.tensor(xs[:, 3:]), tvm.runtime.ShapeTuple([3]), cache, tvm.runtime.tensor(w))
    k_all = (xs[0] @ w).reshape(5, 2, 4)
    np.testing.assert_allclose(cache.numpy()[:5], k_all, rtol=1e-5, atol=1e-5)
    assert not cache.numpy()[5:].any()
    scores = out[0].numpy()
    q = (xs[0, 3:] @ w).reshape(2, 2, 4)
    expect = np.einsum("shd,thd->hst", q, k_all)[None]
    np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-4)
    # writing past the end is an error, not a silent overwrite
    with pytest.raises(Exception, match="KV cache overflow"):
        vm["prefill"](tvm.runtime.tensor(xs[:, :3]), tvm.runtime.ShapeTuple([8]), cache, tvm.runtime.tensor(w))


def test_pass_refuses_a_pattern_it_cannot_rewrite_and_copy_mode_builds_it():
    with pytest.raises(KVCacheRewriteError, match="past.k"):
        _phase1(_decoder_layer(sliced=True), "inplace")
    with pytest.raises(KVCacheRewriteError, match="past.k"):
        _phase1(_decoder_layer(sliced=True), "auto")  # a partial pattern is never skipped silently
    tvm_lite.build(_decoder_layer(sliced=True), "llvm", kv_cache="copy")


# -- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_ir_has_no_kv_concat_and_no_presents(exporter, export_dir):
    mod = _phase1(tvm_lite.from_onnx(export_dir(exporter) / "model.onnx"))
    main = mod["prefill"]
    assert list(main.attrs["tvm_lite.output_names"]) == ["logits"]
    caches = [p for p in main.params if p.name.startswith("cache_")]
    assert len(caches) == 2 * 30
    assert all(str(c.ty.shape) == "R.shape([cache_len, 3, 64])" for c in caches)  # seq first
    text = main.script(show_meta=False)
    concats = [line for line in text.splitlines() if "R.concat(" in line]
    assert not [line for line in concats if "past_seq" in line and "float32" in line]
    assert text.count("R.call_tir_inplace(") == 60 and text.count("R.memory.view(") == 60


@pytest.mark.slow
def test_same_greedy_tokens_as_the_copy_path(engine):
    inplace, copy = engine("dynamo", "inplace"), engine("dynamo", "copy")
    assert (inplace.kv_mode, copy.kv_mode) == ("inplace", "copy")
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=())
    for prompt in PROMPTS:
        a, b = inplace.generate(prompt, cfg), copy.generate(prompt, cfg)
        assert len(a.token_ids) == NEW_TOKENS and a.token_ids == b.token_ids, prompt


@pytest.mark.slow
def test_greedy_steps_on_the_device_match_the_logits(artifact):
    """prefill_step/decode_step (inputs made and argmax taken on the device, one int back) give
    the argmax of the logits path, through chunked and padded prefill; they write the same one
    cache in place, and a step that does not fit is refused before anything runs."""
    eng = Engine(artifact("dynamo"), max_context=128, buckets=(16,), prefill_chunk=16)
    assert eng.runner.greedy_steps
    ids = eng.encode_prompt(PROMPTS[0])  # chunks of 16, the last one padded
    assert len(ids) % 16
    a, b = eng.new_session(), eng.new_session()
    buffers = [t.data_ptr() for t in b.past]
    want = [int(np.argmax(eng.prefill(a, ids)))]
    got = [eng.prefill_greedy(b, ids)]
    assert b.last_call == a.last_call == ("prefill", 16) and b.length == a.length == len(ids)
    for _ in range(6):
        want.append(int(np.argmax(eng.forward(a, [want[-1]])[-1])))
        got.append(eng.decode_greedy(b, got[-1]))
        # decode_step_flat: the step shape, then every cache, workspace buffer and weight
        assert eng.last_call_args == 1 + len(b.past) + eng.convention["workspace"]["count"] \
            + len(eng.params)
    assert got == want and b.tokens == a.tokens
    assert [t.data_ptr() for t in b.past] == buffers and b.kv_bytes_copied == 0
    # the caches hold the same rows: a logits step after greedy steps agrees with the other path
    np.testing.assert_allclose(eng.forward(b, [got[-1]]), eng.forward(a, [want[-1]]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ContextLengthError, match="max_context=128"):
        eng.prefill_greedy(b, [100] * 120)
    full = eng.new_session()
    eng.prefill_greedy(full, [100] * 127)
    eng.decode_greedy(full, 5)
    with pytest.raises(ContextLengthError, match="max_context=128"):
        eng.decode_greedy(full, 5)
    assert full.length == 128


@pytest.mark.slow
def test_prompt_chunks_before_the_last_leave_their_token_on_the_device(artifact, monkeypatch):
    """A prompt in several chunks runs ``prefill_chain_flat`` for every chunk but the last (its
    K/V rows only, ``prefill_fill``: no logits, nothing read back, so the host does not wait for
    the device between chunks) and ``prefill_step_flat`` for the last: the same token, tokens
    and cache rows as every chunk through ``prefill_step_flat``."""
    from tvm_lite import convention as cv

    eng = Engine(artifact("dynamo"), max_context=128, buckets=(16,), prefill_chunk=16)
    assert eng.runner.prefill_chain and eng.convention["prefill_chain"]
    assert cv.PREFILL_CHAIN in eng.convention["entries"]  # the tuple form, for RPC
    assert cv.PREFILL_FILL in eng.convention["entries"]  # what it runs
    ids = eng.encode_prompt(PROMPTS[0])
    chunks = -(-len(ids) // 16)
    assert chunks > 2
    calls, call = [], eng._call
    monkeypatch.setattr(eng, "_call", lambda f, args, **kw: calls.append(f) or call(f, args, **kw))
    chained = eng.new_session()
    got = [eng.prefill_greedy(chained, ids)]
    assert calls == [cv.PREFILL_CHAIN_FLAT] * (chunks - 1) + [cv.PREFILL_STEP_FLAT]
    monkeypatch.setattr(eng.runner, "prefill_chain", False)
    calls.clear()
    plain = eng.new_session()
    want = [eng.prefill_greedy(plain, ids)]
    assert calls == [cv.PREFILL_STEP_FLAT] * chunks
    assert chained.tokens == plain.tokens and chained.length == plain.length == len(ids)
    for _ in range(3):  # the caches hold the same rows
        got.append(eng.decode_greedy(chained, got[-1]))
        want.append(eng.decode_greedy(plain, want[-1]))
    assert got == want
    one = eng.new_session()  # one chunk: prefill_step_flat alone
    calls.clear()
    monkeypatch.setattr(eng.runner, "prefill_chain", True)
    eng.prefill_greedy(one, ids[:16])
    assert calls == [cv.PREFILL_STEP_FLAT]


@pytest.mark.slow
def test_decode_steps_queued_on_the_device_give_the_same_tokens(artifact):
    """decode_chain (the token stays on the device; Engine(run_ahead=k) queues k steps before
    it reads their tokens) generates what one-by-one decode_step does, to the end of the
    context; a caller who stops mid-batch leaves the session at the last token taken, and
    continuing it gives the tokens an uninterrupted run gives."""
    from tvm_lite import convention as cv
    from tvm_lite.errors import UserError

    one = Engine(artifact("dynamo"), max_context=48, buckets=(16,), prefill_chunk=16)
    ahead = Engine(artifact("dynamo"), max_context=48, buckets=(16,), prefill_chunk=16,
                   run_ahead=4)
    assert one.run_ahead == 1  # the default on the CPU: kernels run as they are called
    assert ahead.convention["chain"] and ahead.runner.chain_steps
    ids = one.encode_prompt(PROMPTS[0])[:21]
    want = [s.token for s in one.tokens(one.new_session(), ids)]  # 48 - 21 + 1 tokens
    session = ahead.new_session()
    got = [s.token for s in ahead.tokens(session, ids)]
    assert got == want and len(got) == 48 - 21 + 1 and session.length == 48
    # decode_chain_flat: the token tensor, the step shape, then every buffer and weight
    assert len(ahead.convention["entries"][cv.DECODE_CHAIN_FLAT]) == \
        len(ahead.convention["entries"][cv.DECODE_STEP_FLAT]) + 1
    # stop after 6 tokens (mid-batch: the prefill's token, then 5 of the first two batches)
    session = ahead.new_session()
    loop = ahead.tokens(session, ids)
    first = [next(loop).token for _ in range(6)]
    loop.close()
    assert first == want[:6] and session.length == 21 + 5 and session.tokens[-1] == want[4]
    rest = [s.token for s in ahead.tokens(session, [want[5]])]
    assert rest == want[6:]
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(UserError, match="run_ahead"):
            Engine(artifact("dynamo"), max_context=48, run_ahead=bad)


def test_decode_writes_its_row_at_the_position_it_is_given(tiny_decoder):
    """DecodeWritesAtPosition: decode's K/V row goes to the slot of its ``positions`` input (read
    on the device), not to ``past_len`` -- what lets decode_padded attend over a padded context.
    A decode call with past_len 5 and position 3 writes row 3 of every cache and leaves rows 4
    and 5 alone; decode's metadata and IR say so (the write kernel is the ``_at`` variant)."""
    from tvm_lite import convention as cv
    from tvm_lite.artifact import compile_model

    # (the cached build test_bad_input.py makes too)
    eng = Engine(compile_model(tiny_decoder[1], "llvm", progress=lambda *_: None), max_context=16)
    assert eng.convention["padded"] and eng.runner.padded_steps
    session = eng.new_session()
    for cache in session.past:
        cache.copyfrom(np.zeros(cache.shape, str(cache.dtype)))
    inputs = [*eng.runner.inputs(np.array([[7]], "int64"), np.ones((1, 6), "int64"),
                                 np.array([[3]], "int64")), eng.link.make_shape([5])]
    eng._call(*eng.runner.call(session, cv.DECODE, inputs))
    for cache in session.past:
        rows = np.abs(cache.numpy()).sum(axis=(1, 2))
        assert rows[3] > 0 and not rows[4:].any() and not rows[:3].any(), rows[:6]


def test_a_step_that_cannot_be_recorded_as_a_cuda_graph_runs_as_a_call():
    """StepGraphs (tvm_lite/cuda_graphs.py): a bucket's first step is a call, the second is
    recorded; when recording fails (here a driver whose every call fails: no GPU in CI) the step
    runs as a call instead, with a warning, and so do the later ones -- never a lost step."""
    from tvm_lite.cuda_graphs import CudaGraphError, StepGraphs

    class NoDriver:
        lib = None

        def __call__(self, name, *args):
            raise CudaGraphError(f"{name} failed with CUDA error 999")

    graphs, calls = StepGraphs(NoDriver(), stream=None), []
    graphs.run(127, lambda: calls.append(1))  # the bucket's first step: a call
    with pytest.warns(RuntimeWarning, match="without CUDA graphs.*cuStreamBeginCapture"):
        graphs.run(127, lambda: calls.append(2))
    graphs.run(127, lambda: calls.append(3))
    graphs.run(191, lambda: calls.append(4))
    assert calls == [1, 2, 3, 4] and not graphs.graphs and "error 999" in graphs.failed


def test_prompt_chunks_replayed_as_cuda_graphs_give_the_tokens_launched_ones_do(
        tiny_decoder_fp16, tmp_path):
    """On the GPU, a prompt's chunks before its last replayed as CUDA graphs
    (``Engine.chunk_graphs``, tvm_lite/cuda_graphs.py) give the tokens of the same chunks
    launched kernel by kernel. Four different prompts of 70 tokens in chunks of 16, each in a
    fresh session (which takes the caches and graphs of the one before): the first runs each
    chunk as a call, the second records them, the third and fourth replay them -- with their own
    ids, which a replay reading the recording's ids would not give back. A follow-up prompt in a
    session runs its chunks as calls and keeps nothing for them."""
    from conftest import cuda_device

    if cuda_device() is None:
        pytest.skip("needs a CUDA device")
    from tvm_lite import convention as cv
    from tvm_lite.artifact import compile_model
    from tvm_lite.target import local_cuda_target

    art = compile_model(tiny_decoder_fp16, local_cuda_target(), out_dir=tmp_path / "cuda",
                        progress=lambda *_: None)
    eng = Engine(art, device="cuda", max_context=256, buckets=(16,), prefill_chunk=16)
    assert eng.cuda_graphs and eng.chunk_graphs
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 500, 70).tolist() for _ in range(4)]

    def generate(chunk_graphs):
        eng.chunk_graphs, out = chunk_graphs, []
        for ids in prompts:
            session = eng.new_session()
            first = eng.prefill_greedy(session, ids)
            loop = eng.decode_padded_steps(session, first)
            out.append([first] + [next(loop).token for _ in range(8)])
            loop.close()
            graphs = session.graphs
            # gone before the next new_session(), which then takes these caches and graphs
            # (rebinding ``session`` would free it only after the next one was made)
            del session, loop
        return out, graphs

    launched, _ = generate(False)
    graphed, graphs = generate(True)
    assert graphed == launched and len({tuple(t) for t in graphed}) == 4
    entry = eng.runner.step_entry(cv.PREFILL_CHAIN)
    recorded = {k for k in graphs.graphs if isinstance(k, tuple)}
    assert recorded == {(entry, row, 16, 16) for row in (0, 16, 32, 48)} and not graphs.failed
    # a follow-up prompt (rows 70..139 of the session that takes these caches) runs as calls:
    # no key of its rows is kept
    session = eng.new_session()
    assert session.graphs is graphs
    eng.prefill_greedy(session, prompts[0])
    eng.prefill_greedy(session, prompts[1])
    assert session.length == 140
    assert not [k for k in graphs.warm | set(graphs.graphs) if isinstance(k, tuple) and k[1] >= 64]


def test_padded_decode_steps_give_the_same_tokens(artifact):
    """decode_padded (what CUDA graphs replay: the token and position read and advanced on the
    device, the K/V row written at the position read there, the context padded to a multiple of
    PADDED_BUCKET keys with the padding masked) generates what decode_step does, across bucket
    boundaries and up to a context cut short of a bucket, and from a session stopped mid-batch;
    on the CPU it runs as ordinary calls, and cuda_graphs=True is refused there."""
    from tvm_lite import convention as cv
    from tvm_lite.errors import UserError

    one = Engine(artifact("dynamo"), max_context=150, buckets=(16,), prefill_chunk=16)
    padded = Engine(artifact("dynamo"), max_context=150, buckets=(16,), prefill_chunk=16,
                    run_ahead=3)
    assert padded.convention["padded"] and padded.runner.padded_steps
    # the CPU: no graphs, the same entries called step by step (decode and prompt chunks)
    assert not padded.cuda_graphs and not padded.chunk_graphs
    ids = one.encode_prompt(PROMPTS[0])[:21]
    want = [s.token for s in one.tokens(one.new_session(), ids)]  # 150 - 21 + 1 tokens
    assert len(set(want)) > 10  # (a real text, not one token repeated)
    session = padded.new_session()
    first = padded.prefill_greedy(session, ids)
    got = [first] + [s.token for s in padded.decode_padded_steps(session, first)]
    # buckets of 64 keys: contexts 22..64, 65..128, then 129..150 padded to 150 (max_context)
    assert got == want and session.length == 150
    # stopped after 7 tokens (mid-batch), then continued from the last token taken
    session = padded.new_session()
    first = padded.prefill_greedy(session, ids)
    loop = padded.decode_padded_steps(session, first)
    part = [next(loop).token for _ in range(7)]
    loop.close()
    assert [first] + part == want[:8] and session.length == 21 + 7
    rest = [s.token for s in padded.decode_padded_steps(session, part[-1])]
    assert [first] + part + rest == want
    assert cv.PADDED_BUCKET == 64
    with pytest.raises(UserError, match="cuda_graphs=True needs a local CUDA device"):
        Engine(artifact("dynamo"), max_context=48, cuda_graphs=True)


@pytest.mark.slow
def test_every_rows_logits_get_their_workspace_when_first_asked(artifact):
    """Generation (decode, prefill_last) never needs prefill's every-row logits, the largest
    buffer of a prefill: the engine allocates the workspace for those calls and grows it the
    first time a call wants every row; both give the same token."""
    eng = Engine(artifact("dynamo"), max_context=512, prefill_chunk=256, buckets=(256,))
    small = eng.workspace_total_bytes
    ids = list(range(100, 300))
    token = eng.prefill_greedy(eng.new_session(), ids)
    eng.prefill(eng.new_session(), ids)  # the last row's logits: prefill_last too
    assert eng.workspace_total_bytes == small
    rows = eng.forward(eng.new_session(), ids)  # every row's logits: prefill
    logits_bytes = 256 * rows.shape[-1] * 4  # the padded chunk's fp32 logits
    assert small < logits_bytes / 4 and eng.workspace_total_bytes >= logits_bytes  # SmolLM2: 9 -> 58 MB
    assert int(np.argmax(rows[-1])) == token == eng.prefill_greedy(eng.new_session(), ids)


@pytest.mark.slow
def test_multi_turn_continuation_equals_one_long_prompt(engine):
    eng = engine("dynamo")
    first = eng.encode_prompt([{"role": "user", "content": PROMPTS[0]}])
    session = eng.new_session()
    answer = eng.generate(np.array(first), GenerationConfig(max_new_tokens=8, stop_token_ids=()),
                          session=session)
    fed = first + answer.token_ids[:-1]  # the last sampled token is not in the cache yet
    assert session.tokens == fed
    follow = eng.tokenizer.encode(" And of Italy?")
    turn2 = eng.prefill(session, [answer.token_ids[-1], *follow])
    one = eng.prefill(eng.new_session(), fed + [answer.token_ids[-1], *follow])
    np.testing.assert_allclose(turn2, one, rtol=1e-4, atol=2e-4)
    assert int(np.argmax(turn2)) == int(np.argmax(one))


@pytest.mark.slow
def test_one_cache_instance_allocated_once(artifact):
    eng = Engine(artifact("dynamo"), max_context=256)
    session = eng.new_session()
    buffers = [t.data_ptr() for t in session.past]
    held = sum(int(np.prod(t.shape)) * 4 for t in session.past)
    assert held == eng.kv_cache_bytes() == 2 * 30 * 256 * 3 * 64 * 4
    ids = eng.encode_prompt(PROMPTS[1])
    eng.prefill(session, ids, chunk_size=7)
    for token in (42, 43, 44):
        eng.forward(session, [token])
        assert session.last_step_kv_bytes_copied == 0
    assert [t.data_ptr() for t in session.past] == buffers  # written in place, never replaced
    assert session.kv_bytes_copied == 0
    copy = Engine(artifact("dynamo", "copy"), max_context=256)
    assert copy.kv_cache_bytes() == 2 * held  # past + present alive during a step
    # a prompt past max_context is refused before anything runs; the session stays usable
    before = session.length
    with pytest.raises(ContextLengthError, match="max_context=256"):
        eng.prefill(session, [100] * 300)
    assert session.length == before
    eng.forward(session, [45])
    assert session.length == before + 1


@pytest.mark.slow
def test_the_model_describes_its_calling_convention(artifact, engine):
    """``_metadata()`` (relax_passes/attach_metadata.py) says what the engine needs to call the
    model, the manifest records the same, and the engine's runner follows it."""
    import json

    from tvm_lite import convention as cv
    from tvm_lite.artifact import load_manifest
    from tvm_lite.runners import InPlace, PastPresent

    eng = engine("dynamo")
    desc = json.loads(str(eng.vm[cv.METADATA]()))
    assert desc == eng.convention == load_manifest(artifact("dynamo"))["convention"]
    assert desc["kv_cache"] == "inplace" and desc["decoders"] == ["prefill", "decode"]
    assert desc["tupled"] and desc["steps"] and isinstance(eng.runner, InPlace)
    assert desc["flat_steps"] and len(desc["entries"][cv.DECODE_STEP_FLAT]) == \
        1 + 60 + desc["workspace"]["count"] + desc["weights"]["count"]  # step, then the buffers
    assert desc["kv_caches"]["count"] == 60 and desc["kv_caches"]["row_shape"] == [3, 64]
    assert desc["weights"]["count"] == len(eng.params) and desc["weights"]["tupled"]
    # one set of buffers for every decoder: as many as the one with the most
    # (prefill_last: prefill with one row's logits, what prefill_step runs)
    assert cv.PREFILL_LAST in desc["entries"] and cv.PREFILL_LAST in desc["workspace"]
    assert desc["workspace"]["count"] == max(len(v) for v in eng.runner.workspace.values()) > 0
    prefill = [p[0] for p in desc["entries"]["prefill"]]
    assert prefill[:4] == [*desc["inputs"], cv.PAST_LEN] and len(desc["inputs"]) == 3
    assert [p[0] for p in desc["entries"][cv.DECODE_STEP]] == ["step", "kv_caches", "workspace",
                                                             "params"]
    assert desc["options"]["kv_cache"] == "inplace"
    copy = engine("dynamo", "copy")
    assert copy.convention["kv_cache"] == "copy" and copy.convention["decoders"] == ["main"]
    assert copy.convention["kv_caches"]["count"] == 60 and not copy.convention["steps"]
    assert not copy.convention["flat_steps"]
    assert isinstance(copy.runner, PastPresent)


@pytest.mark.slow
def test_adreno_opencl_has_the_kv_write_and_no_kv_concat(export_dir, opencl_source):
    src = opencl_source("adreno")
    mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
    # with the fusion passes a layer's K (rotated) and V rows are written by one kernel
    assert re.search(r"__kernel void kv_append\d*_kernel\(", src) and "kv_write" not in src
    plain = tvm_lite.build(mod, "opencl -device=adreno", fusion=False)
    assert "__kernel void kv_write_kernel(" in tvm_lite.device_source(plain, "opencl")
    assert "past_key_values" not in src  # no kernel reads a past input: there are none
    assert "get_local_id" in src
