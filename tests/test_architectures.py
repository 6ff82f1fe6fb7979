"""Other decoder architectures go through the same code (no model code per architecture): tiny
random-weight models built from transformers configs (``tvm_lite/arch_matrix.py``), exported,
compiled, run by the Engine (a prefill, a second chunk, decode steps past the sliding window) and
compared with torch logit by logit.

CI runs a subset that covers each mechanism once (sliding window, soft-capping, local/global
layers, mixture of experts, both exporters, E0M4 experts); ``TVM_LITE_FULL_MATRIX=1`` runs every
architecture with both exporters (the README's table comes from ``python -m tvm_lite.arch_matrix``,
the same checks)."""

import os

import numpy as np
import pytest

from conftest import cuda_device
from tvm_lite import arch_matrix

pytestmark = pytest.mark.slow

CI_SUBSET = [
    ("mistral", "dynamo"),  # sliding window on every layer
    ("gemma2", "torchscript"),  # window + attention and final-logit soft-capping
    ("gemma3_text", "dynamo"),  # local (window, own rotary base) / global layers
    ("qwen2_moe", "dynamo"),  # mixture of experts (+ shared expert), dense export
    ("qwen3", "torchscript"),  # QK norms, head_dim != hidden / heads
]
MATRIX = [(a, e) for a in arch_matrix.ARCHITECTURES for e in ("dynamo", "torchscript")] \
    if os.environ.get("TVM_LITE_FULL_MATRIX") else CI_SUBSET


@pytest.fixture(scope="module")
def torch_logits():
    import functools

    return functools.cache(arch_matrix.torch_logits)


@pytest.mark.parametrize("arch, exporter", MATRIX)
def test_architecture_matches_torch(arch, exporter, torch_logits):
    from tvm_lite.engine import Engine

    got = arch_matrix.engine_logits(Engine(arch_matrix.build(arch, exporter)))
    ref = torch_logits(arch)
    assert got.shape == ref.shape == (len(arch_matrix.IDS), arch_matrix.VOCAB)
    np.testing.assert_allclose(got, ref, atol=arch_matrix.TOLERANCE, rtol=0)


@pytest.mark.parametrize("arch, exporter",
                         [m for m in MATRIX if m[0] not in arch_matrix.WINDOW_ARCHS])
def test_decode_over_a_padded_context_gives_the_unpadded_logits(arch, exporter):
    """decode_padded's premise (what CUDA graphs replay), per architecture: a decode step whose
    context is padded with masked keys (past_len 37 beyond the real one, mask 0 there, the
    position the real one) gives the logits of the unpadded step -- the export applies the
    attention mask to every key -- and writes its K/V row at the position either way."""
    from tvm_lite import convention as cv
    from tvm_lite.engine import Engine

    engine = Engine(arch_matrix.build(arch, exporter), max_context=64)
    assert engine.runner.padded_steps
    session = engine.new_session()
    for cache in session.past:  # (the engine zeroes them before decode_padded runs)
        cache.copyfrom(np.zeros(cache.shape, str(cache.dtype)))
    ids = arch_matrix.IDS
    engine.forward(session, ids[:-1])
    length = session.length

    def decode(pad):
        mask = np.zeros((1, length + pad + 1), "int64")
        mask[0, :length + 1] = 1
        inputs = [*engine.runner.inputs(np.array([[ids[-1]]], "int64"), mask,
                                        np.array([[length]], "int64")),
                  engine.link.make_shape([length + pad])]
        return engine._call(*engine.runner.call(session, cv.DECODE, inputs))[0].numpy()[0, -1]

    np.testing.assert_allclose(decode(37), decode(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
def test_window_models_match_torch_over_a_long_prompt(arch, torch_logits):
    """Ring caches (CPU) through a 150-token prefill and a 70-token chunk (both far longer than
    the window of 4: the ring kernel's position masking and its write of the last rows), then
    decode steps."""
    from tvm_lite.engine import Engine

    engine = Engine(arch_matrix.build(arch, "dynamo"))
    got = arch_matrix.engine_logits(engine, arch_matrix.LONG_IDS, arch_matrix.LONG_PREFILL,
                                    arch_matrix.LONG_CHUNK)
    ref = torch_logits(arch, tuple(arch_matrix.LONG_IDS))
    np.testing.assert_allclose(got, ref, atol=arch_matrix.TOLERANCE, rtol=0)


def test_e0m4_experts_run(torch_logits):
    """The experts' weights of a MoE export are 4-bit in an E0M4 build, which runs and stays near
    torch (random weights: only a coarse bound)."""
    import json

    from tvm_lite.engine import Engine

    art = arch_matrix.build("qwen2_moe", "dynamo", quant=True)
    manifest = json.loads((art / "manifest.json").read_text())
    text = json.dumps(manifest.get("quant", {}))
    assert "e0m4" in text
    got = arch_matrix.engine_logits(Engine(art))
    ref = torch_logits("qwen2_moe")
    assert np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.5


def test_dense_experts_export_equals_transformers():
    """The export-time dense experts forward computes what transformers' routed loop computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from tvm_lite.export import _densify_experts

    folder = arch_matrix.hf_folder("mixtral")
    ref_model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    dense = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert _densify_experts(dense) == 2  # one experts module per layer
    ids = torch.tensor([arch_matrix.IDS])
    with torch.no_grad():
        np.testing.assert_allclose(dense(ids).logits.numpy(), ref_model(ids).logits.numpy(),
                                   atol=1e-5)


def test_softcap_attention_kernel_matches_numpy():
    """The fused attention kernel's soft-capping ``c * tanh(x / c)`` against numpy."""
    import tvm

    from tvm_lite.relax_passes.fuse_attention import attention_params, reference_kernel, reference_numpy

    heads, kv, d, n, m, cap = 4, 2, 16, 3, 7, 5.0
    p = attention_params(heads, kv, d, "float32", 0.25, "float32", False, True, False,
                         softcap=cap)
    f = tvm.compile(tvm.IRModule({"main": reference_kernel(p).with_attr("global_symbol", "main")}),
                    "llvm")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, heads, n, d)).astype("float32") * 2
    k, v = (rng.standard_normal((m, kv, d)).astype("float32") for _ in range(2))
    mask = np.where(np.arange(m)[None] <= np.arange(n)[:, None] + m - n, 0, -1e9)
    mask = mask.astype("float32")[None, None]
    out = tvm.runtime.empty((1, heads, n, d), "float32")
    f(*(tvm.runtime.tensor(a) for a in (q, k, v, mask)), out)
    want = reference_numpy(q, k, v, mask, 0.25, heads // kv, softcap=cap)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    plain = reference_numpy(q, k, v, mask, 0.25, heads // kv)
    assert np.abs(plain - want).max() > 1e-3  # the cap changes the result at these scores


def test_window_slice_keeps_symbolic_shape():
    """A slice to the last ``window`` rows with bounds computed from the length (max/min/select
    of symbolic sizes, as window caches are sliced) keeps a symbolic shape on the host."""
    import tvm
    from onnx import TensorProto as TP
    from onnx import helper as h

    import tvm_lite

    consts = dict(one=1, w=4, zero=0, big=2**62)
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Gather", ["s", "one"], ["len"], axis=0),
        h.make_node("Sub", ["len", "w"], ["d"]),
        h.make_node("Max", ["d", "zero"], ["start"]),
        h.make_node("Slice", ["x", "start", "big", "one"], ["y"]),
        h.make_node("Shape", ["y"], ["ys"]),
        h.make_node("Gather", ["ys", "one"], ["ylen"], axis=0),
        h.make_node("Less", ["ylen", "w"], ["short"]),
        h.make_node("Where", ["short", "ylen", "w"], ["n"]),
        h.make_node("Concat", ["one", "n"], ["shape"], axis=0),
        h.make_node("Reshape", ["y", "shape"], ["out"]),
    ]
    graph = h.make_graph(nodes, "window", [h.make_tensor_value_info("x", TP.FLOAT, [1, "past_seq"])],
                         [h.make_tensor_value_info("out", TP.FLOAT, None)],
                         [h.make_tensor(k, TP.INT64, [1], [v]) for k, v in consts.items()])
    mod = tvm_lite.from_onnx(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    shape = mod["main"].body.body.ty.shape.values
    assert int(shape[0]) == 1 and not isinstance(shape[1], tvm.tirx.IntImm)
    ex = tvm_lite.build(mod, "llvm")
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    for length in (2, 4, 9):
        x = np.arange(length, dtype="float32")[None]
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x[:, -4:])


def test_compile_model_and_engine_take_the_same_inputs(tmp_path):
    """An HF folder goes to compile_model and Engine as the CLI takes it; a file of another kind
    is refused by name."""
    from tvm_lite.artifact import ArtifactError, compile_model, onnx_input
    from tvm_lite.engine import Engine

    folder = arch_matrix.hf_folder("llama")
    onnx = onnx_input(folder, progress=lambda _: None)
    assert onnx.name == "model.onnx" and onnx_input(onnx.parent) == onnx
    art = compile_model(folder, "llvm", progress=lambda *_: None)
    assert art == compile_model(onnx, "llvm", progress=lambda *_: None)  # one cache entry
    np.testing.assert_array_equal(Engine(folder).forward(Engine(folder).new_session(), [5, 17]),
                                  Engine(art).forward(Engine(art).new_session(), [5, 17]))
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\0")
    with pytest.raises(ArtifactError, match=r"unsupported model input .*weights\.safetensors.*\.safetensors file"):
        compile_model(bad, "llvm")
    with pytest.raises(ArtifactError, match="unsupported model input .*a folder without model.onnx"):
        Engine(tmp_path)


def test_window_layers_get_ring_caches_of_window_rows():
    """Gemma 3's local layers (the CI subset's gemma3_text build, which matches torch above
    through a prefill longer than the window, a chunk and decode steps past it) get ring caches
    of ``window`` rows; its global layers keep full-length caches. Read from the artifact's
    calling convention and from the caches a session allocates."""
    import json

    from tvm_lite.engine import Engine
    from tvm_lite.export import sliding_windows

    from transformers import AutoConfig

    art = arch_matrix.build("gemma3_text", "dynamo")
    windows = sliding_windows(AutoConfig.from_pretrained(str(arch_matrix.hf_folder("gemma3_text"))))
    assert sorted(set(windows)) == [0, arch_matrix.WINDOW]  # local and global layers
    rows = json.loads((art / "manifest.json").read_text())["convention"]["kv_caches"]["rows"]
    assert rows == [w or None for w in windows for _ in ("key", "value")]
    engine = Engine(art, max_context=64)
    session = engine.new_session()
    assert [t.shape[0] for t in session.past] == [w or 64 for w in windows for _ in "kv"]
    allocated = sum(t.numpy().nbytes for t in session.past)
    assert engine.kv_cache_bytes() == allocated



@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", sorted(arch_matrix.GPU_TOLERANCE))
@pytest.mark.parametrize("arch", arch_matrix.WINDOW_ARCHS)
def test_window_model_on_cuda_matches_cpu(arch, dtype):
    """The window models built for CUDA have ring caches of ``window`` rows on their local layers
    (the GPU ring kernels: SIMT in fp32, tensor cores for the fp16 prefill) and give the CPU
    build's logits (which match torch) through a prefill, a chunk and decode past the window,
    short and long (a 150-token prefill and a 70-token chunk: key tiles below the window)."""
    from tvm_lite.export import sliding_windows

    from transformers import AutoConfig

    got = arch_matrix.check_cuda(arch, dtype)
    windows = sliding_windows(AutoConfig.from_pretrained(str(arch_matrix.hf_folder(arch))))
    assert got["rows"] == [w or None for w in windows for _ in ("key", "value")]
    assert got["short"] <= arch_matrix.GPU_TOLERANCE[dtype], got
    assert got["long"] <= arch_matrix.GPU_TOLERANCE[dtype], got


@pytest.mark.parametrize("arch, target", [("gemma3_text", "opencl -device=adreno"),
                                          ("mistral", "cuda -arch=sm_90")])
def test_gpu_builds_of_window_models_use_ring_caches(arch, target, tmp_path):
    """A GPU build of a window model (no device needed: built, not run) has ring caches of
    ``window`` rows on its local layers, runs their attention as the GPU ring kernels, and builds
    no mask for them (Mistral: every layer windowed, so no mask kernel at all); Adreno's OpenCL
    C passes clang."""
    import re

    import tvm_lite
    from conftest import CLANG, clang_opencl
    from tvm_lite.export import export_windows

    onnx = arch_matrix.export(arch, "dynamo")
    windows = export_windows(onnx)
    described: list = []
    ex = tvm_lite.build(tvm_lite.from_onnx(onnx / "model.onnx"), target, dump_dir=str(tmp_path),
                        described=described, kv_windows=tuple(windows))
    assert described[0]["kv_caches"]["rows"] == [w or None for w in windows for _ in "kv"]
    ir = (tmp_path / "3_schedule.py").read_text()
    decode = ir[ir.index("def decode("):]
    decode = decode[:decode.index("\n    @", 10)]
    calls = set(re.findall(r"cls\.(\w+)", decode))
    assert "attention_ring_decode" in calls
    assert ("attention_decode" in calls) == (0 in windows)  # the global layers'
    mask_kernels = [c for c in calls if "where" in c and ("less" in c or "greater" in c)]
    assert bool(mask_kernels) == (0 in windows), mask_kernels
    if "opencl" in target and CLANG:
        path = tmp_path / "model.cl"
        path.write_text(tvm_lite.device_source(ex, "opencl"))
        res = clang_opencl(path)
        assert res.returncode == 0, res.stderr[:2000]
