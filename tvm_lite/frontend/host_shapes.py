"""Shape computing on the host: Transformer-Lite's first technique, at import time.

A torch-exported decoder is full of small subgraphs that compute *shapes*, not tensors:
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``, ``Where(Equal(dims, -1), ...)`` and so on.
Stock TVM turns many of them into device kernels (or fails on them). Here every value that such a
subgraph produces is a :class:`HostValue`: a small numpy array whose elements are Python numbers
or TVM ``PrimExpr``s in the model's symbolic dims (``seq``, ``past_seq``...). The ONNX ops of the
shape-computing family are evaluated on these arrays directly, so the imported Relax module only
sees their results as symbolic shape expressions, and the GPU never computes a shape.

Only ``evaluate`` is public: it returns ``None`` when a node is not shape computing (some input is
a real tensor, or the op is not in the family), and the importer then treats it as tensor computing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from tvm import sym, tirx
from tvm.ir import Expr as PrimExpr  # TIR and Relax expressions share one base in TVM 0.27
from tvm.tirx import IntImm

# Results larger than this are not kept on the host (they are real tensors, e.g. a rotary table).
MAX_HOST_ELEMENTS = 1 << 16

_ANALYZER = sym.Analyzer()


def declare_dims(dim_vars) -> None:
    """Tell the host analyzer that the model's symbolic dims are sizes (>= 0)."""
    for var in dim_vars:
        _ANALYZER.update(var, sym.ConstIntBound(0, sym.ConstIntBound.POS_INF), override=True)


@dataclass
class HostValue:
    """A value known on the host: numbers, or int64 expressions in the symbolic dims."""

    array: np.ndarray  # numeric, or dtype=object holding ints / PrimExprs
    dtype: str  # the ONNX element type as a numpy dtype name ("int64", "float32", "bool"...)

    @property
    def is_concrete(self) -> bool:
        return self.array.dtype != object

    def numpy(self) -> np.ndarray:
        """The concrete values (raises if some element is symbolic)."""
        if not self.is_concrete:
            raise ValueError("value depends on symbolic dims")
        return self.array

    def as_dims(self) -> list:
        """A 1-D integer value as a list of ints / PrimExprs (a shape)."""
        return [_normalize(v) for v in np.asarray(self.array).reshape(-1).tolist()]


def _normalize(v):
    """Simplify an element; turn constant PrimExprs back into Python ints."""
    if isinstance(v, PrimExpr):
        v = _ANALYZER.simplify(v)
        if isinstance(v, IntImm):
            return int(v.value)
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def _make(values, dtype: str) -> HostValue:
    """Build a HostValue, keeping a numeric array when no element is symbolic."""
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.dtype == object:
        flat = [_normalize(v) for v in arr.reshape(-1).tolist()]
        if all(not isinstance(v, PrimExpr) for v in flat):
            return HostValue(np.array(flat, dtype=dtype).reshape(arr.shape), dtype)
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return HostValue(out.reshape(arr.shape), dtype)
    return HostValue(arr.astype(dtype, copy=False), dtype)


def from_constant(array: np.ndarray) -> HostValue:
    return HostValue(np.asarray(array), str(np.asarray(array).dtype))


def from_dims(dims, dtype="int64") -> HostValue:
    return _make(np.array(list(dims) + [0], dtype=object)[:-1], dtype)


# ------------------------------------------------------------------------------------------------
# elementwise arithmetic on (possibly symbolic) integers


def _is_sym(v) -> bool:
    return isinstance(v, PrimExpr)


def _prove(cond) -> bool | None:
    """True/False if the analyzer can decide the symbolic condition, else None."""
    if isinstance(cond, (bool, np.bool_)):
        return bool(cond)
    cond = _ANALYZER.simplify(cond)
    if isinstance(cond, IntImm):
        return bool(cond.value)
    if _ANALYZER.can_prove(cond):
        return True
    if _ANALYZER.can_prove(tirx.Not(cond)):
        return False
    return None


def _div(a, b):
    if _is_sym(a) or _is_sym(b):
        return tirx.floordiv(a, b)  # dims are non-negative: floor == trunc division
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        q = abs(int(a)) // abs(int(b))
        return q if (a >= 0) == (b >= 0) else -q  # ONNX integer Div truncates toward zero
    return a / b


def _mod(a, b):
    if _is_sym(a) or _is_sym(b):
        return tirx.floormod(a, b)
    return a % b


def _min(a, b):
    return tirx.min(a, b) if (_is_sym(a) or _is_sym(b)) else min(a, b)


def _max(a, b):
    return tirx.max(a, b) if (_is_sym(a) or _is_sym(b)) else max(a, b)


def _cmp(op):
    def f(a, b):
        if _is_sym(a) or _is_sym(b):
            return op(tirx.const(a, "int64") if not _is_sym(a) else a,
                      tirx.const(b, "int64") if not _is_sym(b) else b)
        return bool(op(a, b))
    return f


_BINARY = {
    "Add": operator.add,
    "Sub": operator.sub,
    "Mul": operator.mul,
    "Div": _div,
    "Mod": _mod,
    "Min": _min,
    "Max": _max,
    "Equal": _cmp(lambda a, b: a == b if not (_is_sym(a) or _is_sym(b)) else tirx.EQ(a, b)),
    "Less": _cmp(operator.lt),
    "LessOrEqual": _cmp(operator.le),
    "Greater": _cmp(operator.gt),
    "GreaterOrEqual": _cmp(operator.ge),
    "And": lambda a, b: tirx.And(a, b) if (_is_sym(a) or _is_sym(b)) else bool(a) and bool(b),
    "Or": lambda a, b: tirx.Or(a, b) if (_is_sym(a) or _is_sym(b)) else bool(a) or bool(b),
}
_BOOL_RESULT = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or"}


def _elementwise(fn, arrays, out_dtype):
    arrays = np.broadcast_arrays(*[a.array.astype(object) for a in arrays])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*[a[idx] for a in arrays])
    if out_dtype == "bool":
        for idx in np.ndindex(out.shape):
            decided = _prove(out[idx])
            # a condition the analyzer cannot decide stays a symbolic boolean (``past_seq < 4``):
            # a Where over it becomes a select of sizes, still known on the host
            out[idx] = out[idx] if decided is None else decided
    return _make(out, out_dtype)


# ------------------------------------------------------------------------------------------------
# the ops of the shape-computing family


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _axes(node, inputs, idx=1):
    if len(inputs) > idx and inputs[idx] is not None:
        return [int(v) for v in inputs[idx].numpy().reshape(-1)]
    axes = _attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]




def _np_dtype(onnx_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type)).name


def _constant(node, _inputs):
    for a in node.attribute:
        if a.name == "value":
            return from_constant(numpy_helper.to_array(a.t))
        if a.name == "value_int":
            return from_constant(np.array(a.i, "int64"))
        if a.name == "value_ints":
            return from_constant(np.array(list(a.ints), "int64"))
        if a.name == "value_float":
            return from_constant(np.array(a.f, "float32"))
        if a.name == "value_floats":
            return from_constant(np.array(list(a.floats), "float32"))
    return None


def _shape(node, inputs, tensor_shape=None):
    dims = tensor_shape if tensor_shape is not None else list(inputs[0].array.shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return from_dims(dims[start:end] if end is not None else dims[start:])


def _cast(node, inputs):
    to = _np_dtype(_attr(node, "to"))
    x = inputs[0]
    if x.is_concrete:
        return HostValue(x.array.astype(to), to)
    if np.dtype(to).kind in "iu":  # symbolic dims stay integer expressions
        if x.dtype == "bool":  # a symbolic condition as 0/1
            return _make(np.vectorize(lambda v: tirx.Cast("int64", v) if _is_sym(v) else int(v),
                                      otypes=[object])(x.array), to)
        return HostValue(x.array, to)
    return None


def _gather(node, inputs):
    axis = _attr(node, "axis", 0)
    data, idx = inputs
    indices = idx.numpy().astype("int64")
    extent = data.array.shape[axis]
    indices = np.where(indices < 0, indices + extent, indices)
    return _make(np.take(data.array, indices, axis=axis), data.dtype)


def _unsqueeze(node, inputs):
    x = inputs[0].array
    axes = sorted(a if a >= 0 else a + x.ndim + len(_axes(node, inputs)) for a in _axes(node, inputs))
    for a in axes:
        x = np.expand_dims(x, a)
    return _make(x, inputs[0].dtype)


def _squeeze(node, inputs):
    x = inputs[0].array
    axes = _axes(node, inputs)
    x = np.squeeze(x, axis=None if axes is None else tuple(axes))
    return _make(x, inputs[0].dtype)


def _concat(node, inputs):
    axis = _attr(node, "axis")
    arrays = [v.array.astype(object) if not v.is_concrete else v.array for v in inputs]
    dtype = inputs[0].dtype
    if any(a.dtype == object for a in arrays):
        arrays = [a.astype(object) for a in arrays]
    return _make(np.concatenate(arrays, axis=axis), dtype)


def _slice(node, inputs):
    x = inputs[0].array
    starts = inputs[1].numpy().tolist()
    ends = inputs[2].numpy().tolist()
    axes = inputs[3].numpy().tolist() if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = inputs[4].numpy().tolist() if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(int(s), int(max(min(e, 2**62), -(2**62))), int(st))
    return _make(x[tuple(index)], inputs[0].dtype)


def _reshape(node, inputs):
    x = inputs[0].array
    shape = [int(v) for v in inputs[1].numpy().reshape(-1)]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return _make(x.reshape(shape), inputs[0].dtype)


def _expand(node, inputs):
    shape = [int(v) for v in inputs[1].numpy().reshape(-1)]
    x = inputs[0].array
    out_shape = np.broadcast_shapes(x.shape, tuple(shape))
    return _make(np.broadcast_to(x, out_shape).copy(), inputs[0].dtype)


def _constant_of_shape(node, inputs):
    shape = [int(v) for v in inputs[0].numpy().reshape(-1)]
    value = _attr(node, "value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, "float32")
    return from_constant(np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype))


def _range(node, inputs):
    start, limit, delta = (v.numpy().reshape(()).item() for v in inputs)
    return from_constant(np.arange(start, limit, delta, dtype=inputs[0].dtype))


def _where(node, inputs):
    cond, x, y = inputs
    if cond.is_concrete:
        c = cond.numpy().astype(bool)
        arrays = np.broadcast_arrays(c, x.array.astype(object), y.array.astype(object))
        return _make(np.where(arrays[0], arrays[1], arrays[2]), x.dtype)
    if np.dtype(x.dtype).kind not in "iu":
        return None
    # symbolic conditions over sizes: a select of sizes (TVM's Select, both sides are sizes)
    def select(c, a, b):
        if not _is_sym(c):
            return a if c else b
        return tirx.Select(c, tirx.const(a, "int64") if not _is_sym(a) else a,
                           tirx.const(b, "int64") if not _is_sym(b) else b)
    return _elementwise(select, [cond, x, y], x.dtype)


def _unary(fn):
    def f(node, inputs):
        return _elementwise(fn, inputs[:1], inputs[0].dtype)
    return f


def _not(node, inputs):
    if not inputs[0].is_concrete:
        return _elementwise(lambda v: tirx.Not(v) if _is_sym(v) else not v, inputs[:1], "bool")
    return from_constant(np.logical_not(inputs[0].numpy()))


def _binary(op_type):
    fn = _BINARY[op_type]

    def f(node, inputs):
        if op_type in ("Min", "Max") and len(inputs) > 2:
            result = inputs[0]
            for other in inputs[1:]:
                result = _elementwise(fn, [result, other], result.dtype)
            return result
        return _elementwise(fn, inputs, "bool" if op_type in _BOOL_RESULT else inputs[0].dtype)
    return f


def _reduce(np_fn):
    def f(node, inputs):
        x = inputs[0]
        if not x.is_concrete:
            return None
        axes = _axes(node, inputs)
        keep = bool(_attr(node, "keepdims", 1))
        out = np_fn(x.array, axis=None if axes is None else tuple(axes), keepdims=keep)
        return from_constant(np.asarray(out, dtype=x.dtype))
    return f


def _identity(node, inputs):
    return inputs[0]


def _size(node, inputs, tensor_shape=None):
    dims = tensor_shape if tensor_shape is not None else list(inputs[0].array.shape)
    total = 1
    for d in dims:
        total = total * d
    return _make(np.array(total, dtype=object), "int64")


HOST_OPS = {
    "Constant": _constant,
    "Shape": _shape,
    "Size": _size,
    "Identity": _identity,
    "Cast": _cast,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Reshape": _reshape,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Where": _where,
    "Neg": _unary(operator.neg),
    "Abs": _unary(lambda v: abs(v) if not _is_sym(v) else tirx.abs(v)),
    "Not": _not,
    "ReduceProd": _reduce(np.prod),
    "ReduceSum": _reduce(np.sum),
    "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
    **{op: _binary(op) for op in _BINARY},
}

# Ops that only look at the *shape* of their (tensor) input: they are shape computing even when
# the input is a real tensor on the device.
SHAPE_OF_TENSOR_OPS = {"Shape": _shape, "Size": _size}


def evaluate(node: onnx.NodeProto, inputs: list) -> HostValue | None:
    """Evaluate ``node`` on the host if it is shape computing, else return None.

    ``inputs`` holds a HostValue for every input known on the host, ``None`` for an omitted
    optional input, and anything else (a Relax expression) for a tensor computed on the device.
    """
    fn = HOST_OPS.get(node.op_type)
    if fn is None or not all(v is None or isinstance(v, HostValue) for v in inputs):
        return None
    if node.op_type != "Constant" and not inputs:
        return None
    try:
        result = fn(node, inputs)
    except (ValueError, TypeError, IndexError, AttributeError, RuntimeError):
        return None  # e.g. a needed value is symbolic: leave the node to tensor computing
    if result is not None and result.array.size > MAX_HOST_ELEMENTS:
        return None
    return result

