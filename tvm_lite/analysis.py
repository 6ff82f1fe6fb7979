"""Questions asked of an imported module (used by tests, the CLI and the tutorials)."""

from __future__ import annotations

import tvm
from tvm import relax

# Ops through which a shape becomes tensor data on the device, or tensor data becomes a shape
# (a device->host read). tvm_lite's importer emits none of them.
SHAPE_COMPUTING_OPS = ("relax.shape_of", "relax.shape_to_tensor", "relax.tensor_to_shape")


def _calls(func):
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def shape_computing_calls(mod: tvm.IRModule) -> list[str]:
    """Calls that move shapes into tensors or tensors into shapes, as ``op`` names."""
    out = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            for call in _calls(func):
                if isinstance(call.op, tvm.ir.Op) and call.op.name in SHAPE_COMPUTING_OPS:
                    out.append(call.op.name)
    return out


def symbolic_dims(mod: tvm.IRModule, func: str = "main") -> list:
    """The symbolic dims (tirx Vars) in the signature of ``func``."""
    seen = {}
    for param in mod[func].params:
        ty = param.ty
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            for dim in ty.shape.values:
                for var in tvm.tirx.analysis.undefined_vars(dim) if not isinstance(dim, tvm.tirx.IntImm) else []:
                    seen[var.name] = var
    return list(seen.values())


def unknown_shape_tensors(mod: tvm.IRModule, func: str = "main") -> int:
    """How many bindings have a tensor type with unknown shape (ndim only, or no ndim)."""
    count = 0
    for block in mod[func].body.blocks:
        for binding in block.bindings:
            ty = binding.var.ty
            if isinstance(ty, relax.TensorType) and not isinstance(ty.shape, relax.ShapeExpr):
                count += 1
    return count
