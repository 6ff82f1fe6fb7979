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

Panel-major weights (CPU builds, ``relax_passes/pack_weight_panels.py``): with ``panel=P`` every
weight tensor ``T[rows, N]`` (fp32 ``W[K, N]``, or the codes, scales and zeros) is stored as
``T[N / P, rows, P]``: the ``P`` columns one CPU task computes are one contiguous block, so a
decode GEMV streams memory instead of reading ``4P``-byte pieces of rows ``4N`` bytes apart.
:func:`weight_at` is the one place that indexes either layout; :func:`panel_matmul_func` is the
float (unquantized) matmul over a panel-major weight.
"""

from __future__ import annotations

from tvm import te, tirx

from .format import CODES_PER_WORD, E0M4_EXP_BITS, INT4_ZERO, check_format, num_groups

ATTR = "tvm_lite.dequant"
GROUP_BLOCK = "dequant_group"  # the per-group partial sums of a scales-per-group GEMV
MAKER_ATTR = "tvm_lite.kernel_maker"  # how to rebuild a kernel for other lead dims (rebind_lead)


def weight_at(tensor, row, col, panel: int | None = None):
    """``T[row, col]`` of a weight tensor stored plain (``[rows, N]``) or, with ``panel``,
    panel-major (``[N / panel, rows, panel]``)."""
    if panel:
        return tensor[col // panel, row, col % panel]
    return tensor[row, col]


def weight_shape(rows: int, n: int, panel: int | None = None) -> tuple:
    """The stored shape of a ``[rows, N]`` weight tensor (see :func:`weight_at`)."""
    if panel:
        if n % panel:
            raise ValueError(f"N={n} is not a multiple of the panel width {panel}")
        return (_i64(n // panel), _i64(rows), _i64(panel))
    return (_i64(rows), _i64(n))


def _code(fmt: str, codes, k, n, panel: int | None = None):
    """The fp16 the format makes of the 4-bit code of ``W[k, n]``: E0M4 ``1024 + q`` (the code
    OR-ed under the fixed exponent, no conversion), int4 ``q`` (an int->float conversion)."""
    word = weight_at(codes, k // CODES_PER_WORD, n, panel)
    shift = (k % CODES_PER_WORD * 4).astype("uint16")
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(0xF, "uint16"))
    if fmt == "e0m4":
        return tirx.reinterpret("float16", tirx.bitwise_or(nibble, tirx.const(E0M4_EXP_BITS, "uint16")))
    return nibble.astype("float16")


def _zero(fmt: str, zero, g, n, panel: int | None = None):
    """What the format subtracts from :func:`_code`: E0M4's stored ``c = 1024 + z``, int4's 8."""
    if fmt == "e0m4":
        return weight_at(zero, g, n, panel)
    return tirx.const(INT4_ZERO, "float16")


def dequant_expr(fmt: str, codes, scale, zero, k, n, group_size: int, panel: int | None = None):
    """The fp16 weight ``W[k, n]`` from the packed tensors (TE tensors indexed by ``k, n``; stored
    panel-major with ``panel``).

    E0M4: ``as_half(((word >> 4i) & 0xF) | 0x6400) - c``, times ``s``: AND and OR, no conversion.
    int4: ``(half)((word >> 4i) & 0xF) - 8``, times ``s``: AND and an int->float conversion.
    """
    g = k // group_size
    return (_code(fmt, codes, k, n, panel) - _zero(fmt, zero, g, n, panel)) \
        * weight_at(scale, g, n, panel)


def _packed_placeholders(fmt: str, k: int, n: int, group_size: int, panel: int | None = None):
    check_format(fmt)
    ng = num_groups(k, group_size)
    codes = te.placeholder(weight_shape(-(-k // CODES_PER_WORD), n, panel), "uint16", name="codes")
    scale = te.placeholder(weight_shape(ng, n, panel), "float16", name="scale")
    zero = te.placeholder(weight_shape(ng, n, panel), "float16", name="zero") if fmt == "e0m4" else None
    return codes, scale, zero


def _finish(args, fmt: str | None, name: str, maker: dict | None = None) -> tirx.PrimFunc:
    func = te.create_prim_func([a for a in args if a is not None])
    attrs = {"global_symbol": name}
    if fmt is not None:  # a 4-bit kernel
        attrs[ATTR] = fmt
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


def _matmul(x, w, lead, k: int, n: int, x_dtype: str, out_dtype: str):
    """``Y[..., N] = sum_k X[..., k] * w[k, N]`` (``w``: a producer block of the weight)."""
    r = te.reduce_axis((_i64(0), _i64(k)), name="k")

    def body(*idx):
        *rest, j = idx
        xv = x[(*rest, r)]
        return te.sum((xv if x_dtype == out_dtype else xv.astype(out_dtype)) * w[r, j], axis=r)

    return te.compute((*lead, _i64(n)), body, name="matmul")


def _shape_tag(lead) -> str:
    return "x".join(str(int(d)) if isinstance(d, tirx.IntImm) else "n" for d in lead)


def scales_per_group(lead_shape, k: int, group_size: int, out_dtype: str,
                     panel: int | None) -> bool:
    """Whether :func:`matmul_func` applies the scales once per group: the CPU decode GEMV
    (panel-major weights, one row, fp32 out, whole groups)."""
    return bool(panel) and out_dtype == "float32" and k % group_size == 0 \
        and all(isinstance(d, (int, tirx.IntImm)) and int(d) == 1 for d in lead_shape)


def _grouped_matmul(fmt, x, codes, scale, zero, lead, k: int, n: int, group_size: int, panel):
    """``Y[..., n] = sum_g s[g, n] * sum_{k in g} x[..., k] * (code[k, n] - zero[g, n])``, in fp32.

    The same sum as ``X @ dequant(W)`` with the scale taken out of each group: per weight a
    code, a subtraction (exact: two integers) and the multiply-add; the scale once per group.
    The weights are not rounded to fp16 (the fp16 kernel's ``(h - c) * s`` is), so sums differ
    from it by that rounding (~2^-11 of a weight)."""
    f32 = lambda e: e.astype("float32")  # noqa: E731
    kk = te.reduce_axis((_i64(0), _i64(group_size)), name="kk")

    def group_sum(*idx):
        *rest, g, j = idx
        row = g * group_size + kk
        weight = f32(_code(fmt, codes, row, j, panel)) - f32(_zero(fmt, zero, g, j, panel))
        return te.sum(f32(x[(*rest, row)]) * weight, axis=kk)

    partial = te.compute((*lead, _i64(k // group_size), _i64(n)), group_sum, name=GROUP_BLOCK)
    gr = te.reduce_axis((_i64(0), _i64(k // group_size)), name="g")

    def body(*idx):
        *rest, j = idx
        return te.sum(partial[(*rest, gr, j)] * f32(weight_at(scale, gr, j, panel)), axis=gr)

    return te.compute((*lead, _i64(n)), body, name="matmul")


def matmul_func(fmt: str, lead_shape, k: int, n: int, group_size: int, x_dtype: str = "float32",
                out_dtype: str | None = None, panel: int | None = None) -> tirx.PrimFunc:
    """``Y[..., N] = X[..., K] @ dequant(W)``: the dequantized weight is a producer block the
    schedule inlines into (or computes at) the reduction -- never a stored fp16 matrix.
    ``panel``: the packed tensors are stored panel-major (:func:`weight_at`); a one-row kernel
    over them then applies the scales per group (:func:`scales_per_group`)."""
    out_dtype = out_dtype or x_dtype
    lead = _dims(lead_shape)
    x = te.placeholder((*lead, _i64(k)), x_dtype, name="x")
    codes, scale, zero = _packed_placeholders(fmt, k, n, group_size, panel)
    if scales_per_group(lead, k, group_size, out_dtype, panel):
        y = _grouped_matmul(fmt, x, codes, scale, zero, lead, k, n, group_size, panel)
    else:
        # the fp16 weight, widened to the matmul's dtype in the producer: the reduction is then
        # a plain einsum the stock matmul schedules recognise
        w = te.compute((_i64(k), _i64(n)),
                       lambda i, j: dequant_expr(fmt, codes, scale, zero, i, j, group_size,
                                                 panel).astype(out_dtype),
                       name="dequantize")
        y = _matmul(x, w, lead, k, n, x_dtype, out_dtype)
    layout = f"_p{panel}" if panel else ""
    maker = {"kind": "matmul", "k": k, "n": n, "group_size": group_size,
             "x_dtype": x_dtype, "out_dtype": out_dtype}
    if panel:
        maker["panel"] = panel
    return _finish([x, codes, scale, zero, y], fmt,
                   f"{fmt}_matmul_{_shape_tag(lead)}x{k}x{n}_g{group_size}_{x_dtype}{layout}", maker)


def panel_matmul_func(lead_shape, k: int, n: int, panel: int, x_dtype: str = "float32",
                      w_dtype: str = "float32", out_dtype: str | None = None) -> tirx.PrimFunc:
    """``Y[..., N] = X[..., K] @ W`` with a float ``W`` stored panel-major (``[N / panel, K,
    panel]``). The weight is read through an injective ``panel_weight`` block that a schedule
    inlines (``W[k, j] = Wp[j / panel, k, j % panel]``). It carries a kernel maker, as the
    dequant kernels do, so that BindDequantKernelShapes rebuilds it per call shape."""
    out_dtype = out_dtype or x_dtype
    lead = _dims(lead_shape)
    x = te.placeholder((*lead, _i64(k)), x_dtype, name="x")
    wp = te.placeholder(weight_shape(k, n, panel), w_dtype, name="w")
    w = te.compute((_i64(k), _i64(n)), lambda i, j: weight_at(wp, i, j, panel).astype(out_dtype),
                   name="panel_weight")
    y = _matmul(x, w, lead, k, n, x_dtype, out_dtype)
    return _finish([x, wp, y], None,
                   f"matmul_{_shape_tag(lead)}x{k}x{n}_{w_dtype}_p{panel}",
                   {"kind": "panel_matmul", "k": k, "n": n, "panel": panel, "x_dtype": x_dtype,
                    "w_dtype": w_dtype, "out_dtype": out_dtype})


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
    fmt, kind = str(func.attrs.get(ATTR, "")), str(m["kind"])
    panel = int(m["panel"]) if "panel" in m else None
    if kind == "matmul":
        new = matmul_func(fmt, lead_shape, int(m["k"]), int(m["n"]), int(m["group_size"]),
                          str(m["x_dtype"]), str(m["out_dtype"]), panel)
    elif kind == "panel_matmul":
        new = panel_matmul_func(lead_shape, int(m["k"]), int(m["n"]), panel, str(m["x_dtype"]),
                                str(m["w_dtype"]), str(m["out_dtype"]))
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


__all__ = ["dequant_expr", "dequant_func", "matmul_func", "panel_matmul_func", "take_func",
           "weight_at", "weight_shape", "scales_per_group", "is_dequant_func", "GROUP_BLOCK",
           "rebind_lead", "ATTR", "MAKER_ATTR"]
