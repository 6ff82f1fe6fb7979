"""Tensor ops whose *shape* argument was computed on the host.

Reshape, Expand, ConstantOfShape, Range and Slice take their target shape (or extent) as an ONNX
tensor. After host shape computing (:mod:`.host_shapes`) that argument is a :class:`HostValue`
whose elements may be symbolic (``[1, seq, 9, 64]``); these converters turn it into a Relax
``ShapeExpr`` / ``PrimExpr`` so the op gets a symbolic output shape and no device kernel ever sees
a shape tensor. Stock TVM's converters expect a constant or a Relax tensor here, which is where
they fail on real torch exports.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper
from tvm import relax, te, tirx
from tvm.ir import Expr as PrimExpr
from tvm.ir import GenericConst

from .host_shapes import _ANALYZER, HostValue, _attr, _normalize, from_dims

_INT64_MAX_ISH = 2**62


class ShapeArgError(ValueError):
    """The shape argument of an op is not known on the host (a data-dependent shape)."""


def _dims_of(x: relax.Expr) -> list:
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        raise ShapeArgError("the input tensor's shape is unknown (data-dependent)")
    return [_normalize(v) for v in ty.shape.values]


def _host(v, what: str) -> HostValue:
    if not isinstance(v, HostValue):
        raise ShapeArgError(
            f"its {what} is computed by a tensor op on the device (a data-dependent shape); "
            "tvm_lite needs every shape to be known on the host"
        )
    return v


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


def reshape(bb, node, inputs):
    data, shape = inputs[0], _host(inputs[1], "target shape").as_dims()
    in_dims = _dims_of(data)
    if not _attr(node, "allowzero", 0):
        shape = [in_dims[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(shape)]
    if sum(1 for d in shape if isinstance(d, int) and d == -1) > 1:
        raise ShapeArgError("more than one -1 in the target shape")
    if any(isinstance(d, int) and d == -1 for d in shape):
        known = _prod([d for d in shape if not (isinstance(d, int) and d == -1)])
        inferred = _normalize(tirx.floordiv(_prod(in_dims), known) if not isinstance(known, int) or
                              not isinstance(_prod(in_dims), int) else _prod(in_dims) // known)
        shape = [inferred if isinstance(d, int) and d == -1 else d for d in shape]
    return relax.op.reshape(data, relax.ShapeExpr(shape))


def _broadcast_dim(a, b):
    """ONNX Expand: a 1 takes the other side's extent; otherwise the target shape's extent."""
    return a if isinstance(b, int) and b == 1 else b


def expand(bb, node, inputs):
    data, shape = inputs[0], _host(inputs[1], "target shape").as_dims()
    in_dims = _dims_of(data)
    rank = max(len(in_dims), len(shape))
    in_dims = [1] * (rank - len(in_dims)) + in_dims
    shape = [1] * (rank - len(shape)) + shape
    out = [_normalize(_broadcast_dim(a, b)) for a, b in zip(in_dims, shape)]
    if out == in_dims:
        return data if len(_dims_of(data)) == rank else relax.op.reshape(data, relax.ShapeExpr(out))
    return relax.op.broadcast_to(data, relax.ShapeExpr(out))


def constant_of_shape(bb, node, inputs):
    shape = _host(inputs[0], "shape").as_dims()
    value = _attr(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, "float32")
    return relax.op.full(relax.ShapeExpr(shape), relax.const(fill[0], str(fill.dtype)), str(fill.dtype))


def range_(bb, node, inputs):
    start, limit, delta = (_host(v, "bounds").as_dims()[0] for v in inputs)
    dtype = inputs[0].dtype
    return relax.op.arange(start, limit, delta, dtype=dtype)


def slice_(bb, node, inputs):
    data = inputs[0]
    dims = _dims_of(data)
    starts = _host(inputs[1], "starts").as_dims()
    ends = _host(inputs[2], "ends").as_dims()
    axes = _host(inputs[3], "axes").as_dims() if len(inputs) > 3 and inputs[3] is not None \
        else list(range(len(starts)))
    steps = _host(inputs[4], "steps").as_dims() if len(inputs) > 4 and inputs[4] is not None \
        else [1] * len(starts)
    if any(not isinstance(a, int) for a in axes) or any(not isinstance(s, int) for s in steps):
        raise ShapeArgError("symbolic slice axes or steps")
    axes = [a + len(dims) if a < 0 else a for a in axes]
    begins, finals = [], []
    for b, e, a, st in zip(starts, ends, axes, steps):
        extent = dims[a]
        b, e = _clamp(b, extent, st, is_end=False), _clamp(e, extent, st, is_end=True)
        begins.append(b)
        finals.append(e)
    return relax.op.strided_slice(data, axes, begins, finals, steps, assume_inbound=True)


def _clamp(v, extent, step, is_end):
    """Resolve a Python-style slice bound against ``extent`` (ONNX Slice semantics)."""
    lo, hi = (0, extent) if step > 0 else (-1, extent - 1)
    if isinstance(v, int):
        if v >= _INT64_MAX_ISH:
            return hi
        if v <= -_INT64_MAX_ISH:
            return lo
        if v < 0:
            v = v + extent
    if isinstance(v, int) and isinstance(extent, int):
        return max(lo, min(v, hi))
    return _normalize(tirx.max(lo, tirx.min(v, hi))) if step > 0 else _normalize(v)


def gather(bb, node, inputs):
    """Gather with a tensor ``data``: negative indices wrap without reading the shape on device.

    TVM's converter normalizes negative indices by materializing ``shape_of(data)`` as a tensor
    and gathering from it -- a kernel that computes a shape. Host indices are normalized here;
    device indices use ``take(mode="wrap")``, which is the same map for valid ONNX indices.
    """
    data, indices = inputs
    axis = _attr(node, "axis", 0)
    if isinstance(indices, HostValue):
        extent = _dims_of(data)[axis]
        idx = indices.numpy().astype("int64")
        if (idx < 0).any():
            if not isinstance(extent, int):
                raise ShapeArgError("negative constant indices into a symbolic axis")
            idx = np.where(idx < 0, idx + extent, idx)
        return relax.op.take(data, relax.const(idx, "int64"), axis=axis, mode="fast")
    try:
        view = _take_as_view(bb, data, indices, axis)
    except ShapeArgError:  # an index of unknown shape: not provably a view
        view = None
    return view if view is not None else relax.op.take(data, indices, axis=axis, mode="wrap")


def _take_as_view(bb, data, indices, axis: int):
    """Gather along ``axis`` at indices that are the output coordinate along one of their axes,
    of the data axis's extent (TorchScript's ``attention_mask[batch_idx, kv_idx]``: a take of
    the flattened mask at ``kv_idx + 0``): the data reshaped, else None."""
    dims, idx_dims = _dims_of(data), _dims_of(indices)
    axis %= len(dims)
    form = _coordinate_form(bb, indices)
    if form is None or form[0] != "iota" or not _same_extent(idx_dims[form[1]], dims[axis]):
        return None
    a = form[1]
    shape = dims[:axis] + [idx_dims[a] if i == a else 1 for i in range(len(idx_dims))] \
        + dims[axis + 1:]
    out_dims = dims[:axis] + idx_dims + dims[axis + 1:]
    return _view(bb, data, shape, out_dims)


def _view(bb, data, shape: list, out_dims: list):
    """``data`` reshaped to ``shape`` (the same elements in order), then broadcast to ``out_dims``
    where they differ; a cast that made ``data`` (through reshapes) is moved after the reshape, so
    it fuses with what reads the view instead of being a kernel of its own."""
    src, cast = data, None
    e = _binding(bb, src)
    while isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.reshape":
        src = e.args[0]
        e = _binding(bb, src)
    if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.astype":
        src, cast = e.args[0], e.attrs.dtype
    else:
        src = data
    view = relax.op.reshape(src, shape)
    if cast is not None:
        view = relax.op.astype(view, cast)
    if any(not _same_extent(a, b) for a, b in zip(shape, out_dims)):
        view = relax.op.broadcast_to(view, out_dims)
    return view


def _binding(bb, x):
    """The expression ``x`` stands for: its binding in ``bb`` if it is a variable (else None)."""
    if isinstance(x, relax.Var):
        try:
            return bb.lookup_binding(x)
        except Exception:  # noqa: BLE001 (a function parameter: no binding)
            return None
    return x


def _int_value(v):
    """An IntImm or a Python int as an int, else None."""
    return int(v) if isinstance(v, (int, tirx.IntImm)) else None


def _same_extent(a, b) -> bool:
    """Two dims (ints or symbolic expressions) provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    as_expr = lambda d: tirx.const(d, "int64") if isinstance(d, int) else d  # noqa: E731
    return bool(_ANALYZER.can_prove_equal(as_expr(a), as_expr(b)))


def _coordinate_form(bb, x, depth: int = 0):
    """How the elements of integer tensor ``x`` follow from their coordinates, seen through
    the ops that built it: ``("const", c)`` (every element is ``c``), ``("iota", a)`` (an element
    is its coordinate along axis ``a``), or None (anything else). Follows ``arange(0, E, 1)``,
    constants, ``expand_dims``, ``broadcast_to`` (not of the iota axis) and integer ``astype``."""
    e = _binding(bb, x)
    if e is None or depth > 16:
        return None
    if isinstance(e, GenericConst):
        arr = e.value.numpy()
        if arr.size and np.issubdtype(arr.dtype, np.integer) and (arr == arr.flat[0]).all():
            return ("const", int(arr.flat[0]))
        return None
    if not isinstance(e, relax.Call) or not hasattr(e.op, "name"):
        return None
    op = e.op.name
    if op == "relax.arange":
        start, _, step = (_int_value(a) for a in e.args)
        return ("iota", 0) if (start, step) == (0, 1) else None
    if op == "relax.astype" and "int" in str(e.attrs.dtype):
        return _coordinate_form(bb, e.args[0], depth + 1)
    if op == "relax.add":  # x + 0 (TorchScript's flattened index: batch 0 x stride + kv_idx)
        a, b = (_coordinate_form(bb, arg, depth + 1) for arg in e.args)
        if b == ("const", 0) and a is not None and e.ty.ndim == e.args[0].ty.ndim:
            return a
        if a == ("const", 0) and b is not None and e.ty.ndim == e.args[1].ty.ndim:
            return b
        return None
    inner = _coordinate_form(bb, e.args[0], depth + 1) if e.args else None
    if inner is None or inner[0] == "const":
        return inner if op in ("relax.expand_dims", "relax.broadcast_to") else None
    axis = inner[1]
    if op == "relax.expand_dims":
        ndim_out = e.ty.ndim
        inserted = {int(a) % ndim_out for a in e.attrs.axis}
        return ("iota", [a for a in range(ndim_out) if a not in inserted][axis])
    if op == "relax.broadcast_to":
        shift = e.ty.ndim - e.args[0].ty.ndim
        same = _same_extent(e.args[0].ty.shape.values[axis], e.ty.shape.values[axis + shift])
        return ("iota", axis + shift) if same else None
    return None


def _gather_as_view(bb, data, indices, dims: list):
    """GatherND (``batch_dims`` 0) whose index tuple is the identity on ``data``'s axes -- each
    component a constant, or the output coordinate along an axis of the same extent as the data
    axis it indexes (ascending) -- as the data itself, reshaped (HF's ``attention_mask[batch_idx,
    kv_idx]``: no index tensor, no gather kernel). None when it is not."""
    parts = _binding(bb, indices)
    k = len(dims)
    out_dims = _dims_of(indices)[:-1]
    if isinstance(parts, relax.Call) and getattr(parts.op, "name", "") == "relax.concat" \
            and int(parts.attrs.axis) % (len(out_dims) + 1) == len(out_dims):
        parts = list(parts.args[0].fields) if isinstance(parts.args[0], relax.Tuple) else None
    else:
        parts = [indices] if _dims_of(indices)[-1] == 1 else None
    if not parts or len(parts) != k or any(_dims_of(p)[-1] != 1 for p in parts):
        return None
    forms = [_coordinate_form(bb, p) for p in parts]
    if any(f is None for f in forms):
        return None
    iota_axes = []
    for axis, (form, dim) in enumerate(zip(forms, dims)):
        if form[0] == "const":  # a data axis of one element, read at 0 (or -1)
            if not (isinstance(dim, int) and dim == 1 and form[1] in (0, -1)):
                return None
        else:
            a = form[1]
            if a >= len(out_dims) or not _same_extent(out_dims[a], dim):
                return None
            iota_axes.append(a)
    if iota_axes != sorted(set(iota_axes)):
        return None  # (a transpose: not a view)
    shape = [out_dims[a] if a in iota_axes else 1 for a in range(len(out_dims))]
    return _view(bb, data, shape, out_dims)


def gather_nd(bb, node, inputs):
    """GatherND whose negative-index fix-up uses host dims instead of ``shape_of(data)``; an
    identity index tuple (:func:`_gather_as_view`) is the data itself."""
    data, indices = inputs
    batch_dims = _attr(node, "batch_dims", 0)
    dims = _dims_of(data)
    if batch_dims == 0 and not isinstance(indices, HostValue):
        try:
            view = _gather_as_view(bb, data, indices, dims)
        except ShapeArgError:  # a part of unknown shape: not provably a view
            view = None
        if view is not None:
            return view
    if isinstance(indices, HostValue):
        idx = indices.numpy().astype("int64")
        depth = idx.shape[-1]
        extents = dims[batch_dims:batch_dims + depth]
        if (idx < 0).any():
            if not all(isinstance(e, int) for e in extents):
                raise ShapeArgError("negative constant indices into a symbolic axis")
            idx = np.where(idx < 0, idx + np.array(extents, "int64"), idx)
        return relax.op.gather_nd(data, relax.const(idx, "int64"), batch_dims)
    depth = _dims_of(indices)[-1]
    if not isinstance(depth, int):
        raise ShapeArgError("GatherND index depth must be static")
    extents = materialize(bb, from_dims(dims[batch_dims:batch_dims + depth]))
    extents = relax.op.astype(extents, indices.ty.dtype)
    zero = relax.const(0, indices.ty.dtype)
    fixed = relax.op.where(relax.op.less(indices, zero), relax.op.add(indices, extents), indices)
    return relax.op.gather_nd(data, fixed, batch_dims)


def materialize(bb: relax.BlockBuilder, value: HostValue) -> relax.Expr:
    """A host value handed to a tensor op: a constant, or a tiny tensor filled from symbols.

    The symbolic dims become scalar arguments of the fill kernel; nothing is read back.
    """
    if value.is_concrete:
        return relax.const(value.array, value.dtype)
    flat = [_normalize(v) for v in value.array.reshape(-1).tolist()]
    dtype = value.dtype
    shape = list(value.array.shape)

    def fill(vals):
        def element(*idx):
            lin = 0
            for i, extent in zip(idx, shape):
                lin = lin * extent + i
            expr = None
            for k, v in enumerate(vals):
                v = tirx.Cast(dtype, v) if isinstance(v, PrimExpr) else tirx.const(v, dtype)
                expr = v if expr is None else tirx.Select(lin == k, v, expr)
            return expr
        return te.compute(shape, element, name="host_value")

    out = bb.emit_te(fill, flat, primfunc_name_hint="fill_from_host_dims")
    # Kept out of fusion (op_pattern 8: opaque, a tiny kernel): it takes the model's size vars as
    # scalar arguments, and TVM 0.27's FuseTIR fails on a fused function that passes such a var
    # both as a scalar and in a shape ("Check failed: (VarRemapGet(source) == nullptr)"), as the
    # cache positions of the HF sliding-window masks do.
    gv = bb.lookup_binding(out).args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))
    return out


# op type -> (converter, indices of the inputs that are shape arguments and stay host values)
TENSOR_OPS_WITH_HOST_SHAPES = {
    "Reshape": (reshape, {1}),
    "Expand": (expand, {1}),
    "ConstantOfShape": (constant_of_shape, {0}),
    "Range": (range_, {0, 1, 2}),
    "Slice": (slice_, {1, 2, 3, 4}),
    "Gather": (gather, {1}),
    "GatherND": (gather_nd, {1}),
}
