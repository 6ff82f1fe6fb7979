"""4-bit weights (tvm_lite.quant): the E0M4 format, its quantizers, the Relax pass and kernels.

Unit tests run on small random weights (seconds); the tests marked ``slow`` use the real
SmolLM2-135M (quantized weights and the compiled artifact are cached between sessions).
"""

import re
import shutil

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax, tirx

import tvm_lite
from tvm_lite.quant import QuantConfig, QuantFormatError
from tvm_lite.quant import format as F
from tvm_lite.quant import kernels
from tvm_lite.quant.awq import awq
from tvm_lite.quant.gptq import gptq
from tvm_lite.quant.rtn import rtn
from tvm_lite.relax_passes import QuantizeWeightMatmuls
from tvm_lite.relax_passes.quantize_weight_matmuls import QuantizeError, find_weight_uses
from conftest import clang_opencl

FORMATS = ["e0m4", "int4"]


def _weight(k, n, seed=0):
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype("float32")


# -- the format ----------------------------------------------------------------------------------
def test_e0m4_code_under_fixed_exponent_is_1024_plus_code():
    codes = np.arange(16, dtype=np.uint8)
    h = F.e0m4_half(codes)
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h.astype(np.float32), 1024 + codes.astype(np.int32))
    # the bit pattern is exactly exponent 0x6400 OR the code: no conversion involved
    np.testing.assert_array_equal(h.view(np.uint16), 0x6400 | codes.astype(np.uint16))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 70), n=st.integers(1, 19), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trips_every_code(k, n, seed):
    codes = np.random.default_rng(seed).integers(0, 16, (k, n)).astype(np.uint8)
    packed = F.pack(codes)
    assert packed.dtype == np.uint16 and packed.shape == (-(-k // 4), n)
    np.testing.assert_array_equal(F.unpack(packed, k), codes)


def test_pack_layout_matches_the_bit_diagram():
    codes = np.array([[1], [2], [3], [4], [5]], np.uint8)  # K=5, N=1: rows 0..3 in word 0
    packed = F.pack(codes)
    assert packed[0, 0] == 0x4321 and packed[1, 0] == 0x0005


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_reference_is_q_minus_z_times_s_rounded_once(fmt):
    qw = rtn(_weight(96, 24), fmt, 32)
    q = F.unpack(qw.codes, qw.k).astype(np.float32)
    s = qw.scale.astype(np.float32)[np.arange(qw.k) // 32]
    z = (qw.zero.astype(np.float32) - 1024)[np.arange(qw.k) // 32] if fmt == "e0m4" else 8
    expect = ((q - z) * s).astype(np.float16)  # exact product, one rounding to fp16
    np.testing.assert_array_equal(qw.dequantize().view(np.uint16), expect.view(np.uint16))
    if fmt == "e0m4":
        assert np.all(qw.zero == np.round(qw.zero))  # c = 1024 + z is an integer: h - c is exact


def test_bad_formats_and_shapes_name_the_cause():
    with pytest.raises(QuantFormatError, match="multiple of 8"):
        QuantConfig("e0m4", "rtn", 12)
    with pytest.raises(QuantFormatError, match="--quant-method"):
        QuantConfig("e0m4", "bogus")
    with pytest.raises(QuantFormatError, match="choose one of"):
        QuantConfig("fp8")
    with pytest.raises(QuantFormatError, match=r"codes must lie in \[0, 15\]"):
        F.pack(np.array([[16]]))
    with pytest.raises(QuantFormatError, match="packed rows"):
        F.unpack(np.zeros((2, 3), np.uint16), 9)
    with pytest.raises(ValueError, match="2-D"):
        rtn(np.zeros(8, np.float32))
    assert QuantConfig.parse("none") is None


# -- the quantizers ------------------------------------------------------------------------------
def _calibration(k, t=1024, seed=1):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.1 + np.eye(k)
    x = (rng.standard_normal((t, k)) @ mix) * np.exp(rng.standard_normal(k))  # outlier channels
    return x.astype(np.float32)


def _out_err(x, w, qw):
    return float(np.mean((x @ qw.effective_weight() - x @ w) ** 2) / np.mean((x @ w) ** 2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_clip_search_gptq_and_awq_beat_plain_rtn(fmt):
    k, n = 256, 128
    w, x = _weight(k, n), _calibration(k)
    h = x.T.astype(np.float64) @ x
    plain = _out_err(x, w, rtn(w, fmt, 32, clip_ratios=(1.0,)))
    clipped = _out_err(x, w, rtn(w, fmt, 32))
    assert clipped < plain
    for ao in (False, True):
        assert _out_err(x, w, gptq(w, h, fmt, 32, act_order=ao)) < 0.7 * plain
    q = awq(w, h, np.abs(x).mean(0), fmt, 32)
    assert q.act_scale is not None and q.act_scale.shape == (k,)
    assert _out_err(x, w, q) < 0.9 * plain


def test_e0m4_asymmetric_grid_beats_int4_symmetric_on_the_same_weights():
    w = _weight(256, 128) + 0.02  # off-centre groups: a zero point pays
    e = rtn(w, "e0m4", 32)
    i = rtn(w, "int4", 32)
    err = lambda q: float(np.mean((q.dequantize().astype(np.float32) - w) ** 2))  # noqa: E731
    assert err(e) < 0.8 * err(i)
    assert e.nbytes / w.size == pytest.approx(0.5 + 4 / 32)
    assert i.nbytes / w.size == pytest.approx(0.5 + 2 / 32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizers_handle_odd_shapes(fmt):
    # K = 99: not a multiple of the group (32) nor of the packing (4); N = 13: not a multiple of 8
    w, x = _weight(99, 13), _calibration(99, 256)
    h = x.T.astype(np.float64) @ x
    for qw in (rtn(w, fmt, 32), gptq(w, h, fmt, 32), gptq(w, h, fmt, 32, act_order=True),
               awq(w, h, np.abs(x).mean(0), fmt, 32)):
        assert qw.codes.shape == (25, 13) and qw.scale.shape == (4, 13)
        assert _out_err(x, w, qw) < 0.05


def test_awq_then_gptq_beats_either_alone():
    from tvm_lite.quant.awq import awq_gptq

    k, n = 256, 128
    w, x = _weight(k, n, seed=3), _calibration(k, seed=4)
    h, mean_abs = x.T.astype(np.float64) @ x, np.abs(x).mean(0)
    both = awq_gptq(w, h, mean_abs, "e0m4", 32, clip_weighted=True)
    assert both.act_scale is not None and both.info["method"] == "awq+gptq"
    err = _out_err(x, w, both)
    assert err < _out_err(x, w, gptq(w, h, "e0m4", 32)) and err < _out_err(x, w, awq(w, h, mean_abs, "e0m4", 32))


def test_matrices_quantize_the_same_in_worker_processes():
    from tvm_lite.quant.calibration import InputStats
    from tvm_lite.quant.quantize import quantize_matrices

    x = _calibration(64, 256)
    st = InputStats(x.T.astype(np.float64) @ x, np.abs(x).sum(0).astype(np.float64), 256)
    arrays = {f"w{i}": _weight(64, 16, seed=i) for i in range(3)}
    cfg = QuantConfig("e0m4", "awq+gptq", 32, clip_weighted=True)
    one = quantize_matrices(arrays, cfg, dict.fromkeys(arrays, st), None, workers=1)
    two = quantize_matrices(arrays, cfg, dict.fromkeys(arrays, st), None, workers=2)
    assert list(two) == list(arrays)
    for name in arrays:
        np.testing.assert_array_equal(one[name].codes, two[name].codes)
        np.testing.assert_array_equal(one[name].act_scale, two[name].act_scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_refit_lowers_output_error_and_keeps_codes_and_zeros(fmt):
    from tvm_lite.quant.refit import output_error_of, refit_scales

    k, n = 96, 24  # K not a multiple of 64: 3 groups of 32
    w, x = _weight(k, n, seed=6), _calibration(k, 512, seed=7) + 0.5  # a common input component
    h = x.T.astype(np.float64) @ x
    for q in (rtn(w, fmt, 32), gptq(w, h, fmt, 32)):
        free, pulled = refit_scales(q, w, h, 0.0), refit_scales(q, w, h, 1.0)
        before = output_error_of(q, w, h)
        assert output_error_of(free, w, h) < 0.9 * before  # the closed form is the minimum...
        assert output_error_of(free, w, h) <= output_error_of(pulled, w, h) <= before  # ...the pull stays between
        np.testing.assert_array_equal(free.codes, q.codes)
        if fmt == "e0m4":
            np.testing.assert_array_equal(free.zero, q.zero)
        assert free.scale.dtype == np.float16 and (free.scale > 0).all()
        assert not np.array_equal(free.scale, q.scale)
    # through the pipeline: AWQ+GPTQ refits in AWQ's scaled space, the input scale unchanged
    from tvm_lite.quant.calibration import InputStats
    from tvm_lite.quant.quantize import quantize_matrices

    st = InputStats(h, np.abs(x).sum(0).astype(np.float64), x.shape[0])
    cfgs = [QuantConfig(fmt, "awq+gptq", 32, clip_weighted=True, scale_refit=r) for r in (None, 0.0)]
    plain, refit = (quantize_matrices({"w": w}, c, {"w": st}, None)["w"] for c in cfgs)
    assert refit.info["scale_refit"] == 0.0 and "scale_refit" not in plain.info
    np.testing.assert_array_equal(refit.act_scale, plain.act_scale)
    assert _out_err(x, w, refit) < _out_err(x, w, plain)
    with pytest.raises(QuantFormatError, match="scale_refit"):
        QuantConfig("e0m4", "rtn", 32, scale_refit=0.1)
    assert QuantConfig("e0m4", "awq+gptq", 32, scale_refit=0.1).label == "e0m4-awq+gptq+refit0.1-g32"


def _q4_1_like(k, n, seed=0):
    """Weights as a GGUF Q4_1 export holds them: 16 levels ``d * q + m`` per 32 rows of a column."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.002, 0.01, (k // 32, 1, n))
    m = -7.5 * d + rng.uniform(-0.5, 0.5, d.shape) * d  # groups roughly centred on 0
    return (rng.integers(0, 16, (k // 32, 32, n)) * d + m).reshape(k, n).astype(np.float32)


def test_bias_aware_rtn_removes_the_group_offset_of_a_q4_1_source():
    w = _q4_1_like(256, 64)
    x = np.random.default_rng(5).standard_normal((512, 256)).astype(np.float32) + 1.0  # a common component
    group_bias = lambda q: np.abs((q.dequantize().astype(np.float32) - w).reshape(8, 32, 64).mean(1)).mean()  # noqa: E731
    plain, aware = rtn(w, "e0m4", 32), rtn(w, "e0m4", 32, bias_weight=1.0)
    assert group_bias(aware) < 0.5 * group_bias(plain)
    assert _out_err(x, w, aware) < 0.8 * _out_err(x, w, plain)


def test_calibration_mixes_domains_in_equal_shares_and_prompt_lengths():
    from tvm_lite.quant import calibration

    class Chars:  # one token per character: the chunking is what is tested
        chat_template = None
        bos_token_id = None

        def encode(self, text):
            return [ord(c) for c in text]

    samples = [[7] * 300, [8] * 300]
    chunks = calibration.mixed_chunks(Chars(), 1200, ("docs", "code", "self"), samples)
    assert sum(map(len, chunks)) == 1200
    assert [len(c) for c in chunks[:3]] == [128, 256, 16]  # 400 per domain, lengths cycled
    assert chunks[-1] == [8] * 100 and chunks[-2] == [7] * 300  # the model's own samples
    with pytest.raises(QuantFormatError, match="calibration domains"):
        QuantConfig("e0m4", "gptq", calib_domains=("docs", "wikipedia"))


def test_evaluation_domains_are_never_calibration_text():
    from tvm_lite.quant import corpora

    render = lambda msgs: "".join(f"<{m['role']}>{m['content']}" for m in msgs)  # noqa: E731
    calib = {d: corpora.domain_text(d, render) for d in ("docs", "code", "chat", "legal")}
    for d in corpora.EVAL_DOMAINS:
        text = corpora.domain_text(d, render)
        assert len(text) > 20000, d
        for probe in (text[5000:5200], text[-3000:-2800]):
            assert not any(probe in c for c in calib.values()), d
    with pytest.raises(corpora.CorpusError, match="unknown text domain"):
        corpora.domain_text("wikipedia")


def test_loss_ratios_are_per_domain_against_int4_rtn_of_the_same_group_size():
    from tvm_lite.quant.evaluate import _add_loss_ratios

    rows = [{"config": "fp16", "ppl a": 10.0, "ppl b": 4.0},
            {"config": "int4-RTN g32", "ppl a": 14.0, "ppl b": 6.0},
            {"config": "E0M4-GPTQ g32", "ppl a": 11.0, "ppl b": 5.0}]
    _add_loss_ratios(rows, ("a", "b"))
    assert rows[2]["loss÷int4 a"] == pytest.approx(0.25) and rows[2]["loss÷int4 b"] == pytest.approx(0.5)
    assert rows[2]["worst"] == pytest.approx(0.5)


def test_cli_checks_quant_options(capsys):
    from tvm_lite.cli import main

    assert main(["compile", "nowhere.onnx", "--quant", "e0m4", "--group-size", "12"]) == 2
    assert "group size must be a positive multiple of 8" in capsys.readouterr().err


# -- TVM kernels == numpy reference --------------------------------------------------------------
def _run_dequant(qw):
    func = kernels.dequant_func(qw.fmt, qw.k, qw.n, qw.group_size).with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.empty((qw.k, qw.n), "float16")
    ex["main"](*[tvm.runtime.tensor(a) for a in qw.arrays().values()], out)
    return out.numpy()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, n, g", [(576, 192, 32), (256, 64, 128), (99, 13, 32), (50, 7, 16)])
def test_tvm_dequant_is_bit_exact_on_random_weights(fmt, k, n, g):
    # (99, 13): K not a multiple of the group (nor of 4), N not a multiple of 8
    qw = rtn(_weight(k, n, seed=k + n), fmt, g)
    np.testing.assert_array_equal(_run_dequant(qw).view(np.uint16), qw.dequantize().view(np.uint16))


def _toy_module(k, n, w, seq=None, embed=None):
    """main(x[1, seq, K]) = matmul(x, W) + matmul(x, W), W a weight parameter (and optionally an
    embedding take), shaped like the importer's output."""
    bb = relax.BlockBuilder()
    seq = seq if seq is not None else tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq, k], "float32"))
    wv = relax.Var("w", relax.TensorType([k, n], "float32"))
    params, names, values = [x, wv], ["w"], [w]
    if embed is not None:
        ids = relax.Var("ids", relax.TensorType([1, seq], "int64"))
        ev = relax.Var("emb", relax.TensorType(list(embed.shape), "float32"))
        params = [x, ids, wv, ev]
        names, values = ["w", "emb"], [w, embed]
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, wv))
            out = relax.op.add(y, y)
            if embed is not None:
                out = relax.Tuple([bb.emit(out), bb.emit(relax.op.take(ev, ids, axis=0))])
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attrs({"num_input": 2 if embed is not None else 1,
                                          "tvm_lite.param_names": names,
                                          "params": [tvm.runtime.tensor(v) for v in values]})
    return mod


def _vm(mod):
    mod, params = tvm_lite.detach_params(mod)
    return relax.VirtualMachine(tvm_lite.build(mod, "llvm"), tvm.cpu()), params


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, n, tokens", [(64, 48, 5), (99, 13, 1)])
def test_dequant_fused_matmul_matches_numpy(fmt, k, n, tokens):
    w = _weight(k, n)
    qw = rtn(w, fmt, 32)
    mod = QuantizeWeightMatmuls({"w": qw})(_toy_module(k, n, w))
    func = mod["main"]
    assert [str(s) for s in func.attrs["tvm_lite.param_names"]] == [f"w.{fmt}.{r}" for r in qw.arrays()]
    assert "R.matmul" not in func.script() and f"{fmt}_matmul" in mod.script()
    x = np.random.default_rng(3).standard_normal((1, tokens, k)).astype("float32")
    vm, params = _vm(mod)
    out = vm["main"](tvm.runtime.tensor(x), *params).numpy()
    np.testing.assert_allclose(out, 2 * (x @ qw.effective_weight()), rtol=1e-4, atol=1e-4)


def test_awq_input_scale_and_quantized_embedding_run_in_tvm():
    k, n, vocab = 64, 40, 50
    w, emb = _weight(k, n), _weight(vocab, k, seed=5)
    x = _calibration(k, 256)
    qw = awq(w, x.T.astype(np.float64) @ x, np.abs(x).mean(0), "e0m4", 32)
    qe = rtn(emb.T.copy(), "e0m4", 16)  # the table is quantized transposed, [D, V]
    mod = QuantizeWeightMatmuls({"w": qw, "emb": qe})(_toy_module(k, n, w, embed=emb))
    assert mod.attrs["tvm_lite.quant_stats"]["take"] == 1
    ids = np.array([[0, 7, 49, 3]], "int64")
    xin = np.random.default_rng(2).standard_normal((1, 4, k)).astype("float32")
    vm, params = _vm(mod)
    y, e = vm["main"](tvm.runtime.tensor(xin), tvm.runtime.tensor(ids), *params)
    np.testing.assert_allclose(y.numpy(), 2 * (xin @ qw.effective_weight()), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(e.numpy()[0], qe.dequantize().astype(np.float32).T[ids[0]])


def test_pass_errors_name_the_weight():
    w = _weight(64, 16)
    with pytest.raises(QuantizeError, match="no weight parameter named"):
        QuantizeWeightMatmuls({"nope": rtn(w)})(_toy_module(64, 16, w))
    with pytest.raises(QuantizeError, match=r"quantized 'w' is \[32, 16\]"):
        QuantizeWeightMatmuls({"w": rtn(w[:32])})(_toy_module(64, 16, w))


# -- OpenCL for Adreno ---------------------------------------------------------------------------
def _adreno_source(fmt):
    w = _weight(576, 192)
    mod = QuantizeWeightMatmuls({"w": rtn(w, fmt, 32)})(_toy_module(576, 192, w))
    return tvm_lite.device_source(tvm_lite.build(mod, "opencl -device=adreno"), "opencl")


# the E0M4 dequant: (codes >> 4i) & 15 | 0x6400 (25600), on a vector of ushorts
E0M4_BITS = re.compile(r"&\s*\(\(ushort\d*\)\(\(ushort\)15[^;]*\)\)\)\s*\|\s*\(\(ushort\d*\)\(\(ushort\)25600")


def test_opencl_e0m4_dequant_is_two_bitwise_ops_and_no_conversion(tmp_path):
    e0m4, int4 = _adreno_source("e0m4"), _adreno_source("int4")
    decode = [line for line in e0m4.splitlines() if "25600" in line]
    assert decode and all(E0M4_BITS.search(line) for line in decode)
    # the fp16 is the same bits reinterpreted, never converted from an integer
    assert "convert_half" not in e0m4 and "(half)(" not in e0m4
    assert re.search(r"\*\(half\d*\s*\*\)\(&", e0m4) or "as_half" in e0m4
    # the int4 ablation converts (and does not OR in an exponent)
    assert "convert_half" in int4 and "25600" not in int4
    if shutil.which("clang-15"):
        for name, src in (("e0m4", e0m4), ("int4", int4)):
            path = tmp_path / f"{name}.cl"
            path.write_text(src)
            res = clang_opencl(path)
            assert res.returncode == 0, res.stderr[-2000:]


# -- the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_mod(export_dir):
    return tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")


@pytest.mark.slow
def test_real_weights_bit_exact_and_every_projection_found(real_mod):
    uses = find_weight_uses(real_mod)
    roles = [u.role for u in uses]
    assert roles.count("proj") == 30 * 7 and roles.count("lm_head") == 1 and roles.count("embedding") == 1
    func = real_mod["main"]
    values = dict(zip([str(n) for n in func.attrs["tvm_lite.param_names"]], func.attrs["params"]))
    for u in (uses[0], next(u for u in uses if u.k == 1536)):  # q_proj and down_proj of layer 0
        w = values[u.name].numpy()
        for fmt in FORMATS:
            qw = rtn(w, fmt, 32)
            np.testing.assert_array_equal(_run_dequant(qw).view(np.uint16),
                                          qw.dequantize().view(np.uint16))


@pytest.mark.slow
def test_calibration_runs_the_model_on_text(real_mod, export_dir):
    from tvm_lite.quant import calibration
    from tvm_lite.tokenizer import Tokenizer

    uses = [u for u in find_weight_uses(real_mod) if u.role == "proj"][:7]  # layer 0
    chunks = calibration.token_chunks(Tokenizer(export_dir("dynamo")), calibration.calibration_text(), 64, 32)
    stats = calibration.collect(real_mod, uses, chunks)
    q, k, v = (stats[u.name] for u in uses[:3])
    assert q is k is v  # one input, one set of statistics
    assert q.tokens == 64 and q.hessian.shape == (576, 576)
    np.testing.assert_allclose(q.hessian, q.hessian.T)
    assert np.linalg.eigvalsh(q.hessian).min() > -1e-6 * np.trace(q.hessian)
    assert np.all(q.mean_abs > 0)
    assert stats[uses[6].name].hessian.shape == (1536, 1536)  # down_proj reads the MLP's inside


@pytest.mark.slow
def test_e0m4_smollm2_answers_paris(export_dir):
    from tvm_lite.artifact import compile_model, load_manifest
    from tvm_lite.engine import Engine
    from tvm_lite.quant.evaluate import answers_paris

    art = compile_model(export_dir("dynamo"), "llvm", quant=QuantConfig("e0m4", "rtn", 32))
    manifest = load_manifest(art)
    q = manifest["quant"]
    assert q["format"] == "e0m4" and q["group_size"] == 32 and q["matmul"] == 210
    assert q["bytes_per_weight"] == pytest.approx(0.625)
    names = manifest["param_names"]
    # 210 matrices quantized; q/k/v and gate/up then merged into one matrix each (5 -> 2 a layer)
    assert sum(n.endswith(".e0m4.codes") for n in names) == 210 - 30 * 3
    ok, text = answers_paris(Engine(art))
    assert ok, text


@pytest.mark.slow
def test_whole_e0m4_model_builds_for_adreno(real_mod, export_dir, opencl_source):
    from tvm_lite.quant import quantize_module
    from tvm_lite.quant.quantize import tokenizer_of

    _, summary = quantize_module(real_mod, QuantConfig("e0m4", "rtn", 32), tokenizer_of(export_dir("dynamo")))
    assert summary["matmul"] == 210 and summary["take"] == 0
    src = opencl_source("adreno", "e0m4")  # the same quantization, built once per session
    bodies = {}  # kernel name -> its definition (the source also repeats prototypes)
    for m in re.finditer(r"__kernel void (\w+)\(([^)]*)\)\s*\{", src):
        bodies[m.group(1)] = (m.group(2), src[m.end():src.find("\n}\n", m.end())])
    on_codes = {name: body for name, (args, body) in bodies.items() if "codes_ptr" in args}
    assert len(on_codes) >= 6  # the q/k/v/o/gate/up/down shapes, with and without epilogues
    for name, body in on_codes.items():  # each decodes codes under the exponent, none converts
        assert "25600" in body and "convert_half" not in body, name
