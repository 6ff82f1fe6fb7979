"""MergeSharedInputProjections (issue 17): projections of one activation become one matmul.

A small Relax module shaped like a GQA attention block with biases (q 64 wide, k/v 32 wide) and
a gated MLP (gate/up 128 wide), weights attached as the importer attaches them; built with
TVM's stock pipeline for the CPU, merged and unmerged, on the same inputs.
"""

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_lite
from tvm_lite.convention import GATE_BLOCK
from tvm_lite.relax_passes import MergeSharedInputProjections, QuantizeWeightMatmuls
from tvm_lite.quant.rtn import rtn

K = 64
WIDTHS = {"q": 64, "k": 32, "v": 32, "gate": 128, "up": 128}
BIASED = ("q", "k", "v")


def _module(rng, silu: bool = False):
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, n, K], "float32"))
    h = relax.Var("h", relax.TensorType([1, n, K], "float32"))  # the MLP's own input
    names, values, params = [], [], []

    def param(name, shape):
        var = relax.Var(name.replace(".", "_"), relax.TensorType(list(shape), "float32"))
        names.append(name)
        values.append(rng.standard_normal(shape).astype("float32") * 0.1)
        params.append(var)
        return var

    w = {p: param(f"{p}.weight", (K, WIDTHS[p])) for p in WIDTHS}
    b = {p: param(f"{p}.bias", (WIDTHS[p],)) for p in BIASED}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, h, *params]):
        with bb.dataflow():
            outs = [bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, w[p])), b[p])) for p in BIASED]
            gate = bb.emit(relax.op.matmul(h, w["gate"]))
            up = bb.emit(relax.op.matmul(h, w["up"]))
            act = relax.op.nn.silu(gate) if silu else relax.op.sigmoid(gate)  # (sigmoid: not gated)
            outs.append(bb.emit(relax.op.multiply(up, act) if silu else
                                relax.op.multiply(act, up)))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    mod = bb.get()
    func = mod["main"].with_attrs({"num_input": 2, "tvm_lite.param_names": names,
                                   "params": [tvm.runtime.tensor(v) for v in values]})
    mod["main"] = func
    return mod


def _run(mod, inputs):
    mod, params = tvm_lite.detach_params(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs], *params)
    return [o.numpy() for o in out]


def _matmuls(mod) -> int:
    count = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: count.append(1) if (
        isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.matmul"
        or isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir") else None)
    return len(count)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 5, K)).astype("float32") for _ in range(2)]
    return _module(rng), inputs


def test_merges_qkv_with_biases_and_gate_up(case):
    mod, inputs = case
    merge = MergeSharedInputProjections()
    merged = merge(mod)
    assert (merge.merged, merge.groups) == (5, 2)
    assert _matmuls(mod) == 5 and _matmuls(merged) == 2
    names = [str(n) for n in merged["main"].attrs["tvm_lite.param_names"]]
    assert names == ["q.weight+k.weight+v.weight", "q.bias+k.bias+v.bias", "gate.weight+up.weight"]
    shapes = [tuple(int(d) for d in p.ty.shape.values) for p in merged["main"].params[2:]]
    assert shapes == [(K, 128), (128,), (K, 256)]
    for a, b in zip(_run(mod, inputs), _run(merged, inputs)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_merges_4bit_weights_bit_exactly(case):
    mod, inputs = case
    func = mod["main"]
    values = dict(zip((str(n) for n in func.attrs["tvm_lite.param_names"]), func.attrs["params"]))
    weights = {f"{p}.weight": rtn(values[f"{p}.weight"].numpy(), "e0m4", 32) for p in WIDTHS}
    quantized = QuantizeWeightMatmuls(weights)(mod)
    merge = MergeSharedInputProjections()
    merged = merge(quantized)
    assert (merge.merged, merge.groups) == (5, 2)
    names = [str(n) for n in merged["main"].attrs["tvm_lite.param_names"]]
    assert "q.weight.e0m4.codes+k.weight.e0m4.codes+v.weight.e0m4.codes" in names
    for a, b in zip(_run(quantized, inputs), _run(merged, inputs)):
        np.testing.assert_array_equal(b, a)


def test_leaves_weights_without_values_alone(case):
    mod, _ = case
    bare, _ = tvm_lite.detach_params(mod)  # parameters without values: nothing to concatenate
    merge = MergeSharedInputProjections()
    assert merge(bare).same_as(bare) and merge.merged == 0


@pytest.mark.parametrize("quantized", [False, True])
def test_interleaves_a_gated_mlps_gate_and_up(quantized):
    """With ``interleave_gate_up`` the merged gate+up weight alternates blocks of 8 columns (gate
    block q at 16q, up's at 16q + 8, whatever order the projections came in), the model's
    outputs stay what they were (bit-exact for 4-bit weights), and a group that is not a gated
    MLP's (here q/k/v) is merged as before."""
    rng = np.random.default_rng(1)
    mod = _module(rng, silu=True)
    inputs = [rng.standard_normal((1, 5, K)).astype("float32") for _ in range(2)]
    func = mod["main"]
    values = dict(zip((str(n) for n in func.attrs["tvm_lite.param_names"]), func.attrs["params"]))
    if quantized:
        mod = QuantizeWeightMatmuls({f"{p}.weight": rtn(values[f"{p}.weight"].numpy(), "e0m4", 32)
                                     for p in WIDTHS})(mod)
    merge = MergeSharedInputProjections(interleave_gate_up=True)
    merged = merge(mod)
    assert (merge.merged, merge.groups) == (5, 2)
    func = merged["main"]
    params = dict(zip((str(n) for n in func.attrs["tvm_lite.param_names"]), func.attrs["params"]))
    suffix = ".e0m4.codes" if quantized else ""
    w = params[f"gate.weight{suffix}+up.weight{suffix}"].numpy()
    if not quantized:  # columns: gate 0..7, up 0..7, gate 8..15, ...
        gate, up = values["gate.weight"].numpy(), values["up.weight"].numpy()
        np.testing.assert_array_equal(w[:, :GATE_BLOCK], gate[:, :GATE_BLOCK])
        np.testing.assert_array_equal(w[:, GATE_BLOCK:2 * GATE_BLOCK], up[:, :GATE_BLOCK])
        np.testing.assert_array_equal(w[:, 2 * GATE_BLOCK:3 * GATE_BLOCK],
                                      gate[:, GATE_BLOCK:2 * GATE_BLOCK])
    assert f"q.weight{suffix}+k.weight{suffix}+v.weight{suffix}" in params  # concatenated
    for a, b in zip(_run(mod, inputs), _run(merged, inputs)):
        if quantized:
            np.testing.assert_array_equal(b, a)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_pass_interleaves_only_when_asked():
    """Gate then up (the halves) unless the caller asks: the pass does not know the target."""
    mod = _module(np.random.default_rng(1), silu=True)
    assert "gate_up_blocks" not in MergeSharedInputProjections()(mod).script()
    assert "gate_up_blocks" in MergeSharedInputProjections(interleave_gate_up=True)(mod).script()
