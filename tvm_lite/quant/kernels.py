"""Generic TIR for 4-bit weights: dequantize, dequant-fused matmul, dequant-fused embedding take.

E0M4 and the MLC-style int4 ablation share everything here except :func:`dequant_expr` -- the
same packed codes (``uint16[ceil(K/4), N]``, see :mod:`.format`), the same loops, the same fp16
scale. Every function is built with TE and carries the attribute ``tvm_lite.dequant`` (the format);
fusion with neighbours (FuseTIR) makes new functions without it, so the block names are what a
schedule rule keys on: ``dequantize`` (the name DLight's Adreno matmul rule looks for: it computes
that block per register tile, vectorized, instead of inlining it) and ``matmul``/``take``.

The kernels are generic (one scalar expression per weight): tvm_lite's CPU rules run them on
the CPU (the dequant inlined into the reduction, vectorized over ``N``); on GPUs the stock DLight
rules schedule them for now (tvm_lite's own GPU schedules are a separate piece of work).
"""

from __future__ import annotations

from tvm import te, tirx

from .format import CODES_PER_WORD, E0M4_EXP_BITS, INT4_ZERO, check_format, num_groups

ATTR = "tvm_lite.dequant"
MAKER_ATTR = "tvm_lite.kernel_maker"  # how to rebuild a kernel for other lead dims (rebind_lead)


def dequant_expr(fmt: str, codes, scale, zero, k, n, group_size: int):
    """The fp16 weight ``W[k, n]`` from the packed tensors (TE tensors indexed by ``k, n``).

    E0M4: ``as_half(((word >> 4i) & 0xF) | 0x6400) - c``, times ``s``: AND and OR, no conversion.
    int4: ``(half)((word >> 4i) & 0xF) - 8``, times ``s``: AND and an int->float conversion.
    """
    word = codes[k // CODES_PER_WORD, n]
    shift = (k % CODES_PER_WORD * 4).astype("uint16")
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(0xF, "uint16"))
    g = k // group_size
    if fmt == "e0m4":
        h = tirx.reinterpret("float16", tirx.bitwise_or(nibble, tirx.const(E0M4_EXP_BITS, "uint16")))
        return (h - zero[g, n]) * scale[g, n]
    return (nibble.astype("float16") - tirx.const(INT4_ZERO, "float16")) * scale[g, n]


def _packed_placeholders(fmt: str, k: int, n: int, group_size: int):
    check_format(fmt)
    ng = num_groups(k, group_size)
    codes = te.placeholder((_i64(-(-k // CODES_PER_WORD)), _i64(n)), "uint16", name="codes")
    scale = te.placeholder((_i64(ng), _i64(n)), "float16", name="scale")
    zero = te.placeholder((_i64(ng), _i64(n)), "float16", name="zero") if fmt == "e0m4" else None
    return codes, scale, zero


def _finish(args, fmt: str, name: str, maker: dict | None = None) -> tirx.PrimFunc:
    func = te.create_prim_func([a for a in args if a is not None])
    attrs = {ATTR: fmt, "global_symbol": name}
    if maker is not None:
        attrs[MAKER_ATTR] = maker
    return func.with_attr(attrs)


def dequant_func(fmt: str, k: int, n: int, group_size: int) -> tirx.PrimFunc:
    """``W[K, N]`` (fp16) from the packed tensors: the bit-exactness reference on the device."""
    codes, scale, zero = _packed_placeholders(fmt, k, n, group_size)
    w = te.compute((_i64(k), _i64(n)),
                   lambda i, j: dequant_expr(fmt, codes, scale, zero, i, j, group_size), name="dequantize")
    return _finish([codes, scale, zero, w], fmt, f"{fmt}_dequant_{k}x{n}_g{group_size}")


def _dims(shape):
    """Relax leading dims -> TE dims. Symbolic dims stay the caller's own ``tirx.Var`` objects
    (as LegalizeOps does), so FuseTIR can fuse these kernels with their neighbours."""
    return [_i64(d) if isinstance(d, (int, tirx.IntImm)) else d for d in shape]


def _i64(d) -> tirx.IntImm:
    """Shapes in int64, as Relax's own kernels have them (FuseTIR compares buffer types)."""
    return tirx.IntImm("int64", int(d))


def matmul_func(fmt: str, lead_shape, k: int, n: int, group_size: int, x_dtype: str = "float32",
                out_dtype: str | None = None) -> tirx.PrimFunc:
    """``Y[..., N] = X[..., K] @ dequant(W)``: the dequantized weight is a producer block the
    schedule inlines into (or computes at) the reduction -- never a stored fp16 matrix."""
    out_dtype = out_dtype or x_dtype
    lead = _dims(lead_shape)
    x = te.placeholder((*lead, _i64(k)), x_dtype, name="x")
    codes, scale, zero = _packed_placeholders(fmt, k, n, group_size)
    # the fp16 weight, widened to the matmul's dtype in the producer: the reduction is then a
    # plain einsum the stock matmul schedules recognise
    w = te.compute((_i64(k), _i64(n)),
                   lambda i, j: dequant_expr(fmt, codes, scale, zero, i, j, group_size).astype(out_dtype),
                   name="dequantize")
    r = te.reduce_axis((_i64(0), _i64(k)), name="k")

    def body(*idx):
        *rest, j = idx
        xv = x[(*rest, r)]
        return te.sum((xv if x_dtype == out_dtype else xv.astype(out_dtype)) * w[r, j], axis=r)

    y = te.compute((*lead, _i64(n)), body, name="matmul")
    shape_tag = "x".join(str(int(d)) if isinstance(d, tirx.IntImm) else "n" for d in lead)
    return _finish([x, codes, scale, zero, y], fmt,
                   f"{fmt}_matmul_{shape_tag}x{k}x{n}_g{group_size}_{x_dtype}",
                   {"kind": "matmul", "k": k, "n": n, "group_size": group_size,
                    "x_dtype": x_dtype, "out_dtype": out_dtype})


def take_func(fmt: str, ids_shape, ids_dtype: str, d: int, v: int, group_size: int,
              out_dtype: str = "float32") -> tirx.PrimFunc:
    """Embedding lookup from a quantized table: the table is stored transposed, ``[D, V]``
    (``K = D``, the same layout as a tied lm_head), and ``out[..., j] = W[j, ids[...]]`` with
    ids taken modulo ``V`` (``R.take(..., mode="wrap")``)."""
    lead = _dims(ids_shape)
    ids = te.placeholder(tuple(lead), ids_dtype, name="ids")
    codes, scale, zero = _packed_placeholders(fmt, d, v, group_size)

    def body(*idx):
        *rest, j = idx
        row = tirx.floormod(ids[tuple(rest)].astype("int64"), tirx.const(v, "int64"))
        return dequant_expr(fmt, codes, scale, zero, j, row, group_size).astype(out_dtype)

    out = te.compute((*lead, _i64(d)), body, name="take")
    return _finish([ids, codes, scale, zero, out], fmt, f"{fmt}_take_{d}x{v}_g{group_size}",
                   {"kind": "take", "ids_dtype": ids_dtype, "d": d, "v": v,
                    "group_size": group_size, "out_dtype": out_dtype})


def rebind_lead(func: tirx.PrimFunc, lead_shape) -> tirx.PrimFunc | None:
    """The same kernel as ``func`` for the leading dims ``lead_shape`` (a call site's own dims),
    or None if ``func`` is not a rebuildable tvm_lite dequant kernel."""
    if func.attrs is None or MAKER_ATTR not in func.attrs:
        return None
    m = {str(k): v for k, v in func.attrs[MAKER_ATTR].items()}
    fmt, kind = str(func.attrs[ATTR]), str(m["kind"])
    if kind == "matmul":
        new = matmul_func(fmt, lead_shape, int(m["k"]), int(m["n"]), int(m["group_size"]),
                          str(m["x_dtype"]), str(m["out_dtype"]))
    else:
        new = take_func(fmt, lead_shape, str(m["ids_dtype"]), int(m["d"]), int(m["v"]),
                        int(m["group_size"]), str(m["out_dtype"]))
    keep = {k: v for k, v in func.attrs.items() if str(k) not in (ATTR, MAKER_ATTR, "global_symbol")}
    return new.with_attrs(keep) if keep else new


def is_dequant_func(func) -> str | None:
    """The format of a tvm_lite dequant kernel, or None."""
    if isinstance(func, tirx.PrimFunc) and func.attrs is not None and ATTR in func.attrs:
        return str(func.attrs[ATTR])
    return None


__all__ = ["dequant_expr", "dequant_func", "matmul_func", "take_func", "is_dequant_func",
           "rebind_lead", "ATTR", "MAKER_ATTR"]
