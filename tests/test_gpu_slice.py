"""gpu_slice and priority (tvm_lite/gpu_slice.py): bounded submissions, same answers.

The CPU has no queue to flush, but the slicing logic is the same code: the instrument counts the
kernels each submission holds and the engine's answers do not change. The H200 measurement of what
slicing buys is `python -m tvm_lite.bench.gpu_slice ARTIFACT --device cuda` (README)."""

import numpy as np
import pytest

PROMPT = "Explain in two sentences why the sky is blue."


def test_sliced_prefill_bounds_every_submission_and_keeps_the_tokens(artifact, engine):
    from tvm_lite.engine import Engine, GenerationConfig

    base = engine("dynamo")
    ids = np.array(base.encode_prompt(PROMPT))
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    sliced = Engine(artifact("dynamo"), prefill_chunk=16, gpu_slice=40)
    assert sliced.generate(ids, cfg).token_ids == base.generate(ids, cfg).token_ids

    with sliced.submissions(40) as record:
        sliced.prefill(sliced.new_session(), ids)
    calls = -(-len(ids) // 16)  # prefill calls of at most 16 tokens
    assert all(0 < k <= 40 for k in record.kernels)
    assert len(record.kernels) > calls  # each call was cut into several submissions
    assert len(record.seconds) == len(record.kernels)
    with sliced.submissions(40) as record:  # generate's greedy path (prefill_step) is sliced too
        sliced.prefill_greedy(sliced.new_session(), ids)
    assert all(0 < k <= 40 for k in record.kernels)
    assert len(record.kernels) > calls

    with sliced.submissions(None) as record:  # unsliced: one submission per call, many kernels
        sliced.prefill(sliced.new_session(), ids)
    assert len(record.kernels) == calls
    assert min(record.kernels) > 40
    assert sliced.gpu_slice == 40 and sliced.slice_record is None  # left as found


def test_profile_prefill_reports_kernels_and_submissions(artifact):
    from tvm_lite.engine import Engine
    from tvm_lite.bench.gpu_slice import profile_prefill

    eng = Engine(artifact("dynamo"), buckets=None, prefill_chunk=32)
    row = profile_prefill(eng, 32, 25, repeats=1)
    assert row["submissions"] >= row["kernels"] / 25 - 1
    assert 0 < row["longest_kernel_ms"] <= row["prefill_ms"]
    assert 0 < row["longest_submission_ms"] <= row["prefill_ms"]
    assert eng.gpu_slice is None and eng.slice_record is None  # left as found


def test_gpu_slice_bench_compares_chunks_with_one_call(artifact, tmp_path, capsys):
    """``python -m tvm_lite.bench.gpu_slice``: one call, chunks, chunks sliced; each row's
    prefill time over one call's (what issue 16's "<= 1.3x one call" reads) in the JSON and the
    table."""
    import json

    from tvm_lite.bench.gpu_slice import main

    out = tmp_path / "slice.json"
    assert main([str(artifact("dynamo")), "--device", "cpu", "--tokens", "40", "--chunk", "16",
                 "--slices", "20", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["prefill_chunk"] for r in rows] == [40, 16, 16]
    assert rows[0]["x_one_call"] == 1.0
    for r in rows[1:]:
        assert r["x_one_call"] == pytest.approx(r["prefill_ms"] / rows[0]["prefill_ms"])
    assert "x_one_call" in capsys.readouterr().out


def test_bad_options_name_the_cause(artifact):
    import tvm

    from tvm_lite.engine import Engine
    from tvm_lite.gpu_slice import PriorityNotSupported, set_priority

    with pytest.raises(ValueError, match="gpu_slice=0"):
        Engine(artifact("dynamo"), gpu_slice=0)
    with pytest.raises(ValueError, match="priority='urgent'"):
        set_priority(tvm.cpu(0), "urgent")
    assert "nothing to do" in set_priority(tvm.cpu(0), "low")[0]
    with pytest.raises(PriorityNotSupported, match="OpenCLWorkspace::Init"):
        set_priority(tvm.device("opencl", 0), "low")
