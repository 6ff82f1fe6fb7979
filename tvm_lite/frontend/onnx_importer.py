"""ONNX -> Relax with symbolic dims and all shape computing resolved on the host.

The importer walks the ONNX graph once. Every node is either

* **shape computing** -- all of its inputs are known on the host (constants, or shapes of tensors
  whose dims are symbolic expressions) and it belongs to the shape family: it is evaluated right
  here by :mod:`.host_shapes` and never becomes a kernel;
* **a tensor op with a host shape argument** (Reshape, Expand, ConstantOfShape, Range, Slice): the
  host value becomes a symbolic ``ShapeExpr`` (:mod:`.shape_ops`);
* **tensor computing**: handed to TVM's own ONNX op converter (``_get_convert_map``), unchanged.

So TVM's converters do the tensor work; the new work is the host-side shape layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from . import host_shapes
from .host_shapes import HostValue
from .shape_ops import TENSOR_OPS_WITH_HOST_SHAPES, ShapeArgError, materialize
from ..errors import UserError, stage


class OnnxImportError(UserError):
    """An ONNX model tvm_lite cannot import; the message names the file, node or op."""


# Initializers at most this large (and integer, or a float scalar) are host values; the rest are
# model parameters.
_HOST_INITIALIZER_ELEMENTS = 1024


def load_onnx(model) -> onnx.ModelProto:
    """Load an ONNX model from a path (with external data) or pass a ModelProto through."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(os.fspath(model))
    if not path.is_file():
        raise OnnxImportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as err:  # protobuf DecodeError, missing external data...
        raise OnnxImportError(f"cannot read ONNX file {path}: {type(err).__name__}: {err}") from err
    if not proto.graph.node:
        raise OnnxImportError(f"cannot read ONNX file {path}: the graph has no nodes "
                              "(truncated or not an ONNX model)")
    return proto


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    return f"node '{name}' ({node.op_type})"


class _Importer:
    def __init__(self, model: onnx.ModelProto, dims: dict | None, keep_params: bool):
        self.model = model
        self.graph = model.graph
        self.opset = _opset(model)
        self.keep_params = keep_params
        self.dim_overrides = dict(dims or {})
        self.bb = relax.BlockBuilder()
        self.values: dict[str, object] = {}  # ONNX name -> HostValue | relax.Expr
        self.params: list[tuple[str, relax.Var, np.ndarray]] = []
        self.inputs: list[tuple[str, relax.Var]] = []
        self.sym_vars: dict[str, tvm.tirx.Var] = {}
        self._folded_transposes: dict = {}  # Transpose output name -> transposed weight Var
        self.stats = {"host_evaluated": 0, "tensor_ops": 0, "weights_transposed_on_host": 0}

    # -- graph inputs and initializers ----------------------------------------------------------
    def _check_ops(self):
        convert_map = _tvm_onnx._get_convert_map()
        known = set(convert_map) | set(host_shapes.HOST_OPS) | set(TENSOR_OPS_WITH_HOST_SHAPES)
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise OnnxImportError(f"unsupported ONNX op: {_node_label(node)} is in domain "
                                      f"'{node.domain}'; only the default ONNX domain is supported")
            if node.op_type not in known or node.op_type in ("If", "Loop", "Scan"):
                raise OnnxImportError(f"unsupported ONNX op: {_node_label(node)}: op type "
                                      f"'{node.op_type}' has no converter in tvm_lite or TVM")

    def _parse_inputs(self):
        initializers = {t.name for t in self.graph.initializer}
        for info in self.graph.input:
            if info.name in initializers:
                continue
            tt = info.type.tensor_type
            if not tt.HasField("shape"):
                raise OnnxImportError(f"graph input '{info.name}' has no shape; export it with "
                                      "named dynamic dims")
            shape = []
            for axis, dim in enumerate(tt.shape.dim):
                if dim.HasField("dim_value"):
                    shape.append(dim.dim_value)
                    continue
                name = self.dim_overrides.get(dim.dim_param, dim.dim_param)
                if not name:
                    raise OnnxImportError(f"graph input '{info.name}' axis {axis} has neither a "
                                          "size nor a name; name every dynamic dim")
                shape.append(_tvm_onnx.parse_shape_name(name, self.sym_vars) if not isinstance(name, int)
                             else name)
            dtype = _tvm_onnx.get_type(tt.elem_type)
            var = relax.Var(info.name.replace(".", "_").replace("/", "_").replace(":", "_"),
                            relax.TensorType(shape, dtype))
            self.values[info.name] = var
            self.inputs.append((info.name, var))

    def _parse_initializers(self):
        for tensor in self.graph.initializer:
            try:
                array = numpy_helper.to_array(tensor)
            except Exception as err:  # dims that do not match the data, an unknown data type
                raise OnnxImportError(f"initializer '{tensor.name}' (dims {list(tensor.dims)}) "
                                      f"cannot be read: {err}") from err
            small_int = array.dtype.kind in "iub" and array.size <= _HOST_INITIALIZER_ELEMENTS
            if small_int or array.size <= 1:
                self.values[tensor.name] = host_shapes.from_constant(array)
            elif self.keep_params:
                name = tensor.name.removeprefix("onnx::").replace(".", "_").replace(":", "_")
                var = relax.Var(name, relax.TensorType(list(array.shape), str(array.dtype)))
                self.values[tensor.name] = var
                self.params.append((tensor.name, var, array))
            else:
                self.values[tensor.name] = relax.const(array)

    # -- nodes ----------------------------------------------------------------------------------
    def _relax(self, v):
        """An input as TVM's converters want it: host values become constants/tensors."""
        if isinstance(v, HostValue):
            return materialize(self.bb, v)
        return v

    def _shape_of_tensor(self, node, inputs):
        """Shape / Size of a device tensor: read from its (symbolic) type, on the host."""
        x = inputs[0]
        ty = x.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
            raise OnnxImportError(f"cannot import {_node_label(node)}: the shape of its input is "
                                  "data-dependent, so it cannot be computed on the host")
        dims = [host_shapes._normalize(d) for d in ty.shape.values]
        return host_shapes.SHAPE_OF_TENSOR_OPS[node.op_type](node, [None], tensor_shape=dims)

    def _convert(self, node: onnx.NodeProto):
        missing = [n for n in node.input if n and n not in self.values]
        if missing:  # checked before the lookup (a dropped/renamed input, nodes out of order)
            raise OnnxImportError(f"{_node_label(node)} reads '{missing[0]}', which no graph "
                                  "input, initializer or earlier node produces")
        inputs = [self.values[name] if name else None for name in node.input]

        if node.op_type in host_shapes.SHAPE_OF_TENSOR_OPS and not isinstance(inputs[0], HostValue):
            self.stats["host_evaluated"] += 1
            return [self._shape_of_tensor(node, inputs)]

        host = host_shapes.evaluate(node, inputs)
        if host is not None:
            self.stats["host_evaluated"] += 1
            return [host]

        same = self._boolean_identity(node, inputs)
        if same is not None:
            return [same]
        if node.op_type == "Concat":
            inputs = self._without_empty(node, inputs)
            if len(inputs) == 1:
                return [inputs[0]]

        if node.op_type == "Transpose" and node.output[0] in self._folded_transposes:
            return [self._folded_transposes[node.output[0]]]

        self.stats["tensor_ops"] += 1
        if node.op_type in TENSOR_OPS_WITH_HOST_SHAPES:
            convert, shape_args = TENSOR_OPS_WITH_HOST_SHAPES[node.op_type]
            args = [v if (i in shape_args or v is None) else self._relax(v) for i, v in enumerate(inputs)]
            return [self.bb.normalize(convert(self.bb, node, args))]

        if node.op_type == "Pow":
            power = self._integer_power(inputs)
            if power is not None:
                return [power]

        attrs = self._tvm_attrs(node)
        converter = _tvm_onnx._get_convert_map()[node.op_type].get_converter(self.opset)
        relax_inputs = _tvm_onnx.onnx_input()
        for v in inputs:
            relax_inputs.append(None if v is None else self._relax(v))
        out = converter(self.bb, relax_inputs, attrs, [self.values, {}])
        if isinstance(out, relax.Expr):
            out = self.bb.normalize(out)
        if isinstance(out, relax.Tuple):
            return list(out.fields)
        if isinstance(out, relax.Expr) and isinstance(out.ty, relax.TupleType):
            return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out.ty.fields))]
        return [out]

    @staticmethod
    def _without_empty(node, inputs):
        """Concat's inputs without the tensors of size 0 on the concat axis: TorchScript exports
        of a rotary over the whole head keep the empty pass-through slice ``x[..., rot:]``, and
        a kernel over an empty axis breaks the schedules (a divide by zero in TVM's analyzer)."""
        axis = host_shapes._attr(node, "axis")

        def empty(v):
            if isinstance(v, HostValue) or not hasattr(v.ty, "shape") \
                    or not hasattr(v.ty.shape, "values"):
                return False
            dims = v.ty.shape.values
            d = dims[axis % len(dims)]
            return isinstance(d, tvm.tirx.IntImm) and int(d) == 0

        kept = [v for v in inputs if not empty(v)]
        return kept if kept else inputs[:1]

    def _boolean_identity(self, node, inputs):
        """``x AND True``, ``x OR False``, ``x AND x``, ``x OR x`` are ``x``: the HF mask builders
        start from a constant ``new_ones`` and AND every mask into it, which TVM would keep as
        copy kernels."""
        if node.op_type not in ("And", "Or") or len(inputs) != 2:
            return None
        if node.input[0] == node.input[1]:
            return inputs[0]
        neutral = node.op_type == "And"  # True for And, False for Or
        for const, other in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
            if not (isinstance(const, HostValue) and const.is_concrete) \
                    or isinstance(other, HostValue):
                continue
            arr = np.asarray(const.array)
            rank = len(other.ty.shape.values) if hasattr(other.ty, "shape") and \
                hasattr(other.ty.shape, "values") else -1
            if arr.size == 1 and arr.ndim <= rank and bool(arr.reshape(-1)[0]) == neutral:
                return other
        return None

    def _integer_power(self, inputs):
        """``Pow(x, k)`` with a constant small integer ``k`` (RMSNorm's ``x ** 2``) as ``k - 1``
        multiplies: exact, cheaper, and correct for negative ``x`` on GPUs, where TVM's CUDA
        ``pow`` (a fast ``exp2(k * log2(x))``) returns NaN for a negative base."""
        exponent = inputs[1]
        if isinstance(exponent, HostValue) and exponent.is_concrete:
            values = np.asarray(exponent.array)
        elif isinstance(exponent, relax.Constant):
            values = exponent.data.numpy()
        else:
            return None
        if values.size != 1 or float(values.reshape(-1)[0]) not in (1.0, 2.0, 3.0, 4.0):
            return None
        x = self._relax(inputs[0])
        out = x
        for _ in range(int(values.reshape(-1)[0]) - 1):
            out = self.bb.emit(relax.op.multiply(out, x))
        return out

    def _fold_weight_transposes(self):
        """Transposes of weights (a tied lm_head is ``MatMul(x, Transpose(embedding))``) are done
        once here, on the host, into new parameters, not on every step on the device. A weight
        used only through such transposes is dropped."""
        by_name = {name: (var, array) for name, var, array in self.params}
        uses: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        folded_uses: dict[str, int] = {}
        for node in self.graph.node:
            if node.op_type != "Transpose" or node.input[0] not in by_name:
                continue
            var, array = by_name[node.input[0]]
            perm = host_shapes._attr(node, "perm") or list(reversed(range(array.ndim)))
            out = np.ascontiguousarray(np.transpose(array, perm))
            new = relax.Var(f"{var.name}_T", relax.TensorType(list(out.shape), str(out.dtype)))
            self.params.append((node.output[0], new, out))
            self._folded_transposes[node.output[0]] = new
            folded_uses[node.input[0]] = folded_uses.get(node.input[0], 0) + 1
            self.stats["weights_transposed_on_host"] += 1
        self.params = [p for p in self.params if folded_uses.get(p[0], 0) != uses.get(p[0], 0)
                       or p[0] not in folded_uses]

    def _tvm_attrs(self, node):
        attrs = _tvm_onnx.ONNXGraphImporter._parse_attr(None, node.attribute)
        attrs["tvm_custom"] = {"name": node.name, "num_outputs": len(node.output)}
        return attrs

    def run(self) -> tvm.IRModule:
        self._check_ops()
        self._parse_inputs()
        host_shapes.declare_dims(self.sym_vars.values())
        self._parse_initializers()
        self._fold_weight_transposes()
        func_params = [v for _, v in self.inputs] + [v for _, v, _ in self.params]
        with self.bb.function("main", params=func_params):
            with self.bb.dataflow():
                for node in self.graph.node:
                    try:
                        outs = self._convert(node)
                    except OnnxImportError:
                        raise
                    except ShapeArgError as err:
                        raise OnnxImportError(f"cannot import {_node_label(node)}: {err}") from err
                    except Exception as err:
                        msg = str(err).strip().splitlines()
                        raise OnnxImportError(f"cannot import {_node_label(node)}: "
                                              f"{type(err).__name__}: {msg[-1] if msg else ''}") from err
                    for name, value in zip(node.output, outs):
                        if name:
                            self.values[name] = value
                outputs = []
                for out in self.graph.output:
                    if out.name not in self.values:
                        raise OnnxImportError(f"graph output '{out.name}' is produced by no node")
                    v = self.values[out.name]
                    outputs.append(self._relax(v) if isinstance(v, HostValue) else v)
                result = self.bb.emit_output(outputs[0] if len(outputs) == 1 else relax.Tuple(outputs))
            self.bb.emit_func_output(result)
        mod = self.bb.get()
        func = mod["main"].with_attrs({
            "num_input": len(self.inputs),
            "tvm_lite.input_names": [n for n, _ in self.inputs],
            "tvm_lite.output_names": [o.name for o in self.graph.output],
            "tvm_lite.param_names": [n for n, _, _ in self.params],
        })
        if self.params:
            func = func.with_attr("params", [tvm.runtime.tensor(a) for _, _, a in self.params])
        mod["main"] = func
        return mod


def from_onnx(model, dims: dict | None = None, keep_params: bool = True) -> tvm.IRModule:
    """Import an ONNX model (path or ModelProto) into a Relax IRModule with symbolic dims.

    Parameters
    ----------
    model : str | Path | onnx.ModelProto
    dims : dict, optional
        Rename/redefine input dims, e.g. ``{"total_seq": "past_seq + seq"}``. Values may be
        expressions in other dims or ints (to make a dim static).
    keep_params : bool
        Large initializers become function parameters after the ``num_input`` real inputs (their
        values are attached as the ``params`` attribute, as TVM's own frontend does); otherwise
        they are embedded as constants.

    Returns
    -------
    tvm.IRModule whose ``main`` returns the graph outputs (a tuple if several).
    """
    proto = load_onnx(model)
    name = model if isinstance(model, (str, Path)) else (proto.graph.name or "ModelProto")
    with stage("import", error=OnnxImportError, where=str(name)):  # anything else -> OnnxImportError
        importer = _Importer(proto, dims, keep_params)
        mod = importer.run()
    mod = mod.with_attr("tvm_lite.import_stats", {k: int(v) for k, v in importer.stats.items()})
    return mod
