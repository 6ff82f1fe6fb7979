"""The importer on small hand-built ONNX graphs: shape computing folds to symbolic shapes on the
host, results match onnxruntime, and bad input gets an error that names the cause."""

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import tvm_lite
from tvm_lite.analysis import shape_computing_calls, symbolic_dims
from tvm_lite.frontend import OnnxImportError


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _shape_subgraph_model():
    """y = Reshape(x @ W, [batch?, seq, 4, 8]) with the shape computed torch-style, plus an
    Expand whose shape goes through Where(Equal(shape, -1), ones, shape), plus a ConstantOfShape
    and a Range over symbolic dims."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((32, 32)).astype("float32")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Shape", ["h"], ["hs"]),
        helper.make_node("Gather", ["hs", "i1"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["seq", "ax0"], ["seq1"]),
        helper.make_node("Concat", ["one", "seq1", "c48"], ["shape4"], axis=0),
        helper.make_node("Reshape", ["h", "shape4"], ["y"]),
        # Expand with a -1 placeholder resolved through Where(Equal(.., -1), 1, ..)
        helper.make_node("Concat", ["one", "seq1", "minus1"], ["eshape0"], axis=0),
        helper.make_node("Equal", ["eshape0", "minus1"], ["is_neg"]),
        helper.make_node("ConstantOfShape", ["three"], ["ones3"],
                         value=numpy_helper.from_array(np.array([1], "int64"))),
        helper.make_node("Where", ["is_neg", "ones3", "eshape0"], ["eshape"]),
        helper.make_node("Expand", ["bias", "eshape"], ["b"]),
        helper.make_node("Add", ["b", "b"], ["z"]),
        # a Range over past + seq and a mask built from it
        helper.make_node("Shape", ["past"], ["ps"]),
        helper.make_node("Gather", ["ps", "i1"], ["p"], axis=0),
        helper.make_node("Add", ["p", "seq"], ["total"]),
        helper.make_node("Range", ["zero", "total", "one_s"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "shape_subgraphs",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 32]),
                helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, "past_seq", 8])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                 helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
                 helper.make_tensor_value_info("rf", TensorProto.FLOAT, None)],
        initializer=[_const("W", W), _const("i1", np.array(1, "int64")),
                     _const("ax0", np.array([0], "int64")), _const("one", np.array([1], "int64")),
                     _const("c48", np.array([4, 8], "int64")), _const("minus1", np.array([-1], "int64")),
                     _const("three", np.array([3], "int64")),
                     _const("bias", rng.standard_normal((1, 1, 1)).astype("float32")),
                     _const("zero", np.array(0, "int64")), _const("one_s", np.array(1, "int64"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_shape_subgraphs_fold_to_symbolic_shapes_and_match_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    model = _shape_subgraph_model()
    mod = tvm_lite.from_onnx(model)
    assert {v.name for v in symbolic_dims(mod)} == {"seq", "past_seq"}
    assert shape_computing_calls(mod) == []
    text = mod["main"].script()
    assert "R.shape([1, seq, 4, 8])" in text  # Reshape got a symbolic ShapeExpr
    _, params = tvm_lite.detach_params(mod)
    ex = tvm_lite.build(mod, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    sess = ort.InferenceSession(model.SerializeToString())
    for seq, past in [(1, 0), (5, 3), (17, 40)]:
        x = np.random.default_rng(seq).standard_normal((1, seq, 32)).astype("float32")
        p = np.zeros((1, past, 8), "float32")
        ref = sess.run(None, {"x": x, "past": p})
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(p), *params)
        for got, want in zip(out, ref):
            assert got.numpy().shape == want.shape
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def _mask_gather_model():
    """HF's ``padding_mask = attention_mask[batch_idx, kv_idx]`` as the dynamo export writes it:
    GatherND of the bool mask at (0 broadcast, Range(0, m)) -- an identity index -- and, for the
    general path, the same mask read at (0, m - 1 - j) (reversed: not a view)."""
    nodes = [
        helper.make_node("Shape", ["mask"], ["ms"]),
        helper.make_node("Gather", ["ms", "i1"], ["m"], axis=0),
        helper.make_node("Range", ["zero", "m", "one"], ["kv"]),
        helper.make_node("Unsqueeze", ["kv", "ax0"], ["kv1"]),        # (1, m)
        helper.make_node("Unsqueeze", ["kv1", "axm1"], ["kv2"]),      # (1, m, 1)
        helper.make_node("Unsqueeze", ["m", "ax0"], ["m1"]),
        helper.make_node("Concat", ["one1", "m1", "one1"], ["bshape"], axis=0),
        helper.make_node("Expand", ["zero3", "bshape"], ["b"]),       # (1, m, 1) zeros
        helper.make_node("Concat", ["b", "kv2"], ["idx"], axis=-1),   # (1, m, 2)
        helper.make_node("Cast", ["mask"], ["maskb"], to=TensorProto.BOOL),
        helper.make_node("GatherND", ["maskb", "idx"], ["g"]),
        helper.make_node("Cast", ["g"], ["y"], to=TensorProto.INT64),
        helper.make_node("Sub", ["m", "one"], ["last"]),
        helper.make_node("Sub", ["last", "kv2"], ["rev"]),
        helper.make_node("Concat", ["b", "rev"], ["ridx"], axis=-1),
        helper.make_node("GatherND", ["maskb", "ridx"], ["rg"]),
        helper.make_node("Cast", ["rg"], ["ry"], to=TensorProto.INT64),
    ]
    return _mask_model("mask_gather", nodes, ["y", "ry"],
                       [_const("axm1", np.array([-1], "int64")),
                        _const("zero3", np.zeros((1, 1, 1), "int64"))])


def _mask_model(name, nodes, outputs, initializers=()):
    """A graph of ``nodes`` over one int64 input ``mask`` (1, m), the int64 ``outputs``, and the
    small constants the mask graphs share."""
    graph = helper.make_graph(
        nodes, name,
        inputs=[helper.make_tensor_value_info("mask", TensorProto.INT64, [1, "m"])],
        outputs=[helper.make_tensor_value_info(o, TensorProto.INT64, None) for o in outputs],
        initializer=[_const("i1", np.array(1, "int64")), _const("zero", np.array(0, "int64")),
                     _const("one", np.array(1, "int64")), _const("ax0", np.array([0], "int64")),
                     _const("one1", np.array([1], "int64")), *initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_identity_gather_nd_is_a_view_of_the_mask():
    """The identity GatherND becomes the mask itself (reshaped, its cast after the reshape): no
    gather kernel, no index tensor; the reversed one keeps the gather. Both match onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    model = _mask_gather_model()
    mod = tvm_lite.from_onnx(model)
    text = mod["main"].script()
    assert text.count("R.gather_nd") == 1, text  # the reversed read only
    ex = tvm_lite.build(mod, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    sess = ort.InferenceSession(model.SerializeToString())
    for mask in (np.array([[1, 1, 0, 1, 0]], "int64"), np.ones((1, 1), "int64"),
                 (np.arange(37) % 3 != 0).astype("int64")[None]):
        want = sess.run(None, {"mask": mask})
        got = vm["main"](tvm.runtime.tensor(mask))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), w)


def test_identity_gather_is_a_view_of_the_mask():
    """TorchScript's form of the same read: Gather along axis 0 of the mask reshaped to (m, 1) at
    ``Range(0, m) + 0`` -- a view; at ``min(Range(0, m), m - 1)`` (the same values, not traced)
    the gather stays. Both match onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    nodes = [
        helper.make_node("Shape", ["mask"], ["ms"]),
        helper.make_node("Gather", ["ms", "i1"], ["m"], axis=0),
        helper.make_node("Range", ["zero", "m", "one"], ["kv"]),
        helper.make_node("Unsqueeze", ["kv", "ax0"], ["kv1"]),         # (1, m)
        helper.make_node("Add", ["kv1", "zero"], ["flat"]),
        helper.make_node("Unsqueeze", ["m", "ax0"], ["m1"]),
        helper.make_node("Concat", ["m1", "one1"], ["col"], axis=0),
        helper.make_node("Cast", ["mask"], ["maskb"], to=TensorProto.BOOL),
        helper.make_node("Reshape", ["maskb", "col"], ["mcol"]),         # (m, 1)
        helper.make_node("Gather", ["mcol", "flat"], ["g"], axis=0),     # (1, m, 1)
        helper.make_node("Cast", ["g"], ["y"], to=TensorProto.INT64),
        helper.make_node("Sub", ["m", "one"], ["last"]),
        helper.make_node("Min", ["kv1", "last"], ["same"]),              # not traced: a take
        helper.make_node("Gather", ["mcol", "same"], ["g2"], axis=0),
        helper.make_node("Cast", ["g2"], ["y2"], to=TensorProto.INT64),
    ]
    model = _mask_model("mask_take", nodes, ["y", "y2"])
    mod = tvm_lite.from_onnx(model)
    assert mod["main"].script().count("R.take") == 1  # the traced read is a view
    ex = tvm_lite.build(mod, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    sess = ort.InferenceSession(model.SerializeToString())
    for mask in (np.array([[1, 0, 1, 1, 0, 0]], "int64"), np.ones((1, 1), "int64")):
        want = sess.run(None, {"mask": mask})
        got = vm["main"](tvm.runtime.tensor(mask))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), w)


def test_unsupported_op_names_op_and_node():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
         helper.make_node("FancyAttentionV9", ["r"], ["y"], name="blk0/fancy")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(OnnxImportError, match=r"blk0/fancy.*FancyAttentionV9"):
        tvm_lite.from_onnx(model)


def test_custom_domain_op_is_named():
    graph = helper.make_graph(
        [helper.make_node("RotaryEmbedding", ["x"], ["y"], name="rope0", domain="com.microsoft")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    with pytest.raises(OnnxImportError, match=r"rope0.*com\.microsoft"):
        tvm_lite.from_onnx(model)


def test_data_dependent_shape_is_refused_with_the_node_name():
    # Reshape to a shape read from a tensor's *values* (not its shape): needs a device->host read
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "target"], ["y"], name="dyn_reshape")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
              helper.make_tensor_value_info("target", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(OnnxImportError, match=r"dyn_reshape.*data-dependent"):
        tvm_lite.from_onnx(model)


def test_truncated_file(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(_shape_subgraph_model(), str(good))
    data = good.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(OnnxImportError, match=r"cannot read ONNX file .*truncated\.onnx"):
        tvm_lite.from_onnx(bad)
    with pytest.raises(OnnxImportError, match="not found"):
        tvm_lite.from_onnx(tmp_path / "missing.onnx")
    assert good.read_bytes() == data  # nothing lost


def test_non_llm_graph_is_refused_by_compile(tmp_path):
    from tvm_lite.artifact import ArtifactError, compile_model

    path = tmp_path / "not_llm.onnx"
    onnx.save(_shape_subgraph_model(), str(path))
    with pytest.raises(ArtifactError, match=r"not a decoder-with-past LLM.*input_ids"):
        compile_model(path, "llvm", out_dir=tmp_path / "out")
