"""``tvm_lite.build`` compiles any Relax module TVM itself can: a hand-written TVMScript MLP and a
CNN from TVM's own ONNX importer (``relax.frontend.onnx.from_onnx``), for llvm, CUDA and Adreno
OpenCL. The default KV mode leaves a module without a past/present interface alone; only
``kv_cache="inplace"`` insists on one. On llvm the result equals stock ``tvm.compile``'s."""

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_lite
from tvm_lite.errors import UserError

TARGETS = ["llvm", "cuda -arch=sm_90", "opencl -device=adreno"]


def mlp():
    """A TVMScript MLP (matmul, SiLU, matmul, softmax). One row: a batch of rows would send the
    CUDA build through DLight's tensor-core Matmul rule, whose first use imports TVM's CUDA tensor
    intrinsics (about 500 TVMScript functions parsed; minutes on a loaded CI machine)."""
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class MLP:
        @R.function
        def main(x: R.Tensor((1, 64), "float32"), w1: R.Tensor((64, 128), "float32"),
                 w2: R.Tensor((128, 10), "float32")):
            with R.dataflow():
                h = R.nn.silu(R.matmul(x, w1))
                y = R.nn.softmax(R.matmul(h, w2), axis=-1)
                R.output(y)
            return y

    return MLP


def cnn():
    """A small ONNX image classifier made with onnx.helper, imported by TVM's own frontend."""
    import tvm.relax.frontend.onnx  # noqa: F401 - registers relax.frontend.onnx

    from conftest import cnn_onnx_model

    return relax.frontend.onnx.from_onnx(cnn_onnx_model())


def _inputs(mod, rng):
    return [rng.standard_normal([int(d) for d in p.ty.shape.values]).astype("float32")
            for p in mod["main"].params]


def _run(ex, args):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize("make", [mlp, cnn], ids=["tvmscript_mlp", "tvm_onnx_cnn"])
def test_any_module_builds_and_matches_stock_tvm(make):
    mod = make()
    args = _inputs(mod, np.random.default_rng(0))
    ours = _run(tvm_lite.build(mod, "llvm"), args)
    stock = _run(tvm.compile(mod, target=tvm_lite.parse_target("llvm")), args)
    assert ours.shape == stock.shape
    np.testing.assert_allclose(ours, stock, rtol=1e-5, atol=1e-6)
    for target in TARGETS[1:]:
        ex = tvm_lite.build(mod, target)
        kind = "cuda" if target.startswith("cuda") else "opencl"
        assert "__global__" in tvm_lite.device_source(ex, kind) if kind == "cuda" else \
            "__kernel" in tvm_lite.device_source(ex, kind)
    with pytest.raises(UserError, match="no present outputs|no concat of a past input"):
        tvm_lite.build(mod, "llvm", kv_cache="inplace")
