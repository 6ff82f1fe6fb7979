"""tvm_lite's CPU rules (schedules/cpu*.py): which rule takes a kernel, results against numpy for
the shapes the rules tile (symbolic M not a multiple of the micro-kernel's rows, epilogues, 4-bit
weights, panel-major weights), the vector width taken from the target, and aarch64 object code."""

import numpy as np
import pytest
import tvm
from tvm import te, tirx
from tvm.s_tir import dlight as dl

from tvm_lite import schedules
from tvm_lite.quant import kernels
from tvm_lite.quant.rtn import rtn
from tvm_lite.relax_passes.pack_weight_panels import PackWeightPanels, pack_panels, unpack_panels
from tvm_lite.schedules.cpu_target import cpu_tiles, vector_bits, weight_panel
from tvm_lite.target import parse_target

HOST = parse_target("llvm")
AVX512 = parse_target("llvm -mcpu=skylake-avx512")
AVX2 = parse_target("llvm -mcpu=haswell")
ANDROID = parse_target("llvm -mtriple=aarch64-linux-android")


def _matmul(k, n, rows=None, silu_up=False):
    """``x[1, M, K] @ w[K, N]`` as LegalizeOps writes it (M symbolic unless ``rows``), optionally
    followed by ``silu(y) * up`` (the gated MLP's fused epilogue)."""
    m = tirx.Var("seq", "int64") if rows is None else rows
    x = te.placeholder((1, m, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((1, m, n), lambda b, i, j: te.sum(x[b, i, r] * w[r, j], axis=r), name="matmul")
    if not silu_up:
        return te.create_prim_func([x, w, y])
    up = te.placeholder((1, m, n), "float32", name="up")
    out = te.compute((1, m, n), lambda b, i, j: y[b, i, j] * te.sigmoid(y[b, i, j]) * up[b, i, j],
                     name="silu_mul")
    return te.create_prim_func([x, w, up, out])


def _schedule(func, target=HOST):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        return dl.ApplyDefaultSchedule(*schedules.rules_for(target))(mod)


def _run(mod, *arrays, out_shape):
    ex = tvm.compile(mod, target=HOST)
    out = tvm.runtime.empty(out_shape, "float32")
    ex["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


def test_vector_width_and_tiles_follow_the_target():
    assert vector_bits(AVX512) == 512 and cpu_tiles(AVX512).lanes == 16
    assert vector_bits(AVX2) == 256 and cpu_tiles(AVX2).gemm_cols == 16
    assert vector_bits(ANDROID) == 128 and cpu_tiles(ANDROID).lanes == 4


@pytest.mark.parametrize("rows", [1, 5, 13, 128])  # 5, 13: not multiples of the 6-row tile
@pytest.mark.parametrize("silu_up", [False, True])
def test_prefill_gemm_matches_numpy_for_any_row_count(rows, silu_up):
    k, n = 96, 160  # n: 5 panels of 32 columns
    mod = _schedule(_matmul(k, n, silu_up=silu_up))
    script = mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script and "_pad" in script  # padded M
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    ref = x @ w
    args = [x, w]
    if silu_up:
        up = rng.standard_normal((1, rows, n)).astype("float32")
        ref, args = ref / (1 + np.exp(-ref)) * up, [x, w, up]
    np.testing.assert_allclose(_run(mod, *args, out_shape=(1, rows, n)), ref, rtol=1e-4, atol=1e-4)


def test_decode_gemv_accumulates_in_registers_and_matches_numpy():
    k, n = 576, 192
    mod = _schedule(_matmul(k, n, rows=1))
    script = mod["main"].script()
    assert "matmul_global" in script and "T.parallel" in script and "T.unroll" in script
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    np.testing.assert_allclose(_run(mod, x, w, out_shape=(1, 1, n)), x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, None])  # decode GEMV, prefill GEMM (symbolic M)
def test_e0m4_matmul_dequantizes_in_the_kernel_and_matches_numpy(rows):
    k, n, m = 256, 96, 7
    qw = rtn(np.random.default_rng(1).standard_normal((k, n)).astype("float32"), "e0m4", 32)
    lead = [1, 1] if rows == 1 else [1, tirx.Var("seq", "int64")]
    mod = _schedule(kernels.matmul_func("e0m4", lead, k, n, 32))
    script = mod["main"].script()
    assert "dequantize" in script and "T.parallel" in script and "T.vectorized" in script
    m = 1 if rows == 1 else m
    x = np.random.default_rng(2).standard_normal((1, m, k)).astype("float32")
    out = _run(mod, x, *qw.arrays().values(), out_shape=(1, m, n))
    np.testing.assert_allclose(out, x @ qw.effective_weight(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target, register", [(AVX512, "zmm"), (AVX2, "ymm")])
def test_micro_kernel_uses_the_targets_vector_registers(target, register):
    mod = _schedule(_matmul(64, 64), target)
    with target:
        asm = tvm.compile(mod, target=target).mod.inspect_source("asm")
    fmas = [line for line in asm.splitlines() if "vfmadd" in line]
    assert fmas and all(register in line for line in fmas)


def test_small_elementwise_kernels_stay_on_one_thread():
    """A decode step's one-row kernels are not worth a parallel region; prefill's are."""
    def add(rows):
        a = te.placeholder((1, rows, 576), "float32", name="a")
        return te.create_prim_func([a, te.compute(a.shape, lambda *i: a(*i) + 1, name="add")])

    assert "T.parallel" not in _schedule(add(1))["main"].script()
    assert "T.parallel" in _schedule(add(tirx.Var("seq", "int64")))["main"].script()


def test_whole_model_compiles_to_aarch64_object_code(tmp_path, export_dir):
    """The default model, built for an Android phone's CPU cores with the same rules: object code
    for AArch64 (ELF e_machine 183), no NDK needed to produce it."""
    import tvm_lite

    from tvm_lite.artifact import weights_as_built

    mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
    mod = weights_as_built(mod, panel=weight_panel(ANDROID), progress=None)  # as compile_model
    ex = tvm_lite.build(mod, ANDROID)
    objects = []

    def walk(module):
        if module.kind == "llvm":
            path = tmp_path / f"lib{len(objects)}.o"
            module.write_to_file(str(path))
            objects.append(path.read_bytes())
        for sub in module.imports:
            walk(sub)

    walk(ex.mod)
    assert objects, "no LLVM module in the executable"
    for obj in objects:
        assert obj[:4] == b"\x7fELF" and int.from_bytes(obj[18:20], "little") == 183


def test_e0m4_dequant_in_fp32_matches_the_fp16_kernel():
    """The rule computes ``(h - c) * s`` in fp32 and rounds once (schedules/cpu_dequant.py):
    the same weights as the kernel's fp16 arithmetic, unscheduled (sums may differ in order)."""
    from tvm_lite.schedules.cpu_dequant import DEQUANT_BLOCK

    k, n = 128, 64
    qw = rtn(np.random.default_rng(3).standard_normal((k, n)).astype("float32"), "e0m4", 32)
    func = kernels.matmul_func("e0m4", [1, 1], k, n, 32)
    x = np.random.default_rng(4).standard_normal((1, 1, k)).astype("float32")
    plain = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    scheduled = _schedule(func)
    assert DEQUANT_BLOCK in scheduled["main"].script()
    outs = [_run(m, x, *qw.arrays().values(), out_shape=(1, 1, n)) for m in (plain, scheduled)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=2e-6, atol=1e-6)  # summation order only


# -- panel-major weights (relax_passes/pack_weight_panels.py) -------------------------------------
PANEL = weight_panel(HOST)


def _asm(mod, target=HOST) -> str:
    with target:
        return tvm.compile(mod, target=target).mod.inspect_source("asm")


@pytest.mark.parametrize("rows", [1, 5, 13])  # decode GEMV; prefill GEMM, M not a multiple of 6
def test_panel_matmul_matches_numpy_and_reads_the_panel_in_place(rows):
    k, n = 96, 5 * PANEL
    lead = [1, 1] if rows == 1 else [1, tirx.Var("seq", "int64")]
    mod = _schedule(kernels.panel_matmul_func(lead, k, n, PANEL))
    script = mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script
    assert "w_global" not in script  # no copy of the weight at run time: it is packed already
    asm = _asm(mod)
    assert "TVMBackendAllocWorkspace" not in asm or rows > 1  # the GEMV's tiles: registers
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    np.testing.assert_array_equal(unpack_panels(pack_panels(w, PANEL)), w)
    out = _run(mod, x, pack_panels(w, PANEL), out_shape=(1, rows, n))
    np.testing.assert_allclose(out, x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7])
def test_e0m4_over_panel_major_codes_matches_numpy(rows):
    """Decode takes the scales out of each group (no fp16 rounding of the weights: within
    ~2^-11 of a weight of the fp16 reference); prefill dequantizes its panel as before."""
    from tvm_lite.quant.kernels import GROUP_BLOCK, scales_per_group

    k, n = 256, 3 * PANEL
    qw = rtn(np.random.default_rng(5).standard_normal((k, n)).astype("float32"), "e0m4", 32)
    lead = [1, 1] if rows == 1 else [1, tirx.Var("seq", "int64")]
    assert scales_per_group(lead, k, 32, "float32", PANEL) == (rows == 1)
    mod = _schedule(kernels.matmul_func("e0m4", lead, k, n, 32, panel=PANEL))
    script = mod["main"].script()
    assert "T.parallel" in script and (GROUP_BLOCK in script) == (rows == 1)
    if rows == 1:
        assert "TVMBackendAllocWorkspace" not in _asm(mod)
    x = np.random.default_rng(6).standard_normal((1, rows, k)).astype("float32")
    packed = [pack_panels(a, PANEL) for a in qw.arrays().values()]
    out = _run(mod, x, *packed, out_shape=(1, rows, n))
    ref = x @ qw.effective_weight()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def _weights_module():
    """``main(x, a, b, c) = (x @ a + x @ b) @ c, b + 1``: ``a`` and ``c`` are matmul weights
    only; ``b`` is also read elsewhere, so it keeps its layout."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, tirx.Var("seq", "int64"), 64], "float32"))
    ws = [relax.Var(name, relax.TensorType(shape, "float32"))
          for name, shape in (("a", (64, 2 * PANEL)), ("b", (64, 2 * PANEL)), ("c", (2 * PANEL, PANEL)))]
    with bb.function("main", [x, *ws]):
        with bb.dataflow():
            h = bb.emit(relax.op.add(relax.op.matmul(x, ws[0]), relax.op.matmul(x, ws[1])))
            y = bb.emit(relax.op.matmul(h, ws[2]))
            out = bb.emit_output(relax.Tuple([y, relax.op.add(ws[1], relax.const(1.0))]))
        bb.emit_func_output(out)
    rng = np.random.default_rng(7)
    values = [rng.standard_normal([int(d) for d in w.ty.shape.values]).astype("float32") for w in ws]
    func = bb.get()["main"].with_attrs({"num_input": 1, "tvm_lite.param_names": ["a", "b", "c"],
                                        "params": [tvm.runtime.tensor(v) for v in values]})
    return tvm.IRModule({"main": func}), values


def test_pack_weight_panels_packs_matmul_weights_and_keeps_the_results():
    from tvm import relax

    mod, values = _weights_module()
    packer = PackWeightPanels(PANEL)
    packed = packer(mod)
    assert packer.stats == {"matmul": 2, "packed_weights": 2}  # a and c; b is read elsewhere
    func = packed["main"]
    shapes = [[int(d) for d in p.ty.shape.values] for p in func.params[1:]]
    assert shapes == [[2, 64, PANEL], [64, 2 * PANEL], [1, 2 * PANEL, PANEL]]
    stored = [v.numpy() for v in func.attrs["params"]]
    np.testing.assert_array_equal(stored[0], pack_panels(values[0], PANEL))
    np.testing.assert_array_equal(stored[1], values[1])
    x = np.random.default_rng(8).standard_normal((1, 3, 64)).astype("float32")
    with HOST:
        packed.update_func(packed.get_global_var("main"), func.without_attr("params"))
        lowered = dl.ApplyDefaultSchedule(*schedules.rules_for(HOST))(
            relax.get_pipeline("zero")(packed))
        ex = tvm.compile(lowered, target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    y, b1 = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(v) for v in stored])
    ref = (x @ values[0] + x @ values[1]) @ values[2]
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(b1.numpy(), values[1] + 1)
