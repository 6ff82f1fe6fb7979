"""tvm-lite profile (tvm_lite/profile.py) on the CPU build of SmolLM2: the VM-instrument path."""

import collections
import json
import re

import pytest

from tvm_lite.profile import Profiler, kernel_launches

LAYERS = 30


@pytest.fixture(scope="module")
def profiles(engine):
    prof = Profiler(engine("dynamo", "inplace"), use_torch=False)
    return prof.prefill(16, repeats=1), prof.decode(16, steps=2, warmup=1)


def test_decode_profile_counts_every_kernel_of_a_step(profiles):
    _, decode = profiles
    assert decode.phase == "decode" and decode.context >= 17
    kernels = decode.kernels
    # the fused attention once per layer, the greedy token's reductions once a step
    assert kernels["attention_decode"]["calls"] == LAYERS
    assert decode.kernels_per_step == decode.vm_kernel_calls  # one CPU "kernel" per PrimFunc call
    assert decode.gpu_ms == pytest.approx(sum(k["us"] for k in kernels.values()) / 1e3)
    assert decode.vm_calls > decode.vm_kernel_calls  # + the VM's builtins
    assert "vm.builtin.match_shape" in decode.vm_builtins
    assert decode.wall_ms > 0 and 0 <= decode.host_gap_ms <= decode.wall_ms
    table = decode.table(top=5)
    assert "attention_decode" in table or "more kernels" in table
    json.dumps(decode.as_dict())  # what --json writes


def test_prefill_profile_runs_the_prefill_kernels(profiles):
    prefill, decode = profiles
    assert prefill.kernels["attention_prefill"]["calls"] == LAYERS
    assert "attention_decode" not in prefill.kernels
    assert prefill.gpu_ms > decode.gpu_ms  # 16 tokens cost more than one


def test_prefill_in_chunks_counts_every_chunk(engine):
    """``chunk``: the same prompt in calls of ``chunk`` tokens is one "step" made of every call."""
    prof = Profiler(engine("dynamo", "inplace"), use_torch=False)
    one = prof.prefill(16, repeats=1)
    chunked = prof.prefill(16, repeats=1, chunk=4)
    read = prof.prefill(16, repeats=1, chunk=4, read_each_chunk=True)
    assert chunked.phase == "prefill in chunks of 4" and one.phase == "prefill"
    assert read.phase == "prefill in chunks of 4, each chunk's token read back"
    assert read.kernels_per_step == 4 * one.kernels_per_step  # prefill_step_flat, 4 times
    assert read.kernels["attention_prefill"]["calls"] == 4 * LAYERS
    # prefill_chain_flat 3 times (prefill_fill: K/V only, so no last layer's attention and no
    # logits), then prefill_step_flat; fewer VM calls (InlineStepCalls flattens the chain entry
    # too: the weights checked once, where they enter)
    def kernels(p):  # (less the host's shape functions: the token's read-back has one)
        return {n: k["calls"] for n, k in p.kernels.items() if not n.startswith("shape_func")}

    def families(p):  # kernels by name less its number (the fill's last K/V append is its own)
        out = collections.Counter()
        for n, calls in kernels(p).items():
            out[re.sub(r"\d+$", "", n)] += calls
        return out

    assert chunked.kernels["attention_prefill"]["calls"] == 4 * LAYERS - 3
    assert families(chunked)["kv_append"] == families(read)["kv_append"] == 4 * LAYERS
    assert all(families(read)[n] >= c for n, c in families(chunked).items())
    lm_head = [n for n in kernels(read) if "49152" in n]  # SmolLM2's vocabulary
    assert lm_head and all(kernels(read)[n] == 4 * kernels(chunked)[n] for n in lm_head), lm_head
    assert chunked.vm_calls < read.vm_calls
    assert chunked.vm_builtins["vm.builtin.tensor_to_shape"] == 1  # the last chunk's token only
    assert prof.prefill(16, repeats=1, chunk=16).phase == "prefill"  # one call: not chunked


def test_profile_command_names_a_bad_chunk(artifact, capsys):
    from tvm_lite.cli import main

    assert main(["profile", str(artifact("dynamo", "inplace")), "--device", "cpu",
                 "--chunk", "0"]) == 2
    assert "--chunk 0: a chunk needs at least one token" in capsys.readouterr().err


def test_kernel_launches_needs_a_gpu_build():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("decode", [x]):
        bb.emit_func_output(bb.emit(relax.op.add(x, x)))
    ex = tvm.compile(bb.get(), target="llvm")
    with pytest.raises(ValueError, match="no device module"):
        kernel_launches(ex, "decode")
    with pytest.raises(ValueError, match="no VM function 'prefill'"):
        kernel_launches(ex, "prefill")


def test_profile_command_runs_on_an_artifact(artifact, tmp_path, capsys):
    """`tvm-lite profile ARTIFACT --device cpu --json ...`: the command's own path, end to end."""
    from tvm_lite.cli import main

    out = tmp_path / "p.json"
    main(["profile", str(artifact("dynamo", "inplace")), "--device", "cpu", "--prompt-len", "8",
          "--steps", "1", "--chunk", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "prefill (context 0" in printed and "decode (context" in printed
    assert "prefill in chunks of 4 (context 0" in printed
    summary = next(ln for ln in printed.splitlines() if " / one call: wall " in ln)
    assert summary.startswith("prefill in chunks of 4 / one call: wall ") and "read back" in summary
    result = json.loads(out.read_text())
    assert set(result) == {"prefill", "prefill_chunked", "prefill_chunked_read", "decode"}
    assert "each chunk's token read back" in result["prefill_chunked_read"]["phase"]
    assert result["prefill_chunked_read"]["kernels"]["attention_prefill"]["calls"] == 2 * LAYERS
    assert result["decode"]["kernels"]["attention_decode"]["calls"] == LAYERS


def test_profiling_leaves_no_instrument_behind(engine, monkeypatch):
    """A profile removes its VM instrument afterwards (None): a leftover no-op Python function
    would still be called around every VM instruction (it made later steps ~7x slower)."""
    eng = engine("dynamo", "inplace")
    installed = []
    real = eng.vm.set_instrument
    monkeypatch.setattr(eng.vm, "set_instrument", lambda f: (installed.append(f), real(f)))
    Profiler(eng, use_torch=False).decode(4, steps=1, warmup=0)
    assert installed and installed[-1] is None


def test_decode_step_checks_each_weight_once(profiles, engine):
    """InlineStepCalls: the step entry checks the weights where they enter, and the decoder it
    used to call does not check them again (three checks per weight and step before)."""
    _, decode = profiles
    weights = len(engine("dynamo", "inplace").params)
    assert decode.vm_builtins["vm.builtin.check_tensor_info"] < 1.5 * weights


def test_decode_step_makes_few_vm_calls_per_kernel(profiles):
    """Issue 17's host gap: every VM call a step makes besides its kernels is host time the GPU
    waits for. SmolLM2's decode step made 2,680 VM calls for 321 kernels (8.3 a kernel: register
    kills, weight checks, tuple unpacking, one view per tensor); with the weights unchecked
    (num_input), no kills in the arena-planned step (DropKillsWithoutStorage), views, shapes and
    scalars shared (ShareHostValues) and the buffers passed as separate arguments, typed by ndim
    (decode_step_flat), it makes 555 (1.73 a kernel). What is left: one check_tensor_info per
    cache and workspace buffer, the distinct views."""
    _, decode = profiles
    builtins = decode.vm_builtins
    assert decode.vm_calls <= 1.85 * decode.vm_kernel_calls, (decode.vm_calls, builtins)
    assert builtins.get("vm.builtin.tuple_getitem", 0) <= 4  # the step helpers' outputs only
    assert builtins.get("vm.builtin.null_value", 0) <= 20  # the step helpers' kills only
    assert builtins.get("runtime.TVMTensorCreateView", 0) <= 100  # 403 before sharing
    assert builtins.get("vm.builtin.check_tensor_info", 0) <= 80  # caches + workspaces, no weight
    assert builtins.get("vm.builtin.match_shape", 0) <= 10  # the step helpers' only
    assert builtins.get("vm.builtin.make_prim_value", 0) <= 20  # not one per kv_append


def test_decode_profile_times_steps_queued_on_the_device(artifact):
    """With ``run_ahead`` > 1 (the GPU default) the decode profile also times the steps as the
    generation loop runs them, queued ``run_ahead`` at a time (``decode_chain``), and reports
    that wall time and host gap next to the one-by-one ones."""
    from tvm_lite.engine import Engine

    eng = Engine(artifact("dynamo", "inplace"), max_context=64, run_ahead=2)
    decode = Profiler(eng, use_torch=False).decode(8, steps=2, warmup=1)
    assert decode.run_ahead == 2 and decode.wall_ms_run_ahead > 0
    assert 0 <= decode.host_gap_ms_run_ahead <= decode.wall_ms_run_ahead
    assert "2 steps queued at a time" in decode.table(top=3)
    assert json.loads(json.dumps(decode.as_dict()))["host_gap_ms_run_ahead"] is not None
    eng.run_ahead = 1  # the CPU default: one by one, and nothing more to time
    one = Profiler(eng, use_torch=False).decode(8, steps=1, warmup=0)
    assert one.run_ahead == 1 and one.wall_ms_run_ahead is None


def test_busy_time_counts_overlapping_kernels_once():
    """The GPU's busy time is the union of the kernels' intervals: kernels that overlap
    (programmatic dependent launch) count once, gaps not at all; a profile whose kernels
    overlapped shows it, and its host gap is the wall time no kernel ran."""
    from tvm_lite.gpu_time import busy_time
    from tvm_lite.profile import StepProfile

    assert busy_time([]) == 0
    assert busy_time([(0, 10), (20, 25)]) == 15  # a gap of 10
    assert busy_time([(0, 10), (5, 12), (12, 14), (1, 3)]) == 14  # overlaps and one inside
    assert busy_time([(30, 40), (0, 10), (8, 35)]) == 40  # out of order
    prof = StepProfile("decode", 1, 0, wall_ms=1.0, gpu_ms=1.5, busy_ms=0.8)
    assert abs(prof.host_gap_ms - 0.2) < 1e-12 and "(busy 0.800 ms)" in prof.table()
    serial = StepProfile("decode", 1, 0, wall_ms=1.0, gpu_ms=0.7, busy_ms=0.7)
    assert abs(serial.host_gap_ms - 0.3) < 1e-12 and "busy" not in serial.table()


def test_model_switch_sets_its_constants_and_puts_them_back():
    """``python -m tvm_lite.profile --switch NAME:MODULE.CONSTANT=VALUE,...``: the constants (modules
    under tvm_lite, values Python literals) set while a switched model is built and profiled,
    and put back after, an exception included."""
    from tvm_lite.profile import model_switch, switched
    from tvm_lite.schedules import gpu_attention_prefill as ap
    from tvm_lite.schedules import gpu_gemm_mma as mm

    before = (ap.TC_STAGED_STORES, ap.TC_KEY_TILES, mm.SUM_VEC)
    name, assignments = model_switch("both:schedules.gpu_attention_prefill.TC_STAGED_STORES="
                                     f"{not before[0]},schedules.gpu_attention_prefill."
                                     "TC_KEY_TILES=(32, 16),schedules.gpu_gemm_mma.SUM_VEC=1")
    assert name == "both" and [c for _, c, _ in assignments] == [
        "TC_STAGED_STORES", "TC_KEY_TILES", "SUM_VEC"]
    with pytest.raises(RuntimeError), switched(assignments):
        assert (ap.TC_STAGED_STORES, ap.TC_KEY_TILES, mm.SUM_VEC) == (not before[0], (32, 16), 1)
        raise RuntimeError
    assert (ap.TC_STAGED_STORES, ap.TC_KEY_TILES, mm.SUM_VEC) == before


def test_builds_side_by_side_take_each_runs_switch(tmp_path):
    """``python -m tvm_lite.profile --jobs 2``: the tree and a ``--switch`` compiled at once, each
    in its own process: the switch is set in the worker that builds it and only there (here one
    whose effect shows in the artifact: the tokenizer files it copies), the switched build in
    ``<work>/<shape>/switch-<NAME>``, the tree's from the compile cache as one process gives it."""
    from tvm_lite.engine import Engine, GenerationConfig
    from tvm_lite.profile import build_runs, export_shape

    onnx = export_shape("tiny-llama", tmp_path, progress=lambda *a, **k: None)
    runs = [("tvm_lite-e0m4", None),
            ("tvm_lite-e0m4", "tok:artifact.TOKENIZER_FILES=('tokenizer.json',)")]
    tree, switched = build_runs(onnx, runs, "llvm", tmp_path, "tiny-llama", jobs=2)
    assert switched == tmp_path / "tiny-llama" / "switch-tok"
    assert (tree / "tokenizer_config.json").exists()
    assert (switched / "tokenizer.json").exists()
    assert not (switched / "tokenizer_config.json").exists()
    assert build_runs(onnx, runs[:1], "llvm", tmp_path, "tiny-llama") == [tree]  # (cached)
    two = GenerationConfig(max_new_tokens=2, stop_token_ids=())
    for artifact in (tree, switched):  # both load and answer
        assert len(Engine(str(artifact)).generate("def", two, chat=False).token_ids) == 2


@pytest.mark.parametrize("spec, says", [
    ("x:schedules.gpu_gemm_mma.NO_SUCH=1", "has no NO_SUCH"),
    ("x:schedules.no_such_module.A=1", "no module tvm_lite.schedules.no_such_module"),
    ("x:schedules.gpu_gemm_mma.SUM_VEC=four", "'four' is not a Python literal"),
    ("x:SUM_VEC=4", "is not MODULE.CONSTANT"),
    ("SUM_VEC=4", "expected NAME:CONSTANT=VALUE")])
def test_profile_command_names_a_bad_switch_before_any_build(spec, says, capsys, tmp_path):
    from tvm_lite.profile import main

    with pytest.raises(SystemExit):
        main(["--switch", spec, "--work-dir", str(tmp_path)])
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing exported or built


def test_comparison_table_puts_runs_side_by_side():
    """``python -m tvm_lite.profile`` with several runs (variants, ``--switch``es, shapes) ends
    with one row a run: prefill wall and GPU ms, the chunks' wall and ratio, decode."""
    from tvm_lite.profile import comparison_table

    runs = {"llama base": {"prefill": {"wall_ms": 16.0, "busy_ms": 14.0},
                           "prefill_chunked": {"wall_ms": 22.4},
                           "decode": {"wall_ms": 0.9, "wall_ms_graphs": 0.73}},
            "llama base staged": {"prefill": {"wall_ms": 15.0, "busy_ms": 13.5},
                                  "decode": {"wall_ms": 0.9, "wall_ms_graphs": None}}}
    lines = comparison_table(runs).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| llama base | 16.000 | 14.000 | 22.400 | 1.40x | 0.900 | 0.730 |"
    assert lines[3] == "| llama base staged | 15.000 | 13.500 | - | - | 0.900 | - |"


def test_chunk_kernels_table_sums_a_primfuncs_kernels_and_ranks_the_extra():
    """With ``--chunk`` the profile names where the chunks cost more GPU time than one call: a
    row a PrimFunc (its plan branches and sum kernel added up: ``NAME_kernel``,
    ``NAME_kernel_1``, ...), the largest extra first, with its share of the whole extra."""
    from tvm_lite.profile import chunk_kernels_table, primfunc_of

    assert primfunc_of("e0m4_matmul_1xnx576x960_g32_float16_kernel_3") == \
        "e0m4_matmul_1xnx576x960_g32_float16"
    assert primfunc_of("attention_prefill_kernel") == "attention_prefill"
    assert primfunc_of("Memcpy HtoD (Pageable -> Device)") == "Memcpy HtoD (Pageable -> Device)"
    one = {"gemm_kernel_4": {"calls": 2, "us": 100.0},
           "attention_kernel": {"calls": 2, "us": 50.0},
           "norm_kernel": {"calls": 4, "us": 10.0}}
    chunked = {"gemm_kernel": {"calls": 16, "us": 130.0},  # the 256-token branch ...
               "gemm_kernel_1": {"calls": 16, "us": 20.0},  # ... and its split-K sum
               "attention_kernel": {"calls": 16, "us": 140.0},
               "norm_kernel": {"calls": 32, "us": 10.0}}
    lines = chunk_kernels_table(one, chunked, top=2).splitlines()
    assert lines[2] == "| attention | 50.0 (2) | 140.0 (16) | 2.80x | 90.0 | 64% |"
    assert lines[3] == "| gemm | 100.0 (2) | 150.0 (32) | 1.50x | 50.0 | 36% |"
    assert lines[4] == "| (1 more) | | | | 0.0 | |"
