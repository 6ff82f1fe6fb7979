"""The gated MLP's activation stored by the gate+up GEMM (issue 16: the prefill's small kernels).

A build for a target whose prefill GEMM stores the activation (``pipeline.interleaves_gate_up``,
on with ``pipeline.INTERLEAVE_GATE_UP``) merges gate and up with their columns alternating in
blocks of 8 (relax_passes/merge_shared_input_projections.py); ``FuseGatedEpilogue`` (relax_passes/
fuse_gated_epilogue.py) then makes a prefill's gate+up GEMM and its ``act(gate) * up`` one
kernel where the target's GEMM stores it (CUDA with tensor cores). The kernels' numerics are
checked in tests/test_gpu_schedules.py (``-k gated``: their CUDA C run on the CPU); here the
whole tiny decoder.
"""

import numpy as np
import pytest

import tvm_lite
from tvm_lite import pipeline
from tvm_lite.artifact import weights_as_built
from tvm_lite.profile import kernel_launches

LAYERS = 2  # tiny-llama


def _build(onnx_dir, target, interleave: bool):
    mod = weights_as_built(tvm_lite.from_onnx(onnx_dir / "model.onnx"), progress=None,
                           interleave_gate_up=interleave)
    return tvm_lite.build(mod, target)


PREFILLS = ("prefill", "prefill_last", "prefill_fill")


def test_cuda_prefill_stores_the_activation_from_the_gemm(tiny_decoder_fp16, tmp_path):
    """Built for CUDA (sm_90a): with the interleaved layout no prefill function has an
    activation kernel (the gate+up GEMM's kernel, named for it, stores it): ``prefill`` one
    kernel a layer fewer, ``prefill_last`` one a layer but the last (whose MLP still runs on the
    last row only: AddLastRowPrefill takes the interleaved views as row-local), ``prefill_fill``
    likewise; decode keeps the activation in the down GEMV's prologue (the same launches), and
    nvcc builds the model."""
    import shutil
    import subprocess

    launches = {}
    for on in (False, True):
        ex = _build(tiny_decoder_fp16, "cuda -arch=sm_90a", on)
        launches[on] = {f: kernel_launches(ex, f) for f in (*PREFILLS, "decode")}
    off, on = launches[False], launches[True]
    activations = {f: sum(n for k, n in off[f].items() if k.endswith("silu_mul1"))
                   for f in PREFILLS}  # (the activation's own kernel)
    assert activations == {"prefill": LAYERS, "prefill_last": LAYERS - 1,
                           "prefill_fill": LAYERS - 1}, activations
    for f in PREFILLS:
        assert not any(k.endswith("silu_mul1") for k in on[f]), on[f]
        assert sum(on[f].values()) == sum(off[f].values()) - activations[f], f
    assert [k for k in on["prefill"] if "_gated_silu_mul" in k], on["prefill"]
    assert sum(on["decode"].values()) == sum(off["decode"].values())
    assert any("silu_mul" in k and "matmul" in k for k in on["decode"])  # down's prologue
    if shutil.which("nvcc"):
        (tmp_path / "model.cu").write_text(tvm_lite.device_source(ex, "cuda"))
        res = subprocess.run(["nvcc", "-arch=sm_90a", "-c", "-o", str(tmp_path / "m.o"),
                              str(tmp_path / "model.cu")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]


def test_other_targets_keep_the_activation_kernel(tiny_decoder_fp16, tmp_path):
    """Where no GEMM stores a gated epilogue (Adreno's OpenCL) the interleaved layout changes
    nothing but the activation's reads: the same kernels a step, and clang-15 takes the
    OpenCL C."""
    from conftest import CLANG, clang_opencl

    launches = {}
    for on in (False, True):
        ex = _build(tiny_decoder_fp16, "opencl -device=adreno", on)
        launches[on] = {f: sum(kernel_launches(ex, f).values()) for f in (*PREFILLS, "decode")}
    assert launches[True] == launches[False]
    if CLANG:
        (tmp_path / "model.cl").write_text(tvm_lite.device_source(ex, "opencl"))
        res = clang_opencl(tmp_path / "model.cl")
        assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("target, interleaves", [
    ("cuda -arch=sm_90a", True), ("cuda -arch=sm_80", True), ("cuda -arch=sm_75", False),
    ("opencl -device=adreno", False), ("opencl -device=mali", False), ("llvm", False)])
def test_only_targets_whose_gemm_stores_the_activation_interleave(target, interleaves,
                                                                  monkeypatch):
    """A build interleaves gate and up (``compile_model`` and ``tvm-lite tune`` ask
    ``pipeline.interleaves_gate_up``) only where the prefill GEMM stores the activation: CUDA
    with mma.sync; by default (the switch on), and never with the switch off."""
    from tvm_lite.target import parse_target

    assert pipeline.INTERLEAVE_GATE_UP
    assert pipeline.interleaves_gate_up(parse_target(target)) == interleaves
    monkeypatch.setattr(pipeline, "INTERLEAVE_GATE_UP", False)
    assert not pipeline.interleaves_gate_up(parse_target(target))


def test_weights_are_interleaved_only_when_asked(tiny_decoder_fp16):
    """``weights_as_built`` (and the pass) keep gate and up as halves unless the caller asks for
    the interleaved layout (a build asks as ``pipeline.interleaves_gate_up`` says for its
    target): a module merged without a target is laid out as every target reads it."""
    mod = tvm_lite.from_onnx(tiny_decoder_fp16 / "model.onnx")
    assert "gate_up_blocks" not in weights_as_built(mod, progress=None).script()
    for choice in (False, True):
        merged = weights_as_built(mod, progress=None, interleave_gate_up=choice).script()
        assert ("gate_up_blocks" in merged) == choice


def test_gated_epilogue_runs_correctly_on_a_cuda_gpu(tiny_decoder_fp16, tmp_path, monkeypatch):
    """On the GPU, the fp16 model's prefill (gate+up GEMM storing the activation) and decode
    logits with gate and up interleaved (the default) match the halves build's."""
    from conftest import cuda_device, logits_off_and_on

    if cuda_device() is None:
        pytest.skip("needs a CUDA device")
    from tvm_lite.target import local_cuda_target

    ids = np.random.default_rng(0).integers(5, 500, 70).tolist()
    without, gated = logits_off_and_on(tiny_decoder_fp16, local_cuda_target(), tmp_path,
                                       monkeypatch, pipeline, "INTERLEAVE_GATE_UP", ids,
                                       steps=4, device="cuda", max_context=256)
    assert np.isfinite(gated).all()
    np.testing.assert_allclose(gated, without, rtol=0, atol=2e-2 * np.abs(without).max())
