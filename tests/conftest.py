"""Shared, session-scoped fixtures: one export and one compile per exporter flavour per session.

Exports and artifacts are cached under $TVM_LITE_CACHE (default ~/.cache/tvm_lite), so a second
session reuses them.
"""

import functools
import os
import shutil
import subprocess

import pytest

# pytest-xdist workers share the cores: each worker's TVM pool gets its share (tvm_lite would
# otherwise give every process all physical cores: tvm_lite/cpu_threads.py)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "TVM_NUM_THREADS" not in os.environ:
    from tvm_lite.cpu_threads import physical_cores

    os.environ["TVM_NUM_THREADS"] = str(max(1, physical_cores()
                                            // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(items):
    """The tutorial notebooks (marked ``tutorial``) run after every other test of their worker:
    the export/compile cache the tests fill is warm by then (with ``-n 2 --dist loadfile`` the
    other worker runs other files meanwhile; the cache's locks keep them from building an entry
    twice)."""
    items.sort(key=lambda item: item.get_closest_marker("tutorial") is not None)


PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
]


CLANG = shutil.which("clang-15")  # OpenCL C is compile-checked with Debian's clang-15 (install.sh)
CLANG_OPENCL_ARGS = ["-x", "cl", "-cl-std=CL2.0", "-Xclang", "-finclude-default-header",
                     "-Xclang", "-cl-ext=+cl_khr_fp16", "-fsyntax-only"]


def clang_opencl(path) -> subprocess.CompletedProcess:
    """clang-15's syntax check of the OpenCL C file ``path`` (fp16 enabled)."""
    return subprocess.run([CLANG or "clang-15", *CLANG_OPENCL_ARGS, str(path)],
                          capture_output=True, text=True)


def logits_off_and_on(onnx_dir, target, out_dir, monkeypatch, module, constant: str, ids,
                      steps: int, **engine_kwargs) -> list:
    """The model's logits (prefill, then ``steps`` greedy decode steps; one row each, fp32)
    built with ``module.constant`` False, then True (a schedule or pass switch)."""
    import numpy as np

    from tvm_lite.artifact import compile_model
    from tvm_lite.engine import Engine

    outs = []
    for on in (False, True):
        monkeypatch.setattr(module, constant, on)
        art = compile_model(onnx_dir, target, out_dir=out_dir / f"{constant}{int(on)}",
                            force=True, progress=lambda *_: None)
        eng = Engine(art, **engine_kwargs)
        s = eng.new_session()
        logits = [eng.prefill(s, ids)]
        for _ in range(steps):
            logits.append(eng.forward(s, [int(np.argmax(logits[-1]))]))
        outs.append(np.stack([np.asarray(x, "float32").reshape(-1) for x in logits]))
    return outs


@functools.cache
def cuda_device():
    """TVM's first CUDA device where one exists (the GPU machine), else None."""
    try:
        import tvm

        dev = tvm.cuda(0)
        return dev if dev.exist else None
    except Exception:  # pylint: disable=broad-except
        return None


@pytest.fixture(scope="session")
def export_dir():
    """export_dir(exporter) -> the cached export folder of the default model."""
    from tvm_lite.export import export_onnx

    return functools.cache(lambda exporter="dynamo": export_onnx(exporter=exporter))


@pytest.fixture(scope="session")
def artifact(export_dir):
    """artifact(exporter, kv_cache) -> the compiled llvm artifact of that export."""
    from tvm_lite.artifact import compile_model

    return functools.cache(lambda exporter="dynamo", kv_cache="inplace":
                           compile_model(export_dir(exporter), "llvm", kv_cache=kv_cache))


@pytest.fixture(scope="session")
def engine(artifact):
    """engine(exporter, kv_cache) -> an Engine over that artifact, shared by the session."""
    from tvm_lite.engine import Engine

    return functools.cache(lambda exporter="dynamo", kv_cache="inplace":
                           Engine(artifact(exporter, kv_cache)))


@pytest.fixture(scope="session")
def hf_model():
    from tvm_lite.export import default_model_source, load_hf_model

    return load_hf_model(default_model_source(), "float32")


@pytest.fixture(scope="session")
def opencl_source(export_dir):
    """opencl_source(device, quant) -> the OpenCL C of the whole default model (dynamo export)
    built for ``opencl -device=<device>``, 4-bit weights with ``quant`` ("e0m4", RTN g32): one
    build per combination per session (several tests read the same whole-model source)."""
    import tvm_lite
    from tvm_lite.artifact import weights_as_built

    def build(device="adreno", quant=None):
        mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
        if quant:
            from tvm_lite.quant import QuantConfig, quantize_module
            from tvm_lite.quant.quantize import tokenizer_of

            mod, _ = quantize_module(mod, QuantConfig(quant, "rtn", 32),
                                     tokenizer_of(export_dir("dynamo")), progress=lambda *_: None)
        mod = weights_as_built(mod, progress=None)  # as compile_model does, after quantization
        return tvm_lite.device_source(tvm_lite.build(mod, f"opencl -device={device}"), "opencl")

    return functools.cache(build)


def cnn_onnx_model():
    """A small ONNX image classifier (Conv, Relu, MaxPool, Flatten, MatMul, Softmax), made with
    onnx.helper: a model that is not a decoder (tests/test_any_module.py, test_bad_input.py)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype("float32"), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (512, 10)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="session")
def tiny_decoder():
    """(HF folder, ONNX export folder) of ``tiny-llama`` (2 layers, hidden 64, random weights,
    its own small tokenizer), exported with the TorchScript exporter; made once and cached under
    $TVM_LITE_CACHE/tests (each step atomic and under a lock, so two workers share it)."""
    from tvm_lite.atomic import atomic_dir
    from tvm_lite.bench.models import random_model
    from tvm_lite.export import EXPORT_VERSION, cache_dir, cache_lock, export_onnx

    root = cache_dir() / "tests" / f"tiny-llama-v{EXPORT_VERSION}"
    hf = root / "hf"
    with cache_lock(hf):
        if not (hf / "tokenizer.json").exists():
            with atomic_dir(hf) as tmp:
                random_model("tiny-llama", tmp, dtype="float32")
    onnx_dir = export_onnx(hf, out_dir=root / "onnx-torchscript", exporter="torchscript",
                           progress=lambda *_: None)
    return hf, onnx_dir


@pytest.fixture(scope="session")
def tiny_decoder_fp16(tiny_decoder):
    """The ONNX export folder of ``tiny_decoder``'s model in fp16 (TorchScript exporter): the
    GPU's tensor-core kernels take fp16 activations only."""
    from tvm_lite.export import EXPORT_VERSION, cache_dir, export_onnx

    hf, _ = tiny_decoder
    root = cache_dir() / "tests" / f"tiny-llama-v{EXPORT_VERSION}"
    return export_onnx(hf, out_dir=root / "onnx-torchscript-fp16", exporter="torchscript",
                       dtype="float16", progress=lambda *_: None)
