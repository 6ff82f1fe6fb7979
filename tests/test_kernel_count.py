"""Kernels a decode step launches in the Adreno build (issue 17): counted in the build, so a change
that adds kernels to the decode step fails CI.

    python -m pytest tests/test_kernel_count.py -s     # prints the kernels per layer and per step

The count is static (``tvm_lite.profile.kernel_launches``): the PrimFunc calls in the ``decode``
function's VM code, each expanded to its device kernels (a split-K GEMV or the flash-decoding
attention is two). On CUDA the profiler (``tvm-lite profile``) counts the same launches at run time.
"""

import functools

import pytest

import tvm_lite
from tvm_lite.profile import kernel_launches
from tvm_lite.artifact import weights_as_built

LAYERS = 30  # SmolLM2-135M
# the decode step of the fp32 Adreno build today: 7 kernels per layer + 5 per step (was 7 + 10,
# 11 + 13, 18 + 13 before that): q/k/v and gate/up merged (MergeSharedInputProjections), every GEMV one
# kernel (the plan's cost model finds no second pass worth its launch at SmolLM2's sizes); each
# RMSNorm computed by the GEMV after it (FuseGEMVPrologue: the residual add is the previous GEMV's
# epilogue), silu_mul by the down GEMV, the Q rotary and cos/sin by kv_append: per layer
# q/k/v+norm, kv_append (Q, K, V), attention (2: split + merge), o+add, gate/up+norm,
# down+silu+add. Once a step: the importer's mask chain (2 kernels: the query position, a
# host-value fill kept out of fusion since issue 18 -- TVM 0.27's FuseTIR failed on it -- and one
# fused kernel; it was 7 before the padding mask's GatherND became a view of the attention mask),
# the rotary angles, the embedding and lm_head+final norm. A regression fails.
CEILING = 7 * LAYERS + 5
TARGET = 8 * LAYERS + 6  # issue 17's target
PER_LAYER = {"kv_append": 1, "attention_decode": 2, "rms_norm_matmul": 2, "silu_mul": 1}


def _decode_launches(export_dir, target):
    mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
    mod = weights_as_built(mod, progress=None)  # as compile_model does (q/k/v and gate/up merged)
    mod = tvm_lite.detach_params(mod)[0]
    ex = tvm_lite.build(mod, target)
    return functools.partial(kernel_launches, ex)


@pytest.fixture(scope="module")
def adreno_decode(export_dir):
    return _decode_launches(export_dir, "opencl -device=adreno")


def _per_layer(launches: dict) -> dict:
    """Kernels a layer launches, by the fused piece their PrimFunc name contains."""
    return {piece: sum(n for k, n in launches.items() if piece in k) // LAYERS
            for piece in PER_LAYER}


def test_adreno_decode_step_kernel_count(adreno_decode):
    launches = adreno_decode("decode")
    total = sum(launches.values())
    per_layer = {k: n // LAYERS for k, n in launches.items() if n >= LAYERS}
    print(f"\ndecode: {total} kernels a step; per layer {sum(per_layer.values())}: {per_layer}; "
          f"once a step: {total - LAYERS * sum(per_layer.values())}")
    attention = sum(n for k, n in launches.items() if k.startswith("attention_decode"))
    assert attention == 2 * LAYERS  # flash-decoding: the split kernel and the merge, per layer
    assert not any(k.startswith(("softmax", "attention_prefill")) for k in launches)
    assert not any("rotary" in k or k.startswith(("add_rms_norm", "rms_norm")) for k in launches)
    assert not any("gather_nd" in k for k in launches)  # the padding mask is a view of the input
    assert _per_layer(launches) == PER_LAYER
    assert total <= CEILING, f"{total} kernels a decode step (ceiling {CEILING})"


def test_adreno_decode_step_meets_the_kernel_target(adreno_decode):
    assert sum(adreno_decode("decode").values()) <= TARGET


def test_step_inputs_are_two_kernels(adreno_decode):
    """What a one-by-one step runs before the decoder (the mask and the positions, made on the
    device from three sizes: relax_passes/add_step_helpers.py) is two kernels; it was four
    (ones, zeros and their concat for the mask), as are ``decode_padded``'s inputs."""
    inputs = adreno_decode("step_inputs")
    assert sum(inputs.values()) == 2 and "step_mask" in inputs, inputs
    assert sum(adreno_decode("padded_step_inputs").values()) == 2


@pytest.mark.slow
def test_cuda_e0m4_fp16_decode_step_has_the_same_fusions():
    """The build the GPU benchmarks time -- fp16 rows, E0M4 weights, the lm_head 4-bit too --
    launches as few kernels on CUDA as the Adreno build: its GEMVs are the packed half2 kernel,
    which computes its RMSNorm / SiLU prologue itself (schedules/gpu_gemv_half2.py; 10 kernels a
    layer before). (The fp32 CUDA build's count, checked here before, is covered by this one and
    the Adreno build's.)"""
    from tvm_lite.bench.models import _quant
    from tvm_lite.compiler import device_source
    from tvm_lite.export import export_onnx
    from tvm_lite.quant.quantize import quantize_module, tokenizer_of

    onnx_dir = export_onnx(dtype="float16", progress=lambda *_: None)
    mod = tvm_lite.from_onnx(onnx_dir / "model.onnx")
    mod, _ = quantize_module(mod, _quant("e0m4"), tokenizer_of(onnx_dir), progress=lambda *_: None)
    mod = tvm_lite.detach_params(weights_as_built(mod, progress=None))[0]
    ex = tvm_lite.build(mod, "cuda -arch=sm_90")
    launches = kernel_launches(ex, "decode")
    total = sum(launches.values())
    print(f"\ncuda e0m4 fp16 decode: {total} kernels a step: {launches}")
    gemvs = {k: n // LAYERS for k, n in launches.items() if "e0m4_matmul" in k and n >= LAYERS}
    # q/k/v and gate/up with their norm, down with silu_mul (and the residual add), o + add
    assert sum(n for k, n in gemvs.items() if "rms_norm" in k) == 2
    assert sum(n for k, n in gemvs.items() if "silu_mul" in k) == 1
    assert not any(k.startswith(("rms_norm", "fused_strided_slice")) for k in launches)
    per_layer = sum(n // LAYERS for n in launches.values() if n >= LAYERS)
    assert per_layer == 7, f"{per_layer} kernels a layer (the Adreno build's 7)"
    assert total <= CEILING, f"{total} kernels a decode step (ceiling {CEILING})"
    src = device_source(ex, "cuda")
    assert "tvm_lite_dq_hfma2" in src and "xs32" in src  # the packed kernel, staging its row
