"""tvm_lite's GPU schedule rules (schedules/gpu_*.py, keyed by profile).

* every rule's kernels compile for ``opencl -device=adreno``, ``opencl -device=mali`` and
  ``cuda -arch=sm_90``; the OpenCL C passes clang's OpenCL front end (fp16 on), the CUDA C++
  passes nvcc for sm_90 (each where the compiler is installed);
* the rules take what they should (decode GEMV at M == 1, GEMM at dynamic M) and leave the rest;
* the reference (unscheduled) kernels agree with numpy on the CPU;
* on a CUDA device (skipped without one), the Adreno-, Mali- and CUDA-profile kernels compiled
  for CUDA match numpy -- so the Adreno/Mali indexing runs on real hardware.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import s_tir, tirx

from tvm_lite import parse_target
from tvm_lite.bench.kernels import build, kernel_func, kernel_plan, reference, weights
from tvm_lite.schedules import gpu_rules, profile_of, rules_for, stock_gpu_rules
from tvm_lite.schedules.gpu_gemm import GPUPrefillGEMM, simt_only
from tvm_lite.schedules.gpu_gemv import GPUDecodeGEMV, MatchError, match_matmul
from tvm_lite.schedules.guards import StaticBuffersOnly
from tvm_lite.schedules.profiles import ADRENO, CUDA, MALI, PROFILES, fit_to_target, gpu_profile
from conftest import clang_opencl, cuda_device

TARGETS = {"adreno": "opencl -device=adreno", "mali": "opencl -device=mali", "cuda": "cuda -arch=sm_90"}
# (K, N): a SmolLM2 k/v projection (N = 192: not a power of two), its down projection, a 2B k/v
SHAPES = [(576, 192), (1536, 576), (2048, 256)]
DYN = tirx.Var("n", "int64")


def _source(ex, kind):
    from tvm_lite.compiler import device_source

    return device_source(ex, kind)


def _kernel_names(src):
    """Kernel names in OpenCL or CUDA C."""
    return set(re.findall(r"(?:__kernel void|__global__ void(?: __launch_bounds__\(\d+\))?) (\w+)\(",
                          src))


def _schedule(rule, func, target):
    with target:
        return rule.apply(func, target, False)


# -- profiles and rule lists ---------------------------------------------------------------------
def test_targets_map_to_profiles_and_rules_in_order():
    for name, text in TARGETS.items():
        target = parse_target(text)
        assert profile_of(target) == name
        names = [type(r).__name__ for r in rules_for(target)]
        # tvm_lite's own kernels first (fused attention, fused norms, the K/V append in paired
        # halves), then the matmul rules
        assert names[:3] == ["Attention", "FusedRMSNorm", "GPUKVAppendHalves"]
        rules = rules_for(target)[3:]
        assert isinstance(rules[0], GPUDecodeGEMV) and rules[0].profile is PROFILES[name]
        assert isinstance(rules[1], GPUPrefillGEMM) and rules[1].profile is PROFILES[name]
        assert any(isinstance(r, StaticBuffersOnly) for r in rules)  # the guard is kept
        assert type(rules[-1]).__name__ == "Fallback"
    assert profile_of(parse_target("llvm")) == "cpu"
    assert [type(r).__name__ for r in stock_gpu_rules()][0] == "Matmul"
    with pytest.raises(ValueError, match="unknown GPU profile 'vulkan'"):
        gpu_profile("vulkan")


def test_profiles_carry_the_hardware_parameters():
    assert ADRENO.warp_size == 64 and MALI.warp_size == 16 and CUDA.warp_size == 32
    assert ADRENO.weights_as_images and not CUDA.weights_as_images  # recorded, buffers used
    assert CUDA.gemm_tensor_cores and not ADRENO.gemm_tensor_cores
    for p in PROFILES.values():
        tm, tn, tk = p.gemm_tile
        assert p.gemm_threads_m * p.gemm_threads_n <= p.max_threads
        assert (tm * tk + tk * tn) * 2 <= p.local_memory_bytes  # both fp16 tiles fit
        assert p.gemv_threads_n * p.gemv_threads_k <= p.max_threads
    # a profile used for another target obeys that target's limits
    small = fit_to_target(CUDA, parse_target("opencl -device=adreno"))
    assert small.max_threads == 256 and small.local_memory_bytes == 16384


def test_gemv_plan_splits_k_until_the_device_is_busy():
    rule = GPUDecodeGEMV(CUDA)
    down = rule.plan(2048, 16384, 2)  # the 2B down projection: 2048 columns only
    assert down["vec"] * down["tn"] * down["tk"] <= CUDA.max_threads * 8
    tiles = 2048 // (down["vec"] * down["tn"])
    assert down["ks"] > 1 and tiles * down["ks"] >= 64
    lm_head = rule.plan(256000, 2048, 2)  # plenty of column tiles already: no split
    assert lm_head["ks"] == 1
    odd = rule.plan(192, 576, 2)  # 18 groups of 32: 6 or 9 threads along K, not a power of 2
    assert 192 % (odd["vec"] * odd["tn"]) == 0
    assert odd["tk"] * odd["ks"] * odd["kg"] * odd["wpg"] * 4 == 576
    # a 2B k/v projection (0.26 MB): one full-width column tile; narrower tiles give 8
    # workgroups, whose predicted time beats a split plus a second kernel (profile's cost figures)
    kv = rule.plan(256, 2048, 2)
    assert kv["ks"] == 1 and 256 // (kv["vec"] * kv["tn"]) >= 8
    assert kv["tn"] * kv["tk"] <= CUDA.gemv_threads_n * CUDA.gemv_threads_k


def test_gemv_plan_is_one_kernel_where_a_second_does_not_pay():
    for profile in (CUDA, ADRENO):
        rule = GPUDecodeGEMV(profile)
        # SmolLM2's merged q/k/v and its o projection, fp32 (Adreno's CI build) and 4-bit
        for n, k, word, nbytes in ((960, 576, 4, 960 * 576 * 4), (576, 576, 4, 576 * 576 * 4),
                                   (960, 576, 2, 960 * 144 * 2)):
            plan = rule.plan(n, k, word, bytes_read=nbytes)
            assert plan["ks"] == 1, (profile.name, n, k, plan)
            assert plan["tn"] * plan["tk"] <= profile.max_threads


# -- which functions the rules take --------------------------------------------------------------
def test_rules_take_decode_gemv_and_prefill_gemm_only():
    target = parse_target("cuda -arch=sm_90")
    gemv, gemm = GPUDecodeGEMV(CUDA), simt_only(CUDA)
    decode = kernel_func("e0m4", [1, 1], 576, 192)
    prefill = kernel_func("e0m4", [1, DYN], 576, 192)
    assert _schedule(gemv, decode, target) is not None
    assert _schedule(gemv, prefill, target) is None  # M is not 1
    assert _schedule(gemm, prefill, target) is not None
    assert _schedule(gemm, decode, target) is None  # M == 1 belongs to the GEMV
    with pytest.raises(MatchError, match="not statically 1"):
        match_matmul(s_tir.Schedule(prefill), decode=True)
    # a W[N, K] (transposed) weight is not this rule's layout: the stock GEMV takes it
    from tvm import te

    x = te.placeholder((1, 1, 64), "float16", name="x")
    w = te.placeholder((32, 64), "float16", name="w")
    r = te.reduce_axis((0, 64), name="k")
    y = te.compute((1, 1, 32), lambda a, b, j: te.sum(x[a, b, r] * w[j, r], axis=r), name="y")
    assert _schedule(gemv, te.create_prim_func([x, w, y]), target) is None
    # not a GPU target: nothing
    assert _schedule(gemv, decode, parse_target("llvm")) is None


def test_a_rule_that_fails_inside_raises_instead_of_passing_the_kernel_on(monkeypatch):
    """A rule returns None only where its explicit checks say it does not apply (MatchError);
    anything else it hits propagates: a broken rule must not look like one that does not apply
    (the kernel would silently get a slower schedule)."""
    from tvm_lite.schedules.cpu_dequant import CPUDequantMatmul

    target = parse_target("cuda -arch=sm_90")
    decode = kernel_func("fp16", [1, 1], 576, 192)
    prefill = kernel_func("fp16", [1, DYN], 576, 192)

    def broken(*_args):
        raise RuntimeError("a bug in the schedule")

    def no_fit(*_args):
        raise MatchError("W tile does not divide over the workgroup")

    monkeypatch.setattr(GPUDecodeGEMV, "_schedule", broken)
    monkeypatch.setattr(GPUPrefillGEMM, "_schedule", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        _schedule(GPUDecodeGEMV(CUDA), decode, target)
    with pytest.raises(RuntimeError, match="a bug"):
        _schedule(simt_only(CUDA), prefill, target)
    monkeypatch.setattr(GPUDecodeGEMV, "_schedule", no_fit)
    assert _schedule(GPUDecodeGEMV(CUDA), decode, target) is None
    llvm = parse_target("llvm")  # the CPU rule: a matmul without a dequantize block is not its
    assert _schedule(CPUDequantMatmul(), decode, llvm) is None
    assert _schedule(CPUDequantMatmul(), kernel_func("e0m4", [1, 1], 576, 192), llvm) is not None


# -- compile for every target; OpenCL through clang, CUDA through nvcc ------------------------------
def _kernels():
    for fmt in ("e0m4", "int4", "fp16"):
        for k, n in SHAPES:
            yield "gemv", fmt, [1, 1], k, n
    for fmt in ("e0m4", "fp16"):
        yield "gemm", fmt, [1, DYN], 576, 192
    yield "gemm", "int4", [1, DYN], 2048, 256


@pytest.mark.parametrize("profile", list(TARGETS))
def test_every_rule_compiles_and_passes_the_vendor_compiler(profile, tmp_path):
    target = parse_target(TARGETS[profile])
    kind = "cuda" if profile == "cuda" else "opencl"
    prof = PROFILES[profile]
    sources = []
    for phase, fmt, lead, k, n in _kernels():
        func = kernel_func(fmt, lead, k, n)
        rule = GPUDecodeGEMV(prof) if phase == "gemv" else simt_only(prof)
        assert _schedule(rule, func, target) is not None, (phase, fmt, k, n)
        src = _source(build(func, target, [rule, *gpu_rules(prof)]), kind)
        if fmt == "e0m4":  # the dequant stays two bitwise ops under the exponent, no conversion
            exponent = "0x64006400u" if phase == "gemv" and prof.gemv_half2_rows else "25600"
            assert exponent in src and "convert_half" not in src and "__ushort2half" not in src
        sources.append((f"{phase}_{fmt}_{k}x{n}", src))
    if kind == "opencl":
        if not shutil.which("clang-15"):
            pytest.skip("clang-15 not installed")
        for name, src in sources:
            path = tmp_path / f"{name}.cl"
            path.write_text(src)
            res = clang_opencl(path)
            assert res.returncode == 0, (name, res.stderr[-2000:])
    else:
        if not shutil.which("nvcc"):
            pytest.skip("nvcc not installed")
        for name, src in sources[::3]:  # a third of them: nvcc takes seconds each
            path = tmp_path / f"{name}.cu"
            path.write_text(src)
            res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / f"{name}.cubin"),
                                  str(path)], capture_output=True, text=True)
            assert res.returncode == 0, (name, res.stderr[-2000:])


def test_dequant_gemm_loads_the_weight_tile_dequantized():
    """The prefill GEMM dequantizes while filling local memory: the OpenCL kernel reads the packed
    codes with vector loads, writes fp16 to ``__local`` memory, and never stores an fp16 weight
    matrix in global memory."""
    target = parse_target(TARGETS["adreno"])
    func = kernel_func("e0m4", [1, DYN], 576, 192)
    src = _source(build(func, target, [simt_only(ADRENO)]), "opencl")
    assert "__local half dequantize_shared" in src
    assert "vload" in src and "codes_ptr" in src
    assert len(_kernel_names(src)) == 1


def test_split_k_gemv_is_two_kernels_and_fuses_nothing_wrong():
    target = parse_target(TARGETS["mali"])
    func = kernel_func("e0m4", [1, 1], 16384, 64)  # N is small: 4 workgroups in one pass
    plan = GPUDecodeGEMV(MALI).plan(64, 16384, 2, target)
    src = _source(build(func, target, [GPUDecodeGEMV(MALI)]), "opencl")
    assert plan["ks"] > 1 and len(_kernel_names(src)) == 2  # partial sums + their sum
    assert "__local" in src  # Mali: the cross-thread sum goes through local memory


# -- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e0m4", "int4", "fp16"])
def test_reference_kernels_match_numpy_on_cpu(fmt):
    """The unscheduled kernels the GPU rules start from, run on the CPU, against numpy."""
    rng = np.random.default_rng(1)
    k, n, seq = 128, 96, 3
    func = kernel_func(fmt, [1, seq], k, n)
    ex = tvm.compile(tvm.IRModule({"main": func}), target=parse_target("llvm"))
    arrays = weights(fmt, k, n, rng)
    x = (rng.standard_normal((1, seq, k)) * 0.5).astype(np.float16)
    out = tvm.runtime.empty((1, seq, n), "float16", tvm.cpu())
    ex.mod["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in arrays.values()], out)
    ref = reference(fmt, x, arrays, k, n)
    got = out.numpy().reshape(seq, n).astype(np.float32)
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()



@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda"])
def test_profile_kernels_run_correctly_on_a_cuda_gpu(profile):
    """Each profile's GEMV and GEMM schedules, compiled for CUDA, against numpy: the indexing the
    Adreno and Mali kernels use is exercised on real hardware (the cuda profile's 4-bit GEMVs are
    the packed-half2 kernel)."""
    dev = cuda_device()
    target = parse_target("cuda -arch=sm_90")
    prof = PROFILES[profile]
    rng = np.random.default_rng(2)
    cases = [("gemv", fmt, k, n, [1]) for fmt in ("e0m4", "int4", "fp16") for k, n in SHAPES]
    cases += [("gemv", "e0m4", 16384, 2048, [1])]  # K split over workgroups: two kernels
    cases += [("gemv", "e0m4", 2048, 16384, [1])]  # a 2B gate/up projection
    cases += [("gemm", fmt, 576, 192, [1, 37, 128]) for fmt in ("e0m4", "int4", "fp16")]
    cases += [("gemm", "e0m4", 2048, 256, [200])]
    for phase, fmt, k, n, seqs in cases:
        lead = [1, 1] if phase == "gemv" else [1, DYN]
        func = kernel_func(fmt, lead, k, n)
        rule = GPUDecodeGEMV(prof) if phase == "gemv" else simt_only(prof)
        assert _schedule(rule, func, target) is not None, (profile, phase, fmt)
        ex = build(func, target, [rule])
        arrays = weights(fmt, k, n, rng)
        dev_arrays = [tvm.runtime.tensor(a, dev) for a in arrays.values()]
        for seq in seqs:
            x = (rng.standard_normal((1, seq, k)) * 0.5).astype(np.float16)
            out = tvm.runtime.empty((1, seq, n), "float16", dev)
            ex.mod["main"](tvm.runtime.tensor(x, dev), *dev_arrays, out)
            ref = reference(fmt, x, arrays, k, n)
            got = out.numpy().reshape(seq, n).astype(np.float32)
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err < 2e-2, (profile, phase, fmt, k, n, seq, err)


# -- the fused norms (schedules/fused_norm.py) ---------------------------------------------------
@pytest.mark.parametrize("add", [True, False])
def test_fused_norms_load_vectors_on_cuda_and_columns_elsewhere(add, monkeypatch, tmp_path):
    """With ``VECTOR_LOADS`` CUDA's profile gives a norm's thread one 16-byte vector of each
    input (2048 fp16 columns: 256 threads, no loop over the row); Adreno's profile keeps the
    columns layout (256 threads, 2-byte loads), so does a width with no whole vectors, and so
    does every profile with it off."""
    from tvm_lite.bench.norm import build_norm, norm_kernel
    from tvm_lite.compiler import device_source
    from tvm_lite.schedules import fused_norm

    monkeypatch.setattr(fused_norm, "VECTOR_LOADS", True)

    def kernel(d, dtype, profile):
        src = device_source(build_norm(norm_kernel(d, dtype, add), profile), "cuda")
        return re.search(r"__launch_bounds__\((\d+)\)", src).group(1), src

    threads, src = kernel(2048, "float16", CUDA)
    assert threads == "256" and "*(uint4*)(x_ptr" in src and "k_0 <" not in src
    assert ("*(uint4*)(r_ptr" in src) == add
    out = "out" if add else "rms_norm"  # (the TE kernel's output is named for it)
    assert f"*(uint4*)({out}_ptr" in src and ("*(uint4*)(total_ptr" in src) == add  # stores
    if shutil.which("nvcc"):  # (the rows' fp32 math vectorized made CUDA nvcc rejects)
        for d in (2048, 2304):
            cu = tmp_path / f"norm{d}.cu"
            cu.write_text(kernel(d, "float16", CUDA)[1])
            res = subprocess.run(["nvcc", "-arch=sm_90", "-c", "-o", str(cu.with_suffix(".o")),
                                  str(cu)], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-2000:]
    assert kernel(576, "float16", CUDA)[0] == "72"  # SmolLM2's row: 72 vectors of 8
    assert "*(float4*)(x_ptr" in kernel(2048, "float32", CUDA)[1]  # fp32: 4 a vector
    for profile, d in ((ADRENO, 2048), (CUDA, 2050)):
        threads, src = kernel(d, "float16", profile)
        assert threads == "256" and "*(uint4*)(x_ptr" not in src, profile.name
    monkeypatch.setattr(fused_norm, "VECTOR_LOADS", False)
    threads, src = kernel(2048, "float16", CUDA)
    assert threads == "256" and "*(uint4*)(x_ptr" not in src and "k_0 <" in src


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("vector", [True, False])
def test_fused_norms_run_correctly_on_a_cuda_gpu(vector, monkeypatch):
    """``add_rms_norm`` and ``rms_norm`` as the CUDA profile schedules them (vectors, or the
    columns layout with ``VECTOR_LOADS = False``), against numpy: fp16 rows of SmolLM2's,
    Llama's and Gemma-2's widths (576, 2048, 2304, Gemma's ``1 + w``) and a QK norm's 128, fp32
    at 576; 1, 37 and 256 rows."""
    from tvm_lite.bench.norm import build_norm, norm_kernel
    from tvm_lite.schedules import fused_norm

    monkeypatch.setattr(fused_norm, "VECTOR_LOADS", vector)
    dev, rng = cuda_device(), np.random.default_rng(7)
    cases = [(576, "float16", False), (2048, "float16", False), (2304, "float16", True),
             (128, "float16", False), (576, "float32", False)]
    for d, dtype, gemma in cases:
        for add in (True, False):
            ex = build_norm(norm_kernel(d, dtype, add, gemma), CUDA)
            w = (rng.standard_normal(d) * 0.5).astype(dtype)
            for rows in (1, 37, 256):
                x = rng.standard_normal((1, rows, d)).astype(dtype)
                r = rng.standard_normal((1, rows, d)).astype(dtype)
                s = (x + r) if add else x  # (the kernel adds in the rows' dtype)
                f = s.astype(np.float32)
                inv = 1 / np.sqrt((f * f).mean(-1, keepdims=True) + 1e-5)
                ref = (f * inv) * (w.astype(np.float32) + (1 if gemma else 0))
                out = tvm.runtime.empty((1, rows, d), dtype, dev)
                args = [tvm.runtime.tensor(a, dev) for a in ((x, r, w) if add else (x, w))]
                if add:
                    total = tvm.runtime.empty((1, rows, d), dtype, dev)
                    ex.mod["main"](*args, out, total)
                    np.testing.assert_array_equal(total.numpy(), s)
                else:
                    ex.mod["main"](*args, out)
                err = np.abs(out.numpy().astype(np.float32) - ref).max() / np.abs(ref).max()
                assert err < 2e-3, (d, dtype, add, rows, err)


def _silu_gated(lead, k, n, dtype="float32"):
    """``silu(x @ W) * g``: the fused decoder MLP shape (an epilogue chain of two blocks reading
    the matmul output twice), in fp32 as the importer emits it."""
    from tvm import te

    i64 = lambda d: tirx.IntImm("int64", d) if isinstance(d, int) else d  # noqa: E731
    x = te.placeholder((*map(i64, lead), i64(k)), dtype, name="x")
    w = te.placeholder((i64(k), i64(n)), dtype, name="w")
    g = te.placeholder((*map(i64, lead), i64(n)), dtype, name="g")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((*map(i64, lead), i64(n)),
                   lambda a, b, j: te.sum(x[a, b, r] * w[r, j], axis=r), name="matmul")
    s = te.compute(y.shape, lambda *i: te.sigmoid(y(*i)), name="sigmoid")
    out = te.compute(y.shape, lambda *i: y(*i) * s(*i) * g(*i), name="multiply")
    return te.create_prim_func([x, w, g, out]).with_attr("global_symbol", "main")


@pytest.mark.parametrize("profile", ["adreno", "cuda"])
def test_epilogue_chains_and_fp32_weights_compile(profile, tmp_path):
    """A two-block epilogue (SiLU's sigmoid, then the gate multiply) stays in the matmul's kernel,
    for decode and prefill; fp32 weights get loads of at most 16 bytes (float4)."""
    target = parse_target(TARGETS[profile])
    kind = "cuda" if profile == "cuda" else "opencl"
    prof = PROFILES[profile]
    for lead, rule in (([1, 1], GPUDecodeGEMV(prof)), ([1, DYN], simt_only(prof))):
        func = _silu_gated(lead, 576, 1536)
        assert _schedule(rule, func, target) is not None, lead
        src = _source(build(func, target, [rule]), kind)
        assert "float8" not in src  # no 32-byte vectors
        names = re.findall(r"(?:__kernel void|__global__ void __launch_bounds__\(\d+\)) (\w+)\(", src)
        assert len(set(names)) <= 2  # matmul (+ split-K sum) with the epilogue inside
        if kind == "opencl" and shutil.which("clang-15"):
            path = tmp_path / f"silu_{len(lead)}_{lead[-1]}.cl"
            path.write_text(src)
            res = clang_opencl(path)
            assert res.returncode == 0, res.stderr[-2000:]


# -- the packed-half2 4-bit decode GEMV (schedules/gpu_gemv_half2.py, the cuda profile) --------
def _dequant_gemv(fmt, k, n, epilogue=None, group=32, lead=(1, 1)):
    """A decode dequant matmul in fp16 as FuseOps leaves it: ``dequantize`` + ``matmul`` blocks,
    optionally followed by a residual add (``"residual"``) or the SiLU gate
    (``"silu_gate"``: ``y * sigmoid(y) * g``, two epilogue blocks). ``lead``: x's leading dims
    (``(1, DYN)``: the prefill GEMM)."""
    from tvm import te

    from tvm_lite.quant import kernels

    codes, scale, zero = kernels._packed_placeholders(fmt, k, n, group)
    i64 = lambda d: tirx.IntImm("int64", d) if isinstance(d, int) else d  # noqa: E731
    lead = tuple(i64(d) for d in lead)
    x = te.placeholder((*lead, i64(k)), "float16", name="x")
    w = te.compute((i64(k), i64(n)), lambda i, j: kernels.dequant_expr(fmt, codes, scale, zero, i, j, group),
                   name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((*lead, i64(n)), lambda a, b, j: te.sum(x[a, b, r] * w[r, j], axis=r),
                   name="matmul")
    args = [x, codes, scale, zero]
    if epilogue is None:
        out = y
    else:
        e = te.placeholder((*lead, i64(n)), "float16", name="e")
        args.append(e)
        if epilogue == "residual":
            out = te.compute(y.shape, lambda *i: y(*i) + e(*i), name="T_add")
        else:
            s = te.compute(y.shape, lambda *i: te.sigmoid(y(*i)), name="sigmoid")
            out = te.compute(y.shape, lambda *i: y(*i) * s(*i) * e(*i), name="multiply")
    func = te.create_prim_func([a for a in args if a is not None] + [out])
    return func.with_attr("global_symbol", "main")


def _gemm_reference(fmt, x, arrays, k, n, epilogue, extra, group=32):
    """numpy's result of a prefill GEMM test: fp16 weights (SiLU-gated when ``epilogue``) or the
    4-bit formats through ``_half2_reference``."""
    if fmt != "fp16":
        return _half2_reference(fmt, x, arrays, k, n, epilogue, extra, group)
    y = (x.reshape(-1, k).astype(np.float32) @ arrays["w"].astype(np.float32))
    y = y.astype(np.float16).astype(np.float32)
    return y / (1 + np.exp(-y)) * extra.reshape(-1, n) if epilogue else y


def _half2_reference(fmt, x, arrays, k, n, epilogue, extra, group=32):
    from tvm_lite.quant.format import dequantize

    wt = dequantize(fmt, arrays["codes"], arrays["scale"], arrays.get("zero"), k, group)
    y = (x.astype(np.float32).reshape(-1, k) @ wt.astype(np.float32)).astype(np.float16).astype(np.float32)
    if epilogue == "residual":
        return y + extra.reshape(-1, n).astype(np.float32)
    if epilogue == "silu_gate":
        return y / (1 + np.exp(-y)) * extra.reshape(-1, n).astype(np.float32)
    return y


def _half2_arrays(fmt, k, n, rng, group=32):
    ng = k // group
    arrays = {"codes": rng.integers(0, 1 << 16, size=(k // 4, n), dtype=np.uint16),
              "scale": (rng.random((ng, n), dtype=np.float32) * 0.02 + 0.01).astype(np.float16)}
    if fmt == "e0m4":
        arrays["zero"] = (1024 + rng.integers(0, 16, size=(ng, n))).astype(np.float16)
    return arrays


# (fmt, K, N, group, epilogue, plan override): split-K (ks > 1) and one-kernel (ks = 1, several
# groups a thread), threadIdx.y not dividing the tile (the guarded final sum), groups of 128 rows
# (4 fp16 partials of 32 rows each), both epilogue kinds
HALF2_CPU_CASES = [
    ("e0m4", 576, 192, 32, None, None),
    ("int4", 576, 192, 32, None, None),
    ("e0m4", 2048, 256, 32, None, None),
    ("e0m4", 2048, 256, 32, None, {"ks": 1, "kg": 8, "tn": 32, "tk": 8}),
    ("int4", 1024, 512, 128, None, None),
    ("e0m4", 1024, 512, 128, "residual", {"ks": 1, "kg": 1, "tn": 32, "tk": 8}),
    ("e0m4", 576, 1536, 32, "silu_gate", None),
    ("e0m4", 576, 1536, 32, "residual", {"ks": 1, "kg": 3, "tn": 32, "tk": 6}),
    # split K 4 ways, 2 column tiles: the last workgroup of each tile sums and adds the residual
    ("e0m4", 2048, 512, 32, "residual", {"ks": 4, "kg": 2, "tn": 32, "tk": 8}),
]


def _half2_schedule(func, target, n, k, group, override=None, emulate=False):
    from tvm_lite.schedules.gpu_gemv_half2 import half2_kernel

    plan = GPUDecodeGEMV(CUDA).plan(n, k, 2, parse_target("cuda -arch=sm_90"), group)
    plan.update(override or {})
    sch, _ = half2_kernel(func, target, CUDA, plan, emulate=emulate)
    return sch


@pytest.mark.parametrize("fmt,k,n,group,epilogue,override", HALF2_CPU_CASES)
def test_half2_gemv_emulated_on_the_cpu_matches_numpy(fmt, k, n, group, epilogue, override):
    """The packed kernel's own loop nest and arithmetic, run on the CPU (helpers as plain TIR,
    thread loops serial): its indexing, split-K, group partials and epilogues against numpy."""
    rng = np.random.default_rng(3)
    func = _dequant_gemv(fmt, k, n, epilogue, group)
    sch = _half2_schedule(func, parse_target("llvm"), n, k, group, override, emulate=True)
    ex = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                     target=parse_target("llvm"))
    arrays = _half2_arrays(fmt, k, n, rng, group)
    x = (rng.standard_normal((1, 1, k)) * 0.5).astype(np.float16)
    extra = (rng.standard_normal((1, 1, n))).astype(np.float16)
    out = tvm.runtime.empty((1, 1, n), "float16", tvm.cpu())
    args = [x, *arrays.values()] + ([extra] if epilogue else [])
    ex.mod["main"](*[tvm.runtime.tensor(a) for a in args], out)
    ref = _half2_reference(fmt, x, arrays, k, n, epilogue, extra, group)
    err = np.abs(out.numpy().reshape(1, n).astype(np.float32) - ref).max() / np.abs(ref).max()
    assert err < 5e-3, err


def test_half2_gemv_is_chosen_on_cuda_only_for_fp16_dequant_matmuls():
    from tvm_lite.schedules.gpu_gemv_half2 import HELPERS

    cuda = parse_target("cuda -arch=sm_90")
    rule = GPUDecodeGEMV(CUDA)
    for func in (kernel_func("e0m4", [1, 1], 2048, 256), kernel_func("int4", [1, 1], 2048, 256),
                 _dequant_gemv("e0m4", 576, 1536, "silu_gate")):
        src = _source(build(func, cuda, [rule]), "cuda")
        assert "tvm_lite_dq_hfma2" in src and src.count("tvm_lite_dq_hfma2(unsigned") == 1
    # fp16 weights, fp32 activations and OpenCL keep the generic schedule
    from tvm_lite.quant import kernels

    for func in (kernel_func("fp16", [1, 1], 2048, 256),
                 kernels.matmul_func("e0m4", [1, 1], 2048, 256, 32, "float32").with_attr("global_symbol", "main")):
        assert "tvm_lite_dq_hfma2" not in _source(build(func, cuda, [rule]), "cuda")
    assert not ADRENO.gemv_half2_rows and not MALI.gemv_half2_rows and CUDA.gemv_half2_rows
    assert all("lop3" in h or "__" in h for h in HELPERS.values())


def test_half2_gemv_splits_k_in_one_kernel():
    """A 2B down projection (K = 16384, N = 2048) splits K over workgroups and still launches one
    kernel: the last workgroup of each column tile sums the partials (a ticket per tile)."""
    from tvm_lite.schedules.gpu_gemv_half2 import SPLIT_TICKETS

    cuda = parse_target("cuda -arch=sm_90")
    plan = GPUDecodeGEMV(CUDA).plan(2048, 16384, 2, cuda)
    src = _source(build(_dequant_gemv("e0m4", 16384, 2048, "residual"), cuda, [GPUDecodeGEMV(CUDA)]),
                  "cuda")
    assert plan["ks"] > 1 and len(_kernel_names(src)) == 1
    assert src.count("tvm_lite_split_last(") == 2  # its definition and the one call
    assert "tvm_lite_ldcg_f32(" in src and 2048 // (plan["vec"] * plan["tn"]) <= SPLIT_TICKETS


def test_forced_gemv_plan_is_taken_or_refused():
    """``GPUDecodeGEMV(forced=(tn, ks))`` (``bench.gemv_plans``' sweep): the plan is the forced
    one -- here K split 8 ways in one kernel on a layer the rule does not split -- and a plan that
    does not divide the layer is refused (the rule then leaves the GEMV to the next rule)."""
    cuda = parse_target("cuda -arch=sm_90")
    assert GPUDecodeGEMV(CUDA).plan(2048, 2048, 2, cuda)["ks"] == 1
    rule = GPUDecodeGEMV(CUDA, forced=(4, 8))
    plan = rule.plan(2048, 2048, 2, cuda)
    assert (plan["tn"], plan["ks"], plan["tk"] * plan["kg"] * plan["ks"]) == (4, 8, 64)
    src = _source(build(kernel_func("e0m4", [1, 1], 2048, 2048), cuda, [rule]), "cuda")
    assert len(_kernel_names(src)) == 1 and "tvm_lite_split_last(" in src
    with pytest.raises(MatchError, match="forced"):
        GPUDecodeGEMV(CUDA, forced=(4, 3)).plan(2048, 2048, 2, cuda)
    with cuda:
        assert GPUDecodeGEMV(CUDA, forced=(4, 3)).apply(kernel_func("e0m4", [1, 1], 2048, 2048),
                                                        cuda, False) is None


def test_prologue_split_plan_takes_only_wide_gemvs_with_a_prologue(monkeypatch):
    """``gpu_gemv.PROLOGUE_KS`` (8; 1 turns it off), on CUDA: a GEMV that computes its input
    row and already has enough one-pass tiles -- Gemma-2B's gate/up with its norm, N = 32768 --
    takes 16 threads along N and K in 8 splits; the same GEMV without a prologue, q/k/v (too few
    tiles), Llama-1B's gate/up (512 tiles, under the 528 the rule wants) and the phones'
    profiles (untimed) keep the rule's plan."""
    from tvm_lite.schedules import gpu_gemv
    from tvm_lite.schedules.profiles import ADRENO, MALI

    cuda = parse_target("cuda -arch=sm_90")
    rule = GPUDecodeGEMV(CUDA)

    def shape(n, prologue):
        plan = rule.plan(n, 2048, 2, cuda, prologue=prologue)
        return plan["tn"], plan["tk"], plan["ks"]

    monkeypatch.setattr(gpu_gemv, "PROLOGUE_KS", 1)  # off
    assert shape(32768, True) == shape(32768, False) == (4, 64, 1)
    monkeypatch.setattr(gpu_gemv, "PROLOGUE_KS", 8)
    assert shape(32768, True) == (16, 8, 8)
    assert shape(32768, False) == (4, 64, 1)
    assert shape(2560, True) == shape(2560, False)
    assert shape(16384, True) == shape(16384, False)
    for profile in (ADRENO, MALI):
        mobile = GPUDecodeGEMV(profile).plan(32768, 2048, 2, prologue=True)
        assert mobile["ks"] == 1 and mobile == GPUDecodeGEMV(profile).plan(32768, 2048, 2)


@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc not installed")
def test_half2_gemv_ptx_has_two_packed_ops_per_two_weights(tmp_path):
    """Per 32-row group of 8 columns (256 weights) a thread issues 128 ``fma.rn.f16x2`` and 128
    ``sub.f16x2`` and 128 ``lop3``: one each per pair of weights, with 3 shifts per 4 codes."""
    cuda = parse_target("cuda -arch=sm_90")
    src = _source(build(kernel_func("e0m4", [1, 1], 2048, 16384), cuda, [GPUDecodeGEMV(CUDA)]), "cuda")
    path = tmp_path / "k.cu"
    path.write_text(src)
    res = subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-o", str(tmp_path / "k.ptx"), str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ptx = (tmp_path / "k.ptx").read_text()
    counts = {op: len(re.findall(re.escape(op) + r"\s", ptx))
              for op in ("fma.rn.f16x2", "sub.f16x2", "lop3.b32", "shr.u32", "mul.f16", "cvt.f32.f16")}
    weights_per_group = 32 * 8  # the kernel loops over groups: PTX holds one group's body
    assert counts["fma.rn.f16x2"] == counts["sub.f16x2"] == weights_per_group // 2, counts
    assert counts["lop3.b32"] == weights_per_group // 2, counts
    assert counts["shr.u32"] <= weights_per_group * 3 // 8, counts
    assert counts["mul.f16"] == 0, counts  # no scalar dequant multiply left


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("fmt,k,n,epilogue", [
    ("e0m4", 576, 192, None), ("e0m4", 576, 1536, "silu_gate"), ("e0m4", 1536, 576, "residual"),
    ("int4", 576, 49152, None),  # SmolLM2 lm_head
    ("e0m4", 2048, 256, None), ("e0m4", 2048, 2048, "residual"), ("e0m4", 2048, 16384, "silu_gate"),
    ("e0m4", 16384, 2048, None), ("e0m4", 16384, 2048, "residual"), ("int4", 16384, 2048, None),
    ("e0m4", 2048, 256000, None),  # a 2B lm_head: one kernel, no split
])
def test_half2_gemv_runs_correctly_on_a_cuda_gpu(fmt, k, n, epilogue):
    """The packed kernel on the GPU against numpy: SmolLM2 and 2B-class shapes (K up to 16384),
    with and without epilogues."""
    dev = cuda_device()
    cuda = parse_target("cuda -arch=sm_90")
    rng = np.random.default_rng(4)
    func = _dequant_gemv(fmt, k, n, epilogue)
    ex = build(func, cuda, [GPUDecodeGEMV(CUDA)])
    assert "tvm_lite_dq_hfma2" in _source(ex, "cuda")
    arrays = _half2_arrays(fmt, k, n, rng)
    x = (rng.standard_normal((1, 1, k)) * 0.5).astype(np.float16)
    extra = rng.standard_normal((1, 1, n)).astype(np.float16)
    out = tvm.runtime.empty((1, 1, n), "float16", dev)
    args = [x, *arrays.values()] + ([extra] if epilogue else [])
    ex.mod["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    ref = _half2_reference(fmt, x, arrays, k, n, epilogue, extra)
    err = np.abs(out.numpy().reshape(1, n).astype(np.float32) - ref).max() / np.abs(ref).max()
    assert err < 5e-3, (fmt, k, n, epilogue, err)


# -- the greedy token: a whole-vector reduction (schedules/gpu_scalar_reduction.py) -------------
def _greedy_module(vocab=49152):
    from tvm import relax

    from tvm_lite.relax_passes.add_step_helpers import add_greedy_token

    bb = relax.BlockBuilder()
    add_greedy_token(bb, vocab, "float16")
    return bb.get()


def _build_greedy(target_text, rules=None):
    from tvm import relax
    from tvm.s_tir import dlight as dl

    target = parse_target(target_text)
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
            dl.ApplyDefaultSchedule(*(rules or rules_for(target)))])(_greedy_module())
        return tvm.compile(mod, target=target)


@pytest.mark.parametrize("profile", list(TARGETS))
def test_greedy_token_reductions_are_cross_thread_not_one_thread(profile, tmp_path):
    """The argmax (49,152 logits to one element, reductions of (index, value) pairs) runs as two
    kernels: the row in 48 slices of 1,024, one workgroup each (a strided loop of a few steps per
    thread, then a cross-thread reduction), then one workgroup over the 48 slices' maxima -- not
    gpu.Fallback's single thread over the whole row (2.7 ms on an H200), nor one workgroup over
    the whole row (80-88 us for the 128k-256k vocabularies of Llama and Gemma: one SM)."""
    from tvm_lite.schedules.gpu_scalar_reduction import GPUScalarReduction

    kind = "cuda" if profile == "cuda" else "opencl"
    src = _source(_build_greedy(TARGETS[profile]), kind)
    assert not re.search(r"< (49152|1024); \+\+", src)  # no loop over the row or a slice
    kernels = set(re.findall(r"(?:__kernel|__global__) void (?:__launch_bounds__\(\d+\) )?(\w+)\(",
                             src))
    assert kernels == {"argmax_parts_kernel", "argmax_kernel"}, kernels
    assert "blockIdx.x" in src or "get_group_id(0)" in src  # the slices side by side
    if kind == "cuda":
        assert src.count("__shfl_down_sync") >= 2 * 5  # index and value, 5 steps of a warp
    else:
        assert "barrier(CLK_LOCAL_MEM_FENCE)" in src
        if shutil.which("clang-15"):
            path = tmp_path / "greedy.cl"
            path.write_text(src)
            out = clang_opencl(path)
            assert out.returncode == 0, out.stderr[-2000:]
    # (the max and first-index reductions it replaced fell to one thread looping over the row
    # without GPUScalarReduction; TOPI's argmax pairs are a reducer DLight's rules know too)
    assert GPUScalarReduction in {type(r) for r in rules_for(parse_target(TARGETS[profile]))}


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
def test_greedy_token_runs_correctly_on_a_cuda_gpu():
    from tvm import relax

    dev = cuda_device()
    vm = relax.VirtualMachine(_build_greedy(TARGETS["cuda"]), dev)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 49152)).astype("float16")
    x[0, 3, 777] = x[0, 3, 40000] = 30  # a tie: the first index wins, as in numpy
    xs = tvm.runtime.tensor(x, dev)
    got = [int(vm["greedy_token"](xs, tvm.runtime.ShapeTuple([i])).numpy()[0]) for i in range(4)]
    assert got == [int(np.argmax(x[0, i])) for i in range(4)]


# -- the tensor-core prefill GEMM (schedules/gpu_gemm_mma.py, the cuda profile) ------------------
# (fmt, K, N, epilogue): the SmolLM2 k/v (N = 192) and down shapes, a 1B q and down projection,
# every weight format, the two epilogue kinds
MMA_CASES = [
    ("e0m4", 576, 192, None), ("int4", 1536, 576, None), ("fp16", 576, 192, None),
    ("e0m4", 2048, 2048, "residual"), ("int4", 2048, 512, "silu_gate"),
    ("e0m4", 8192, 2048, None), ("fp16", 2048, 1024, "silu_gate"),
    ("e0m4", 2048, 8192, "residual"),  # a wide grid: 64 x 64 warp tiles
]


def _mma_func(fmt, k, n, epilogue, m=DYN):
    if fmt == "fp16":
        return _silu_gated([1, m], k, n, "float16") if epilogue else kernel_func(fmt, [1, m], k, n)
    return _dequant_gemv(fmt, k, n, epilogue, lead=(1, m))


def test_bench_gemm_variants_build_their_kernels():
    """``bench.prefill``'s GEMM variants (no GPU needed to build them): the "x async" rule and
    each forced tile's " x async" twin build the mma kernel with X by cp.async, the others
    without; a forced tile is the one built."""
    from tvm_lite.bench.prefill import GEMM_VARIANTS, gemm_rules

    target = parse_target(TARGETS["cuda"])
    rules, variants = gemm_rules(target, [(128, 128, 2, 2, 1, 64)])
    assert set(GEMM_VARIANTS) < set(variants)
    func = kernel_func("e0m4", [1, tirx.Var("n", "int64")], 2048, 2048)
    for variant in ("e0m4", "e0m4 (x async)", "e0m4 tile 128x128x2x2x1x64",
                    "e0m4 tile 128x128x2x2x1x64 x async"):
        fmt, rule = variants[variant]
        src = _source(build(func, target, rules[rule]), "cuda")
        assert ("tvm_lite_cp_async16(" in src) == ("x async" in variant), variant
        if "tile" in variant:  # 2 x 2 warps: 128 threads
            assert "__launch_bounds__(128)" in src, variant
    # "e0m4 (sm_90a)": the default rules built for sm_90a, so a deep GEMM is warp-specialised,
    # a kernel a prompt length's plan (down: K split 8, 4, and none)
    deep = kernel_func("e0m4", [1, tirx.Var("n", "int64")], 8192, 2048)
    rule = variants["e0m4 (sm_90a)"][1]
    by = _source(build(deep, parse_target(WGMMA_TARGET), rules[rule]), "cuda")
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", by))
    assert len(kernels) == 5 and "tvm_lite_bar_arrive(" in by, kernels  # 3 + 2 split-K sums
    # "e0m4 (sm_90a one plan)": the same with one kernel, planned for PLAN_M (K split 4)
    one = _source(build(deep, parse_target(WGMMA_TARGET),
                        rules[variants["e0m4 (sm_90a one plan)"][1]]), "cuda")
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", one))
    assert len(kernels) == 2 and "tvm_lite_bar_arrive(" in one, kernels  # + its split-K sum
    # each row of the bench names the plan its kernel ran (kernel_plan)
    plan = kernel_plan(deep, parse_target(WGMMA_TARGET), rules[rule])
    assert plan.startswith("wgmma_m64n256k16 128x256 split-K 1 ") and "if n <= 384:" in plan, plan
    assert kernel_plan(deep, parse_target(WGMMA_TARGET), []) == ""


def test_mma_gemm_is_the_cuda_prefill_rule_and_compiles():
    """On CUDA the prefill GEMM is the mma.sync kernel (one kernel, epilogue inside, the 4-bit
    weight dequantized by the LOP3 helper as it is staged); nvcc builds it without spills."""
    from tvm_lite.schedules.gpu_gemm_mma import choose_tile

    target = parse_target(TARGETS["cuda"])
    rule = GPUPrefillGEMM(CUDA)
    for fmt, k, n, epilogue in MMA_CASES:
        sch = _schedule(rule, _mma_func(fmt, k, n, epilogue), target)
        assert "mma_m16n8k16" in str(sch.mod["main"].attrs["tvm_lite.gemm"]), (fmt, k, n)
    # the tile follows the matrix: enough workgroups for 132 SMs at n = 512, else K split
    assert choose_tile(8192, 132, k=2048) == (128, 128, 2, 2, 1)  # 256 workgroups: 64x64 warps
    assert choose_tile(3072, 132, k=2048) == (128, 128, 2, 4, 2)  # 96: 2 splits, 64x32 warps
    assert choose_tile(2048, 132, k=8192) == (128, 128, 2, 4, 2)  # 64 workgroups: 2 splits
    assert choose_tile(192, 132)[:2] == (64, 64)
    assert choose_tile(576, 132, k=576)[4] == 1  # 9 slices of K: too few to split
    # a 256-token chunk over K = 2048: the 64x64 tile unsplit where it fills the 132 SMs (N 3072:
    # 192 workgroups), not 128x128 split in four; N 2048 (128) and K = 8192 keep the split
    assert choose_tile(3072, 132, m=256, k=2048) == (64, 64, 2, 2, 1)
    assert choose_tile(2048, 132, m=256, k=2048) == (128, 128, 2, 4, 4)
    assert choose_tile(2048, 132, m=256, k=8192) == (128, 128, 2, 4, 4)
    # NARROW: SmolLM2's o and down (N 576) at 256 tokens take 32-row tiles, K split in three
    # (216 workgroups), where 64x64 gives 36 or 72; Llama-1B's N 2048 keeps its 64x64 tiles
    import tvm_lite.schedules.gpu_gemm_mma as mma_rules

    assert mma_rules.NARROW
    assert choose_tile(576, 132, m=256, k=576) == (32, 64, 1, 2, 3)
    assert choose_tile(576, 132, m=256, k=1536) == (32, 64, 1, 2, 3)
    assert choose_tile(576, 132, m=512, k=576) == (64, 64, 2, 2, 1)  # timed at 256 only
    assert choose_tile(2048, 132, m=256, k=2048)[:2] == (128, 128)
    # a target that sums a split K in a cluster (UNSPLIT_CLUSTER_WAYS): a 256-token chunk's
    # unsplit tile takes K in two (Gemma-2B's q+k+v, N 2560: 160 -> 320 workgroups), or, K too
    # shallow to split (SmolLM2's gate+up, 9 slices), the 32-row tile unsplit; longer prompts,
    # split tiles and deep K are left alone
    assert choose_tile(2560, 132, m=256, k=2048) == (64, 64, 2, 2, 1)
    assert choose_tile(2560, 132, m=256, k=2048, clusters=True) == (64, 64, 2, 2, 2)
    assert choose_tile(3072, 132, m=256, k=576) == (64, 64, 2, 2, 1)
    assert choose_tile(3072, 132, m=256, k=576, clusters=True) == (32, 64, 1, 2, 1)
    for n, m, k in ((2560, 512, 2048), (2048, 256, 2048), (2048, 256, 8192), (576, 256, 576)):
        assert choose_tile(n, 132, m=m, k=k, clusters=True) == choose_tile(n, 132, m=m, k=k)
    with pytest.MonkeyPatch.context() as mp:  # 1: off
        mp.setattr(mma_rules, "UNSPLIT_CLUSTER_WAYS", 1)
        assert choose_tile(2560, 132, m=256, k=2048, clusters=True) == (64, 64, 2, 2, 1)
        assert choose_tile(3072, 132, m=256, k=576, clusters=True) == (64, 64, 2, 2, 1)
    names = r"__global__ void (?:__cluster_dims__\(\d+, \d+, \d+\) )?__launch_bounds__\(\d+\) (\w+)\("
    # split: on sm_90 the partials are summed in a cluster (CLUSTER_SUM), on sm_80 by a second
    # kernel, which applies the epilogue
    for arch, split_k, kernels in (("sm_90", True, 1), ("sm_80", True, 2), ("sm_90", False, 1)):
        func = _mma_func("e0m4", 2048, 2048, "residual")
        rule = GPUPrefillGEMM(CUDA, split_k=split_k, plan_lengths=())  # one plan: PLAN_M's
        src = _source(build(func, parse_target(f"cuda -arch={arch}"), [rule]), "cuda")
        assert "mma.sync.aligned.m16n8k16" in src and "ldmatrix" in src and "0x64006400u" in src
        assert len(set(re.findall(names, src))) == kernels, (arch, split_k)
        assert ("__cluster_dims__(1, 1, 2)" in src) == (arch == "sm_90" and split_k)
    # not taken: fp32 activations (the SIMT or WMMA schedule), N not a multiple of 64
    from tvm_lite.schedules.gpu_gemm_mma import mma_gemm_kernel

    # (the rule then tries DLight's WMMA kernel: not run here, its first use imports TVM's
    # tensor intrinsics, ~250 TVMScript parses, minutes under pytest)
    for func in (_silu_gated([1, DYN], 576, 192, "float32"), kernel_func("fp16", [1, DYN], 576, 96)):
        with pytest.raises(MatchError):
            mma_gemm_kernel(func, target, CUDA)


def test_mma_gemm_cuda_source_has_no_spills(tmp_path):
    if not shutil.which("nvcc"):
        pytest.skip("nvcc not installed")
    target = parse_target(TARGETS["cuda"])
    for fmt in ("e0m4",):  # the 4-bit one holds the most registers (codes, scale, zero)
        src = _source(build(_mma_func(fmt, 2048, 8192, None), target, [GPUPrefillGEMM(CUDA)]), "cuda")
        path = tmp_path / f"{fmt}.cu"
        path.write_text(src)
        res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o",
                              str(tmp_path / f"{fmt}.cubin"), str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "0 bytes spill stores" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("fmt,k,n,epilogue", MMA_CASES)
def test_mma_gemm_runs_correctly_on_a_cuda_gpu(fmt, k, n, epilogue):
    """The tensor-core GEMM against numpy at prompt lengths that are and are not multiples of
    the tile (1, 37, 128, 200, 512), with its epilogue."""
    target = parse_target(TARGETS["cuda"])
    _check_gemm_on_gpu(build(_mma_func(fmt, k, n, epilogue), target, [GPUPrefillGEMM(CUDA)]),
                       fmt, k, n, epilogue)


def _check_gemm_on_gpu(ex, fmt, k, n, epilogue, lengths=(1, 37, 128, 200, 512)):
    """A built prefill GEMM against numpy on the CUDA device at prompt lengths that are and are
    not multiples of the tile (default 1, 37, 128, 200, 512)."""
    dev = cuda_device()
    rng = np.random.default_rng(5)
    arrays = weights(fmt, k, n, rng) if fmt != "e0m4" else _half2_arrays(fmt, k, n, rng)
    for seq in lengths:
        x = (rng.standard_normal((1, seq, k)) * 0.5).astype(np.float16)
        extra = (rng.standard_normal((1, seq, n))).astype(np.float16)
        args = [x, *arrays.values()] + ([extra] if epilogue else [])
        if fmt == "fp16" and epilogue:
            args = [x, arrays["w"], extra]
        out = tvm.runtime.empty((1, seq, n), "float16", dev)
        ex.mod["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
        ref = _gemm_reference(fmt, x, arrays, k, n, epilogue, extra)
        got = out.numpy().reshape(seq, n).astype(np.float32)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-2, (fmt, k, n, epilogue, seq, err)


# (fmt, K, N, M, epilogue, tile, X by cp.async): one kernel with the output tile cut by M; K
# split in two (its sum kernel applies the residual add); fp16 weights with the two-block SiLU
# epilogue; forced tiles a sweep may pick (64-deep K slices, 128x256); the first three again with
# X copied by cp.async (rows past M zeroed by plain stores)
MMA_CPU_CASES = [("e0m4", 256, 128, 70, None, None, False),
                 ("int4", 1024, 64, 37, "residual", None, False),
                 ("fp16", 128, 192, 65, "silu_gate", None, False),
                 ("e0m4", 256, 128, 70, None, (128, 128, 2, 4, 1, 64), False),
                 ("int4", 256, 256, 40, None, (128, 256, 2, 4, 2), False),
                 ("e0m4", 256, 256, 150, "residual", (128, 128, 2, 2, 1), False),  # WIDE_TILE
                 ("e0m4", 576, 128, 70, "residual", (32, 64, 1, 2, 3), False),  # NARROW_TILE
                 ("e0m4", 256, 128, 70, None, None, True),
                 ("int4", 1024, 64, 37, "residual", None, True),
                 ("fp16", 128, 192, 65, "silu_gate", None, True)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("fmt,k,n,m,epilogue,tile,x_async", MMA_CPU_CASES)
def test_mma_gemm_cuda_c_run_on_the_cpu_matches_numpy(fmt, k, n, m, epilogue, tile, x_async,
                                                       tmp_path):
    """The tensor-core GEMM's generated CUDA C, run on the CPU with the PTX helpers emulated
    lane by lane (tests/mma_on_cpu.py), against numpy."""
    from tvm_lite.schedules.gpu_gemm_mma import choose_tile

    target = parse_target(TARGETS["cuda"])
    func = _mma_func(fmt, k, n, epilogue, m)
    src = _source(build(func, target, [GPUPrefillGEMM(CUDA, mma_tile=tile, x_async=x_async)]),
                  "cuda")
    assert ("tvm_lite_cp_async16(" in src) == x_async
    TM, TN, _, _, KS = (tile or choose_tile(n, CUDA.compute_units, k=k))[:5]
    assert tile or (KS > 1) == (k == 1024)
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, (TM, TN, KS), 7, tmp_path)


# (fmt, K, N, M, epilogue, tile, PREFETCH): K slices loaded that many ahead into their own
# registers -- the narrow tile's 9 slices 4 ahead (a loop of 3 steps, the last cut short); K split
# in two, 3 ahead of 4 slices a split; fp16 weights with the two-block SiLU epilogue, 2 ahead; a
# split of 3 slices asked for 4 (at most its slices less one: 2)
PREFETCH_CPU_CASES = [("e0m4", 576, 128, 70, None, (32, 64, 1, 2, 1), 4),
                      ("int4", 1024, 64, 37, "residual", (64, 64, 2, 2, 2), 3),
                      ("fp16", 384, 192, 65, "silu_gate", (64, 64, 2, 2, 1), 2),
                      ("e0m4", 576, 128, 70, "residual", (32, 64, 1, 2, 3), 4)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("fmt,k,n,m,epilogue,tile,prefetch", PREFETCH_CPU_CASES)
def test_prefetched_mma_gemm_cuda_c_run_on_the_cpu_matches_numpy(fmt, k, n, m, epilogue, tile,
                                                                  prefetch, tmp_path,
                                                                  monkeypatch):
    """The tensor-core GEMM with ``PREFETCH`` K slices in flight (each in its own registers)
    computes what numpy does, and says so in its plan label."""
    from tvm_lite.schedules import gpu_gemm_mma

    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", prefetch)
    target = parse_target(TARGETS["cuda"])
    func = _mma_func(fmt, k, n, epilogue, m)
    depth = min(prefetch, k // 64 // tile[4] - 1)
    label = kernel_plan(func, target, [GPUPrefillGEMM(CUDA, mma_tile=tile)])
    assert label.endswith(f"prefetch {depth}") or depth == 1, label
    src = _source(build(func, target, [GPUPrefillGEMM(CUDA, mma_tile=tile)]), "cuda")
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, tile[:2] + (tile[4],), 7, tmp_path)


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("fmt,k,n,m,epilogue,tile,prefetch", PREFETCH_CPU_CASES)
def test_prefetched_mma_gemm_runs_correctly_on_a_cuda_gpu(fmt, k, n, m, epilogue, tile, prefetch,
                                                         monkeypatch):
    """The same kernels against numpy on the GPU at prompt lengths cut and not cut by the tile."""
    from tvm_lite.schedules import gpu_gemm_mma

    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", prefetch)
    target = parse_target(TARGETS["cuda"])
    _check_gemm_on_gpu(build(_mma_func(fmt, k, n, epilogue), target,
                             [GPUPrefillGEMM(CUDA, mma_tile=tile)]), fmt, k, n, epilogue)


def test_prefetched_mma_gemm_has_no_spills(tmp_path, monkeypatch):
    """Four slices ahead on the narrow tile (the most registers a thread: ptxas 255 at sm_90a)
    and on 128 x 64 still spill nothing, nor do the default depths of 64 x 64 (4), 128 x 64 and
    32 x 64 (2)."""
    from tvm_lite.schedules import gpu_gemm_mma

    if not shutil.which("nvcc"):
        pytest.skip("nvcc not installed")
    target = parse_target(TARGETS["cuda"])
    for prefetch, tile in ((4, (32, 64, 1, 2, 1)), (4, (128, 64, 4, 2, 1)),
                           (0, (64, 64, 2, 2, 1)), (0, (128, 64, 4, 2, 1)),
                           (0, (32, 64, 1, 2, 1))):
        monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", prefetch)
        src = _source(build(_mma_func("e0m4", 576, 3072, None), target,
                            [GPUPrefillGEMM(CUDA, mma_tile=tile)]), "cuda")
        path = tmp_path / "k.cu"
        path.write_text(src)
        res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o",
                              str(tmp_path / "k.cubin"), str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "0 bytes spill stores" in res.stderr, (tile, res.stderr[-2000:])


def test_prefetch_one_is_the_double_buffer(monkeypatch):
    """``PREFETCH = 1`` builds the kernel the double buffer always built: the prefetched loop
    only where asked (its register sets sized by the depth)."""
    from tvm_lite.schedules import gpu_gemm_mma

    target = parse_target(TARGETS["cuda"])
    func = _mma_func("e0m4", 576, 128, None, 70)
    rules = [GPUPrefillGEMM(CUDA, mma_tile=(32, 64, 1, 2, 1))]
    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", 1)
    plain = _source(build(func, target, rules), "cuda")
    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", 3)
    deep = _source(build(func, target, rules), "cuda")
    # a thread's registers of a slice: 4 X vectors, 2 packed-code vectors (and their scales
    # and zeros); one set, then three
    for text, sets in ((plain, 1), (deep, 3)):
        assert f"uint4 xv_ptr[{4 * sets}];" in text
        assert all(f"uint {a}_ptr[{8 * sets}];" in text for a in ("wv", "sv", "zv"))
    assert kernel_plan(func, target, rules).endswith("prefetch 3")
    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", 1)
    assert "prefetch" not in kernel_plan(func, target, rules)


def test_prefetch_depth_follows_the_tile_by_default(monkeypatch):
    """``PREFETCH = 0`` (the default) takes each tile's depth from ``PREFETCH_BY_TILE`` -- 4 on
    64 x 64, 2 on 128 x 64 and 32 x 64, none on 128 x 128 -- and never more than a split's
    slices less one; a nonzero ``PREFETCH`` forces its depth on every tile."""
    from tvm_lite.schedules import gpu_gemm_mma

    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", 0)
    g = {"k": 576}  # 9 slices of 64
    depth = lambda tile: gpu_gemm_mma.prefetch_of(g, tile, x_async=False)  # noqa: E731
    assert [depth(t) for t in ((64, 64, 2, 2, 1), (128, 64, 4, 2, 1), (32, 64, 1, 2, 1),
                               (128, 128, 2, 4, 1), (64, 64, 2, 2, 3),
                               (32, 64, 1, 2, 8))] == [4, 2, 2, 1, 2, 1]
    assert depth((64, 64, 2, 2, 1)) == 4 and gpu_gemm_mma.prefetch_of(
        g, (64, 64, 2, 2, 1), x_async=True) == 1
    monkeypatch.setattr(gpu_gemm_mma, "PREFETCH", 3)
    assert [depth(t) for t in ((64, 64, 2, 2, 1), (128, 128, 2, 4, 1))] == [3, 3]


# -- the gated MLP's GEMM: act(gate) * up stored from the accumulators ---------------------------
# (fmt, K, N (output columns: half the GEMM's), M, act, tile): 64 x 64 cut by M (SiLU), tanh-GELU
# on the wide tile, fp16 weights on the narrow tile
GATED_MMA_CPU_CASES = [("e0m4", 256, 128, 70, "silu", (64, 64, 2, 2, 1)),
                       ("e0m4", 128, 128, 150, "gelu", (128, 128, 2, 2, 1)),
                       ("fp16", 128, 64, 37, "silu", (32, 64, 1, 2, 1))]


def _gated_reference(y, n, act):
    """``act(gate) * up`` of a GEMM output ``y`` (fp32, rounded to fp16 as the GEMM stores it)
    whose ``2n`` columns alternate gate and up in blocks of ``GATE_BLOCK``, as FuseSiluMul's
    kernel computes it (the activation in fp32, cast to fp16, times up in fp16)."""
    from tvm_lite.convention import GATE_BLOCK

    blocks = y.astype(np.float16).reshape(y.shape[0], n // GATE_BLOCK, 2, GATE_BLOCK)
    gate = blocks[:, :, 0].reshape(-1, n).astype(np.float32)
    up = blocks[:, :, 1].reshape(-1, n)
    if act == "silu":
        a = gate / (1 + np.exp(-gate))
    else:
        a = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
    return (a.astype(np.float16) * up).astype(np.float32)


def _check_gated_c_on_cpu(src, fmt, k, n, m, act, tile, tmp_path, seed=5):
    """A gated GEMM's CUDA C (``tile = (TM, TN)`` over the GEMM's ``2n`` columns) run on the
    CPU (tests/mma_on_cpu.py) against numpy."""
    from mma_on_cpu import run_kernels

    TM, TN = tile
    rng = np.random.default_rng(seed)
    arrays = weights(fmt, k, 2 * n, rng) if fmt != "e0m4" else _half2_arrays(fmt, k, 2 * n, rng)
    x = (rng.standard_normal((1, m, k)) * 0.5).astype(np.float16)
    given = [x, *arrays.values()]
    named = {f"p{i}_ptr": a for i, a in enumerate(given)}
    if fmt != "fp16":  # the uint32 views of the packed tensors
        for role in ("codes", "scale", "zero"):
            if role in arrays:
                named[f"{role}32_ptr"] = arrays[role].view(np.uint32)
    got = run_kernels(src, named, {"main_kernel": (2 * n // TN, -(-m // TM), 1)},
                      f"p{len(given)}_ptr", m * n, tmp_path).reshape(m, n).astype(np.float32)
    y = _gemm_reference(fmt, x, arrays, k, 2 * n, None, None)
    ref = _gated_reference(y, n, act)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-2, err


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("fmt,k,n,m,act,tile", GATED_MMA_CPU_CASES)
def test_gated_mma_gemm_cuda_c_run_on_the_cpu_matches_numpy(fmt, k, n, m, act, tile, tmp_path):
    """The gate+up GEMM fused with its activation (``FuseGatedEpilogue``, gate and up
    interleaved in blocks of 8) as the mma.sync kernel builds it: one kernel whose threads
    store ``act(gate) * up`` from their gate and up n8 tiles (half the columns), no activation
    kernel -- its CUDA C run on the CPU against numpy."""
    from tvm_lite.bench.kernels import gated_gemm_func
    from tvm_lite.schedules.gpu_gemm_mma import choose_tile

    func = gated_gemm_func(fmt, [1, m], k, n, act)
    src = _source(build(func, parse_target("cuda -arch=sm_80"),
                        [GPUPrefillGEMM(CUDA, mma_tile=tile)]), "cuda")
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", src))
    assert kernels == {"main_kernel"}, kernels
    _check_gated_c_on_cpu(src, fmt, k, n, m, act, tile[:2], tmp_path)


def test_bench_gated_builds_its_kernels_and_names_a_bad_shape(capsys):
    """``python -m tvm_lite.bench.gated`` (no GPU needed to build): SmolLM2's gate+up as the
    GEMM and the activation kernel apart and as the one fused kernel; an unknown ``--shapes``
    entry is a usage error that names it."""
    from tvm_lite.bench import gated

    fns = gated.build_kernels(576, 1536, "silu")
    assert set(fns) == {"gemm", "activation", "fused"}
    with pytest.raises(SystemExit) as exc:
        gated.main(["--shapes", "llama-3.2-1b,nope"])
    assert exc.value.code == 2 and "unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # (bench.kernels.int_list: the benches' int lists)
        gated.main(["--rows", "256,5l2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--rows" in err and "'256,5l2'" in err, err


def test_gated_gemm_plans_never_split_k():
    """Planned by prompt length (Llama-1B's gate+up: K 2048, 2 x 8192 columns), the gated
    GEMM is one kernel a planned length and never splits K (a split's partials would need the
    activation after their sum): no split-K sum kernel, every plan "split-K 1"."""
    from tvm_lite.bench.kernels import gated_gemm_func

    func = gated_gemm_func("e0m4", [1, DYN], 2048, 8192)
    target = parse_target("cuda -arch=sm_80")
    plan = kernel_plan(func, target, [GPUPrefillGEMM(CUDA)])
    src = _source(build(func, target, [GPUPrefillGEMM(CUDA)]), "cuda")
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", src))
    assert plan.count("split-K 1") == len(kernels) and "split-K 2" not in plan, plan
    assert "__tvm_lite" not in src and "expf" in src  # the activation (SiLU's exp) is in it


# (fmt, K, N, M, epilogue, tile): the narrow tile with K in three (9 slices: a vector count per
# rank that does not divide evenly, rows past M), and 64 x 64 with K in two
MMA_CLUSTER_CPU_CASES = [("e0m4", 576, 128, 70, "residual", (32, 64, 1, 2, 3)),
                         ("int4", 1024, 128, 100, None, (64, 64, 2, 2, 2))]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("fmt,k,n,m,epilogue,tile", MMA_CLUSTER_CPU_CASES)
def test_mma_gemm_cluster_sum_cuda_c_run_on_the_cpu_matches_numpy(fmt, k, n, m, epilogue, tile,
                                                                   tmp_path, monkeypatch):
    """``CLUSTER_SUM``: the mma.sync GEMM's split K added up in a thread-block cluster (each
    workgroup's fp32 partials in its shared memory, read across the cluster) -- one kernel,
    built with ``__cluster_dims__(1, 1, KS)`` -- run on the CPU against numpy; on an sm_80
    target the sum kernel stays."""
    from tvm_lite.schedules import gpu_gemm_mma

    monkeypatch.setattr(gpu_gemm_mma, "CLUSTER_SUM", True)
    func = _mma_func(fmt, k, n, epilogue, m)
    names = r"__global__ void (?:__cluster_dims__\(\d+, \d+, \d+\) )?__launch_bounds__\(\d+\) (\w+)\("
    sm80 = _source(build(func, parse_target("cuda -arch=sm_80"),
                         [GPUPrefillGEMM(CUDA, mma_tile=tile)]), "cuda")
    assert len(set(re.findall(names, sm80))) == 2 and "__cluster_dims__" not in sm80
    target = parse_target(TARGETS["cuda"])
    src = _source(build(func, target, [GPUPrefillGEMM(CUDA, mma_tile=tile)]), "cuda")
    KS = tile[4]
    assert f"__cluster_dims__(1, 1, {KS})" in src and "tvm_lite_ld_dsmem_f32x4(" in src
    assert len(set(re.findall(names, src))) == 1, "no second kernel"
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, (tile[0], tile[1], KS), 11, tmp_path)


def _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, tile, seed, tmp_path, group=32):
    """A prefill GEMM's CUDA C (``tile = (TM, TN, KS)`` of its grid) run on the CPU
    (tests/mma_on_cpu.py) against numpy on random inputs."""
    from mma_on_cpu import run_kernels

    TM, TN, KS = tile
    rng = np.random.default_rng(seed)
    arrays = (weights(fmt, k, n, rng) if fmt != "e0m4" else
              _half2_arrays(fmt, k, n, rng, group))
    x = (rng.standard_normal((1, m, k)) * 0.5).astype(np.float16)
    extra = rng.standard_normal((1, m, n)).astype(np.float16)
    given = [x, *arrays.values()] + ([extra] if epilogue else [])
    if fmt == "fp16" and epilogue:
        given = [x, arrays["w"], extra]
    named = {f"p{i}_ptr": a for i, a in enumerate(given)}
    if fmt != "fp16":  # the uint32 views of the packed tensors
        named["codes32_ptr"] = arrays["codes"].view(np.uint32)
        named["scale32_ptr"] = arrays["scale"].view(np.uint32)
        if "zero" in arrays:
            named["zero32_ptr"] = arrays["zero"].view(np.uint32)
    from tvm_lite.schedules.gpu_gemm_mma import SUM_THREADS, SUM_VEC

    sums = -(-m * n // (SUM_THREADS * SUM_VEC))  # the sum kernel's workgroups (K split)
    grids = {"main_kernel": (n // TN, -(-m // TM), KS), "main_kernel_1": (sums, 1, 1)}
    got = run_kernels(src, named, grids, f"p{len(given)}_ptr", m * n, tmp_path)
    got = got.reshape(m, n).astype(np.float32)
    ref = _gemm_reference(fmt, x, arrays, k, n, epilogue, extra, group)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-2, err


# -- Hopper's wgmma GEMM (schedules/gpu_gemm_wgmma.py) --------------------------------------------
# (fmt, K, N, M, epilogue, tile (TM, TN[, KS]), X stages): the default tile cut by M; one
# warpgroup; K split in two with the residual add in the sum kernel; N 256 a warpgroup MMA; X by
# cp.async in rings of 2, 3 and 4 slices (fewer slices than the ring holds: K 128)
WGMMA_CPU_CASES = [("e0m4", 256, 128, 70, None, None, 0),
                   ("int4", 128, 128, 37, "residual", (64, 128), 0),
                   ("e0m4", 1024, 128, 40, "residual", (128, 128, 2), 0),
                   ("e0m4", 128, 256, 130, None, (128, 256), 0),
                   ("int4", 128, 64, 20, None, (64, 64), 0),
                   ("e0m4", 256, 128, 70, None, None, 2),
                   ("e0m4", 512, 128, 70, "residual", (128, 128, 2), 3),
                   ("int4", 128, 256, 37, None, (64, 256), 4)]
WGMMA_TARGET = "cuda -arch=sm_90a"
HOPPER = pytest.mark.skipif(cuda_device() is None or "9.0" not in str(
    getattr(cuda_device(), "compute_version", "")), reason="needs a Hopper (sm_90) GPU")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("fmt,k,n,m,epilogue,tile,stages", WGMMA_CPU_CASES)
def test_wgmma_gemm_cuda_c_run_on_the_cpu_matches_numpy(fmt, k, n, m, epilogue, tile, stages,
                                                        tmp_path):
    """The wgmma GEMM's generated CUDA C run on the CPU (tests/mma_on_cpu.py: the warpgroup MMA
    read through the kernel's own descriptors' layout, the K-major dequant emulated), against
    numpy: X and W staged in the padded core-matrix layout, the accumulator-to-output mapping,
    split-K and the epilogue."""
    from tvm_lite.schedules import gpu_gemm_wgmma as wg

    assert wg.SBO == 144  # the emulator's WGMMA_SBO
    target = parse_target(WGMMA_TARGET)
    func = _mma_func(fmt, k, n, epilogue, m)
    with target:
        sch = wg.wgmma_gemm_kernel(func, target, CUDA, tile, stages)
    kernel = sch.mod["main"].with_attr("global_symbol", "main")
    src = _source(tvm.compile(tvm.IRModule({"main": kernel}), target=target), "cuda")
    assert "tvm_lite_wgmma_m64n" in src and "tvm_lite_dq_kmajor(" in src
    assert ("tvm_lite_cp_async16(" in src) == (stages > 0)
    TM, TN = (tile or wg.TILE)[:2]
    KS = tile[2] if tile and len(tile) > 2 else 1
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, (TM, TN, KS), 8, tmp_path)


# (fmt, K, N, M, epilogue, tile, stages): the warp-specialised kernel -- the default tile cut by
# M with the ring wrapping around (8 slices, 4 stages); one consumer warpgroup and 2 stages; K
# split in two; N 256 (3 stages: 4 do not fit in shared memory); a quantization group (128) that
# spans two slices; fewer slices than stages; four consumer warpgroups (256 rows, 640 threads);
# fewer fp16 W slices than stages (the ring 5 deep with 2 W slots, wrapping around; 3 W slots
# with K split; 2 W slots with fewer slices than stages)
WGMMA_WS_CPU_CASES = [("e0m4", 512, 128, 70, None, None, 4),
                      ("int4", 256, 128, 37, "residual", (64, 128), 2),
                      ("e0m4", 1024, 128, 40, "residual", (128, 128, 2), 3),
                      ("e0m4", 256, 256, 130, None, (128, 256), 3),
                      ("e0m4", 512, 128, 20, None, (64, 128), 3, 128),
                      ("int4", 128, 64, 20, None, (64, 64), 5),
                      ("e0m4", 256, 128, 300, "residual", (256, 128), 3),
                      ("e0m4", 768, 128, 70, None, (128, 128), 5, 32, 2),
                      ("int4", 2048, 64, 20, "residual", (64, 64, 2), 5, 32, 3),
                      ("e0m4", 256, 128, 30, None, (64, 128), 5, 128, 2),
                      # outputs stored in pairs (a partial row tile); with an epilogue they are
                      # not (one store an output as before)
                      ("e0m4", 512, 128, 70, None, None, 4, 32, None, True),
                      ("int4", 256, 128, 37, "residual", (64, 128), 3, 32, None, True),
                      # X copied a row segment a warp quarter (x_rows): partial row tiles, one
                      # and two consumer warpgroups, the deep ring with paired stores
                      ("e0m4", 512, 256, 70, None, (128, 256), 5, 32, 2, True, True),
                      ("int4", 256, 128, 37, "residual", (64, 128), 3, 32, None, False, True),
                      # outputs staged through shared memory (partial row tiles; two consumer
                      # warpgroups at N 256, one at N 128: two rows a warp instruction; with an
                      # epilogue: plain stores)
                      ("e0m4", 512, 256, 70, None, (128, 256), 5, 32, 2, False, True, True),
                      ("e0m4", 256, 128, 37, None, (64, 128), 3, 32, None, False, False, True),
                      ("int4", 256, 128, 37, "residual", (64, 128), 3, 32, None, False, False,
                       True),
                      # int4 at the sm_90a defaults' settings (wide: 5 stages, 2 W slots,
                      # pairs; deep: 4 stages, 2 W slots, X by rows, K split as the plan
                      # splits a down projection's)
                      ("int4", 512, 256, 70, None, (128, 256), 5, 32, 2, True),
                      ("int4", 1024, 256, 40, "residual", (128, 256, 2), 4, 32, 2, False, True),
                      # 192-column tiles (m64n192k16: a merged q+k+v's N = 1.5 K divides by
                      # 192), staged and split with an epilogue
                      ("e0m4", 512, 192, 70, None, (128, 192), 4, 32, None, False, False, True),
                      ("e0m4", 1024, 192, 70, "residual", (128, 192, 2), 4, 32, 2, False, True)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", [MMA_CPU_CASES[1], MMA_CPU_CASES[4], WGMMA_CPU_CASES[2]])
def test_split_k_fp16_partials_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path, monkeypatch):
    """``PARTIALS_FP16``: a split K's partials stored as fp16 and summed in fp32 by the second
    kernel (SUM_VEC a thread), for the mma.sync kernel (K in two with the residual add in the sum;
    128 x 256 in two) and the wgmma one: the CUDA C run on the CPU against numpy."""
    from tvm_lite.schedules import gpu_gemm_mma

    monkeypatch.setattr(gpu_gemm_mma, "PARTIALS_FP16", True)
    if case in WGMMA_CPU_CASES:
        test_wgmma_gemm_cuda_c_run_on_the_cpu_matches_numpy(*case, tmp_path)
    else:
        test_mma_gemm_cuda_c_run_on_the_cpu_matches_numpy(*case, tmp_path)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", WGMMA_WS_CPU_CASES)
def test_warp_specialised_wgmma_gemm_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path):
    """The warp-specialised wgmma GEMM's CUDA C run on the CPU (tests/mma_on_cpu.py: named
    barriers with arrive / sync phases, cp.async groups landing at their waits), against numpy:
    the producer's ring, the packed slices dequantized from shared memory, the consumers'
    release of stages, split-K and the epilogue."""
    from tvm_lite.schedules import gpu_gemm_wgmma as wg
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    fmt, k, n, m, epilogue, tile, stages = case[:7]
    group = case[7] if len(case) > 7 else 32
    w_buffers = case[8] if len(case) > 8 else None
    pairs = len(case) > 9 and case[9]
    x_rows = len(case) > 10 and case[10]
    staged = len(case) > 11 and case[11]
    target = parse_target(WGMMA_TARGET)
    func = _dequant_gemv(fmt, k, n, epilogue, lead=(1, m), group=group)
    with target:
        sch = ws.ws_gemm_kernel(func, target, CUDA, tile, stages, w_buffers=w_buffers,
                                pair_stores=pairs, x_rows=x_rows, staged_stores=staged)
    label = str(sch.mod["main"].attrs["tvm_lite.gemm"])
    paired, staged = pairs and epilogue is None and not staged, staged and epilogue is None
    assert label.endswith((f"x{stages} w{w_buffers}" if w_buffers else f"x{stages}")
                          + (" pairs" if paired else "") + (" x rows" if x_rows else "")
                          + (" staged" if staged else "")
                          + (f" consumers dequant {ws.CONSUMER_UNITS}" if ws.CONSUMER_UNITS
                             else "")), label
    kernel = sch.mod["main"].with_attr("global_symbol", "main")
    src = _source(tvm.compile(tvm.IRModule({"main": kernel}), target=target), "cuda")
    assert "tvm_lite_bar_arrive(" in src and "tvm_lite_cp_async16(" in src
    assert ("tvm_lite_st_f16x2(" in src) == bool(paired or staged)
    assert ("tvm_lite_st_v4(" in src) == bool(staged)
    TM, TN = (tile or wg.TILE)[:2]
    KS = int(re.search(r"split-K (\d+)", label).group(1))  # as planned (a tile may leave it out)
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, (TM, TN, KS), 9, tmp_path, group)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", [WGMMA_WS_CPU_CASES[i] for i in (2, 8, 18, 20)])
def test_paired_partials_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path, monkeypatch):
    """``PAIR_PARTIALS``: the warp-specialised kernel's split-K partials stored two columns an
    8-byte store (K in two: 128 x 128, 64 x 64 at int4, the deep ring at 128 x 256, 192-column
    tiles) -- every store of the split kernel paired, and the sum right: the CUDA C run on the
    CPU against numpy."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    monkeypatch.setattr(ws, "PAIR_PARTIALS", True)
    fmt, k, n, m, epilogue, tile, stages = case[:7]
    w_buffers = case[8] if len(case) > 8 else None
    target = parse_target(WGMMA_TARGET)
    func = _dequant_gemv(fmt, k, n, epilogue, lead=(1, m), group=case[7] if len(case) > 7 else 32)
    with target:
        sch = ws.ws_gemm_kernel(func, target, CUDA, tile, stages, w_buffers=w_buffers)
    kernel = sch.mod["main"].with_attr("global_symbol", "main")
    src = _source(tvm.compile(tvm.IRModule({"main": kernel}), target=target), "cuda")
    assert "tvm_lite_st_f32x2(" in src
    assert not re.search(r"\bws_ptr\[[^;]*\] = acc", src), "a partial stored unpaired"
    test_warp_specialised_wgmma_gemm_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path)


# (fmt, K, N (output columns), M, act, tile, stages, w_buffers): the wide defaults' tile and ring
# (two consumer warpgroups, one output vector from each gate/up vector pair, two rows a warp
# instruction), partial row tiles; one warpgroup at N 128 (four rows an instruction)
GATED_WS_CPU_CASES = [("e0m4", 256, 128, 150, "silu", (128, 256), 5, 2),
                      ("int4", 128, 64, 37, "gelu", (64, 128), 3, None),
                      # 192-column tiles: 12 output vectors a row, 24 of a warp's 32 lanes store
                      ("e0m4", 256, 192, 150, "silu", (128, 192), 4, None),
                      # 256 x 128: four consumer warpgroups (timed in the thirty-ninth session: slower
                      # than the rule's 128 x 256 at every shape; kept as the 4-warpgroup case)
                      ("e0m4", 256, 256, 300, "silu", (256, 128), 4, 2)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("fmt,k,n,m,act,tile,stages,w_buffers", GATED_WS_CPU_CASES)
def test_gated_warp_specialised_gemm_cuda_c_run_on_the_cpu_matches_numpy(
        fmt, k, n, m, act, tile, stages, w_buffers, tmp_path):
    """The gated GEMM as the warp-specialised kernel builds it (staged stores: the tile's fp16
    gate and up columns through shared memory, then each thread ``act(gate) * up`` on one
    vector of 8 gate columns and the up vector after it, one 16-byte store), run on the CPU
    against numpy; without staged stores it declines (the mma.sync kernel takes it)."""
    from tvm_lite.bench.kernels import gated_gemm_func
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    target = parse_target(WGMMA_TARGET)
    func = gated_gemm_func(fmt, [1, m], k, n, act)
    with target:
        sch = ws.ws_gemm_kernel(func, target, CUDA, tile, stages, w_buffers=w_buffers,
                                staged_stores=True)
        with pytest.raises(MatchError, match="staged"):
            ws.ws_gemm_kernel(func, target, CUDA, tile, stages, w_buffers=w_buffers)
    assert " staged" in str(sch.mod["main"].attrs["tvm_lite.gemm"])
    kernel = sch.mod["main"].with_attr("global_symbol", "main")
    src = _source(tvm.compile(tvm.IRModule({"main": kernel}), target=target), "cuda")
    assert "tvm_lite_bar_arrive(" in src and "tvm_lite_st_v4(" not in src
    _check_gated_c_on_cpu(src, fmt, k, n, m, act, tile, tmp_path)


# the consumers' share of the dequant (CONSUMER_UNITS = 1): 128 x 256 (2 vectors a producer
# thread, 1 a consumer) with 3 stages, the deep ring with pairs and X by rows, staged outputs,
# K split with int4 and a residual; one consumer warpgroup (64 x 128, a group spanning two
# slices); 192 columns (1 and 1); the gated store
CONSUMER_DEQUANT_CASES = [WGMMA_WS_CPU_CASES[i] for i in (3, 4, 12, 14, 18, 19)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", CONSUMER_DEQUANT_CASES + [GATED_WS_CPU_CASES[0]])
def test_consumer_dequant_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path, monkeypatch):
    """``CONSUMER_UNITS``: the consumers dequantize their share of each slice (between FULL and
    their wgmmas, meeting at the consumers' barrier before the MMAs and after the wait for the
    slice before), the producer the rest: the CUDA C run on the CPU against numpy."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    monkeypatch.setattr(ws, "CONSUMER_UNITS", 1)
    if case in GATED_WS_CPU_CASES:
        test_gated_warp_specialised_gemm_cuda_c_run_on_the_cpu_matches_numpy(*case, tmp_path)
    else:
        test_warp_specialised_wgmma_gemm_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path)


def test_consumer_dequant_needs_a_share_left_to_the_producer(monkeypatch):
    """A consumers' share asked of a tile where it leaves the producer threads none (128 x 128:
    256 vectors a slice, 256 consumer threads) or no whole one is refused, naming the option;
    the module default (``CONSUMER_UNITS``) applies only where it fits, the other tiles keep
    the producer's whole dequant."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    target = parse_target(WGMMA_TARGET)
    func = _dequant_gemv("e0m4", 512, 128, None, lead=(1, 70))
    label = lambda tile, **kw: str(ws.ws_gemm_kernel(  # noqa: E731
        func, target, CUDA, tile, 4, **kw).mod["main"].attrs["tvm_lite.gemm"])
    with target:
        with pytest.raises(MatchError, match="consumer_units=1"):
            ws.ws_gemm_kernel(func, target, CUDA, (128, 128), 4, consumer_units=1)
        with pytest.raises(MatchError, match="consumer_units=3"):
            ws.ws_gemm_kernel(func, target, CUDA, (64, 128), 4, consumer_units=3)
        assert label((64, 128), consumer_units=1).endswith(" consumers dequant 1")
        monkeypatch.setattr(ws, "CONSUMER_UNITS", 1)
        assert label((64, 128)).endswith(" consumers dequant 1")
        assert "consumers dequant" not in label((128, 128))


def test_cuda_source_hook_puts_cluster_dims_on_the_kernels_that_ask():
    """``cuda_cluster.add_cluster_dims``: ``__cluster_dims__`` on the declaration and the
    definition of each kernel that calls a marker, nothing on the others; two sizes in one
    kernel is an error; the hook is registered once the GEMM schedules are imported."""
    import tvm_ffi

    from tvm_lite.schedules import cuda_cluster as cc
    from tvm_lite.schedules import gpu_gemm_wgmma_ws  # noqa: F401  (registers the hook)

    mark = cc.marker((1, 1, 2))
    src = (cc.marker_source((1, 1, 2))
           + 'extern "C" __global__ void __launch_bounds__(384) a_kernel(float* x);\n'
           + 'extern "C" __global__ void b_kernel(float* x);\n'
           + 'extern "C" __global__ void __launch_bounds__(384) a_kernel(float* x) {\n'
           + f"  {mark}();\n}}\n"
           + 'extern "C" __global__ void b_kernel(float* x) {\n  x[0] = 1;\n}\n')
    out = cc.add_cluster_dims(src)
    assert out.count("void __cluster_dims__(1, 1, 2) __launch_bounds__(384) a_kernel(") == 2
    assert "__cluster_dims__(1, 1, 2) b_kernel" not in out and out.count("void b_kernel(") == 2
    assert cc.add_cluster_dims(src.replace(mark, "tvm_lite_other")) == src.replace(
        mark, "tvm_lite_other")
    two = src.replace(f"  {mark}();", f"  {mark}();\n  {cc.marker((1, 1, 4))}();")
    with pytest.raises(ValueError, match="a_kernel asks for clusters of"):
        cc.add_cluster_dims(two)
    assert tvm_ffi.get_global_func(cc.POSTPROC, allow_missing=True) is not None


# (fmt, K, N, M, epilogue, tile (TM, TN, KS), stages, W slots, X by rows): the split K summed in
# a cluster of 2 and of 4 workgroups (partial row tiles, the residual epilogue on the summed
# rows), int4 at one consumer warpgroup; ("mid", SMs) as the tile: mid_gemm_kernel's plan for a
# GPU of that many SMs (N = 1152 at M = 512: 128 x 192 tiles split in two on 48 SMs, 64 x 192
# tiles split in two on 100)
CLUSTER_CPU_CASES = [("e0m4", 1024, 128, 40, "residual", (128, 128, 2), 4, 2, True),
                     ("e0m4", 1024, 128, 200, None, (128, 128, 4), 3, None, False),
                     ("int4", 512, 64, 70, "residual", (64, 64, 4), 3, None, False),
                     ("e0m4", 1024, 1152, 150, None, ("mid", 48), 4, None, False),
                     ("e0m4", 1024, 1152, 100, "residual", ("mid", 100), 4, None, False),
                     # MID_TWO_A_SM's tile: 64 x 128, 3 stages, in pairs
                     ("e0m4", 1024, 256, 100, "residual", (64, 128, 2), 3, None, False)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", CLUSTER_CPU_CASES)
def test_cluster_summed_gemm_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path):
    """The warp-specialised GEMM with its split K summed in a thread-block cluster
    (``cluster_sum``) run on the CPU (tests/mma_on_cpu.py: a cluster's workgroups at once, each
    with its own shared memory, ``barrier.cluster``, distributed shared-memory loads), against
    numpy: built with ``__cluster_dims__(1, 1, KS)``, no second kernel."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    fmt, k, n, m, epilogue, tile, stages, w_buffers, x_rows = case
    target = parse_target(WGMMA_TARGET)
    func = _dequant_gemv(fmt, k, n, epilogue, lead=(1, m))
    with target:
        if tile[0] == "mid":  # the default rule's plan for a mid GEMM at 512 tokens
            gpu = dataclasses.replace(CUDA, compute_units=tile[1])
            sch = ws.mid_gemm_kernel(func, target, gpu)
        else:
            sch = ws.ws_gemm_kernel(func, target, CUDA, tile, stages, w_buffers=w_buffers,
                                    x_rows=x_rows, cluster_sum=True)
    label = str(sch.mod["main"].attrs["tvm_lite.gemm"])
    TM, TN, KS = (int(v) for v in re.search(r"(\d+)x(\d+) split-K (\d+)", label).groups())
    assert label.endswith(" cluster") and KS > 1, label
    if tile[0] == "mid":
        assert (TM, TN, KS) == ((128, 192, 2) if tile[1] == 48 else (64, 192, 2)), label
    kernel = sch.mod["main"].with_attr("global_symbol", "main")
    src = _source(tvm.compile(tvm.IRModule({"main": kernel}), target=target), "cuda")
    assert f"__cluster_dims__(1, 1, {KS})" in src and "tvm_lite_ld_dsmem_f32x4(" in src
    assert src.count("__global__") == 2  # one kernel (declared, defined): no sum kernel
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, (TM, TN, KS), 9, tmp_path, 32)


# -- prefill GEMMs planned by prompt length (gpu_gemm_mma.PLAN_LENGTHS) --------------------------
def test_plans_by_prompt_length_pick_a_kernel_on_the_host():
    """With ``lengths`` the tensor-core GEMMs (mma.sync, the warp-specialised and the
    W-in-registers kernels) get one kernel a distinct plan, chosen by M on the host: each
    branch's kernels are those of its length's plan built alone (the same TIR), the conditions
    cut at the midpoints (384, 1280), a plan shared by neighbouring lengths is one branch, and a
    static M or no lengths leave the single PLAN_M kernel; the default is PLAN_LENGTHS'."""
    from tvm_lite.schedules import gpu_gemm_mma as mg
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    assert mg.lengths_for("n", (2048, 256, 512)) == [
        (256, "n <= T.int64(384)"), (512, "n <= T.int64(1280)"), (2048, None)]
    assert mg.lengths_for("70", (256, 512)) == [(mg.PLAN_M, None)]
    assert mg.lengths_for("n", ()) == [(mg.PLAN_M, None)]
    a90 = parse_target(WGMMA_TARGET)
    lengths = (256, 512, 2048)

    def branches(stmt, conds=()):
        """[(conditions, statement)] of the host's if/else chain."""
        if isinstance(stmt, tirx.IfThenElse):
            return (branches(stmt.then_case, conds + (str(stmt.condition),))
                    + branches(stmt.else_case, conds + ("else",)))
        return [(conds, stmt)]

    def first(stmt, kind):
        """The first ``kind`` statement at the top of ``stmt`` (past declarations)."""
        while not isinstance(stmt, kind):
            stmt = (next(x for x in stmt.seq if isinstance(x, (kind, tirx.IfThenElse,
                                                                tirx.For)))
                    if isinstance(stmt, tirx.SeqStmt) else stmt.body)
        return stmt

    cases = [  # (kernel, K, N, epilogue, the plans' labels' start by length)
        (lambda f, **kw: mg.mma_gemm_kernel(f, a90, CUDA, **kw), 2048, 2048, "residual",
         ["mma_m16n8k16 128x128 split-K 4", "mma_m16n8k16 128x128 split-K 2",
          "mma_m16n8k16 128x128 split-K 1"]),
        (lambda f, **kw: ws.deep_gemm_kernel(f, a90, CUDA, **kw), 8192, 2048, "residual",
         ["wgmma_m64n256k16 128x256 split-K 8", "wgmma_m64n256k16 128x256 split-K 4",
          "wgmma_m64n256k16 128x256 split-K 1"]),
        (lambda f, **kw: wr.wreg_gemm_kernel(f, a90, CUDA, None, 4, **kw), 2048, 8192, None,
         ["wgmma_m64n128k16 128x128 split-K 1", "wgmma_m64n256k16 256x128 split-K 1"]),
        # a mid GEMM (q+k+v): the cluster-summed kernel at 256 (64-row tiles) and 512, mma.sync's
        # plan at 2048
        (lambda f, **kw: ws.mid_gemm_kernel(f, a90, CUDA, **kw), 2048, 3072, None,
         ["wgmma_m64n192k16 64x192 split-K 2 warp-specialised x4 cluster",
          "wgmma_m64n192k16 128x192 split-K 2 warp-specialised x4 cluster",
          "mma_m16n8k16 128x128 split-K 1"])]
    for build_kernel, k, n, epilogue, starts in cases:
        func = _dequant_gemv("e0m4", k, n, epilogue, lead=(1, DYN))
        with a90:
            one = build_kernel(func, lengths=())
            by = build_kernel(func, lengths=lengths)
            default = build_kernel(func)
            static = build_kernel(_dequant_gemv("e0m4", k, n, epilogue, lead=(1, 300)),
                                  lengths=lengths)
        label = str(by.mod["main"].attrs["tvm_lite.gemm"])
        assert label.startswith(starts[-1]), label
        for start in starts[:-1]:
            assert f": {start}" in label, (start, label)
        assert "T.int64" not in label and "if n <= 384" in label, label
        assert str(one.mod["main"].attrs["tvm_lite.gemm"]).count("split-K") == 1
        assert mg.PLAN_LENGTHS == lengths and default.mod["main"].script() == by.mod["main"].script()
        assert str(static.mod["main"].attrs["tvm_lite.gemm"]).count("split-K") == 1
        got = branches(first(by.mod["main"].body, tirx.IfThenElse))
        assert [c for c, _ in got][0] == ("n <= T.int64(384)",), got
        assert len(got) == len(starts)
        plans = mg.lengths_for("n", lengths)
        alone = {}
        for length, _ in plans:  # each length's plan built alone
            with a90:
                try:
                    sch = build_kernel(func, lengths=(length,))
                except MatchError:  # the mid GEMM's mma.sync lengths
                    sch = mg.mma_gemm_kernel(func, a90, CUDA, lengths=(length,))
            alone.setdefault(str(sch.mod["main"].attrs["tvm_lite.gemm"]), sch)
        for (_, stmt), start in zip(got, starts):
            match = [sch for lab, sch in alone.items() if lab.startswith(start)]
            assert match, (start, list(alone))
            def text(nest):  # the kernels as TVMScript, less the workspace's size
                return [ln for ln in str(nest).splitlines() if not ln.strip().startswith("ws = ")]

            mine = first(match[0].mod["main"].body, tirx.For)  # its first thread binding
            assert text(first(stmt, tirx.For)) == text(mine), start


@pytest.mark.parametrize("k, n, want", [
    # SmolLM2's gate+up: 24 workgroups of 128 x 256 at 256 tokens, 48 at 512: mma.sync there
    # (at 256 in 32-row tiles: its K of 9 slices does not split in two, UNSPLIT_CLUSTER_WAYS)
    (576, 3072, ["warp-specialised", "mma_m16n8k16 32x64 split-K 1", "mma_m16n8k16 128x64"]),
    # Llama-1B's gate+up and down fill the SMs at every planned length
    (2048, 16384, ["warp-specialised"]),
    (8192, 2048, ["split-K 1 warp-specialised", "split-K 8 warp-specialised",
                  "split-K 4 warp-specialised"])])
def test_deep_and_wide_gemms_take_mma_sync_where_their_grid_leaves_sms_idle(k, n, want,
                                                                            monkeypatch):
    """``DEEP_WIDE_FILL_SMS``: a deep or wide GEMM takes the warp-specialised kernel only at the
    planned lengths (256, 512, 2048) where its grid gives at least ``MIN_WAVE`` of the SMs (132)
    a workgroup, mma.sync's plan elsewhere; with the switch off, the warp-specialised kernel
    everywhere; a GEMM no length of which fills the SMs is not taken at all."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    target = parse_target(WGMMA_TARGET)
    with target:
        label = str(ws.deep_gemm_kernel(_mma_func("e0m4", k, n, None), target, CUDA)
                    .mod["main"].attrs["tvm_lite.gemm"])
        parts = label.split("; ")
        assert len(parts) == len(want) and all(w in p for w, p in zip(want, parts)), label
        monkeypatch.setattr(ws, "DEEP_WIDE_FILL_SMS", False)
        off = str(ws.deep_gemm_kernel(_mma_func("e0m4", k, n, None), target, CUDA)
                  .mod["main"].attrs["tvm_lite.gemm"])
        assert "mma_m16n8k16" not in off
        monkeypatch.setattr(ws, "DEEP_WIDE_FILL_SMS", True)
        with pytest.raises(MatchError, match="no planned prompt length fills the SMs"):
            ws.deep_gemm_kernel(_mma_func("e0m4", k, n, None), target,
                                dataclasses.replace(CUDA, compute_units=100_000))


def test_mid_gemms_take_two_workgroups_a_sm_where_on(monkeypatch):
    """``MID_TWO_A_SM``: Gemma-2B's merged q+k+v (K 2048, N 2560), which no one-a-SM tile fits at
    256 tokens, takes 64 x 128 split in two (160 workgroups on 132 SMs) at 3 stages, two of
    which fit a SM's shared memory; Llama-1B's (N 3072) keeps its one-a-SM plan; off, Gemma-2B's
    q+k+v is not taken (mma.sync)."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    target = parse_target(WGMMA_TARGET)

    def plan(n):
        with target:
            return str(ws.mid_gemm_kernel(_mma_func("e0m4", 2048, n, None), target, CUDA)
                       .mod["main"].attrs["tvm_lite.gemm"])

    with pytest.raises(MatchError, match="no planned prompt length"):
        plan(2560)
    llama = plan(3072)
    monkeypatch.setattr(ws, "MID_TWO_A_SM", True)
    assert "if n <= 384: wgmma_m64n128k16 64x128 split-K 2 warp-specialised x3 cluster;" in plan(2560)
    assert plan(3072) == llama
    assert 2 * (ws.shared_bytes(ws.mma_gemm.match_gemm(s_tir.Schedule(_mma_func(
        "e0m4", 2048, 2560, None)), CUDA), 64, 128, ws.MID_TWO_A_SM_STAGES) + 1024) <= ws.SM_SHARED


# 256-token tiles gave NaN on an H100 (twenty-first session: gate/up at M = 1 and 512), where the
# CPU emulation of the same CUDA C matches numpy; 128-token tiles were right (bench.prefill).
NAN_ON_H100 = pytest.mark.xfail(reason="256-token tiles: NaN on an H100, not found by the CPU "
                                "emulation (README, twenty-first session)", strict=False)


@HOPPER
@pytest.mark.parametrize("kernel, k, n, epilogue", [
    ("mma", 2048, 2048, "residual"), ("deep", 8192, 2048, "residual"), ("wide", 2048, 8192, None),
    ("wide", 576, 3072, None),  # SmolLM2's gate+up: mma.sync at 256 and 512 (DEEP_WIDE_FILL_SMS)
    # (its 2048 plan takes 256-token tiles; failed on the H100 in the twenty-eighth session too)
    pytest.param("wreg", 2048, 8192, None, marks=NAN_ON_H100), ("mid", 2048, 3072, None)])
def test_plans_by_prompt_length_run_correctly_on_a_hopper_gpu(kernel, k, n, epilogue):
    """The GEMMs planned by prompt length on the GPU against numpy at lengths in every branch
    (M 37 and 300: the 256 plan; 512 and 1000: 512's; 1300 and 2048: 2048's)."""
    rule = GPUPrefillGEMM(CUDA, plan_lengths=(256, 512, 2048),
                          **({"wgmma": True, "wgmma_w_in_registers": 4} if kernel == "wreg"
                             else {}))
    ex = build(_mma_func("e0m4", k, n, epilogue), parse_target(WGMMA_TARGET), [rule])
    _check_gemm_on_gpu(ex, "e0m4", k, n, epilogue, (37, 300, 512, 1000, 1300, 2048))


@HOPPER
@pytest.mark.parametrize("k, n, act", [(2048, 8192, "silu"),  # Llama-1B's gate+up
                                       (2048, 16384, "gelu"),  # Gemma-2B's
                                       (576, 1536, "silu")])  # SmolLM2's (mma.sync at 256, 512)
def test_gated_gemm_plans_run_correctly_on_a_hopper_gpu(k, n, act):
    """The gate+up GEMM storing ``act(gate) * up`` (gate and up interleaved; the warp-specialised
    kernel's staged stores, mma.sync's where a length's plan takes it) against numpy on the
    GPU at lengths in every planned branch."""
    from tvm_lite.bench.kernels import gated_gemm_func

    rule = GPUPrefillGEMM(CUDA, plan_lengths=(256, 512, 2048))
    ex = build(gated_gemm_func("e0m4", [1, DYN], k, n, act), parse_target(WGMMA_TARGET), [rule])
    dev = cuda_device()
    rng = np.random.default_rng(5)
    arrays = _half2_arrays("e0m4", k, 2 * n, rng)
    for seq in (37, 300, 512, 1000, 1300, 2048):
        x = (rng.standard_normal((1, seq, k)) * 0.5).astype(np.float16)
        out = tvm.runtime.empty((1, seq, n), "float16", dev)
        ex.mod["main"](*[tvm.runtime.tensor(a, dev) for a in (x, *arrays.values())], out)
        ref = _gated_reference(_gemm_reference("e0m4", x, arrays, k, 2 * n, None, None), n, act)
        err = np.abs(out.numpy().reshape(seq, n).astype(np.float32) - ref).max() / np.abs(ref).max()
        assert err < 1e-2, (k, n, act, seq, err)


@HOPPER
@pytest.mark.parametrize("k, n, tile, epilogue", [
    (8192, 2048, (128, 256), "residual"),  # a down projection: K split 8 and 4 ways
    (2048, 3072, (128, 192), None)])  # a merged q+k+v: 4 and 2 ways
def test_cluster_summed_split_k_runs_correctly_on_a_hopper_gpu(k, n, tile, epilogue):
    """The warp-specialised GEMM with its split K's partials added up in a thread-block cluster
    (``cluster_sum``) against numpy at lengths in every planned branch; its kernels are built
    with ``__cluster_dims__`` and there is no second (sum) kernel."""
    rule = GPUPrefillGEMM(CUDA, wgmma=True, wgmma_tile=tile, wgmma_specialised=4,
                          wgmma_w_buffers=2, wgmma_x_rows=True, wgmma_cluster_sum=True,
                          plan_lengths=(256, 512, 2048))
    ex = build(_mma_func("e0m4", k, n, epilogue), parse_target(WGMMA_TARGET), [rule])
    src = _source(ex, "cuda")
    assert "__cluster_dims__(1, 1, 4)" in src and "tvm_lite_ld_dsmem_f32x4(" in src
    assert "ws_ptr" not in src  # no fp32 partials in global memory
    _check_gemm_on_gpu(ex, "e0m4", k, n, epilogue, (37, 300, 512, 1000, 1300, 2048))


@HOPPER
@pytest.mark.parametrize("k, n, epilogue", [
    (576, 576, "residual"), (1536, 576, "residual"), (576, 960, None),  # SmolLM2's o, down, q+k+v
    (2048, 2560, None)])  # Gemma-2B's q+k+v: K in two at 256 (UNSPLIT_CLUSTER_WAYS) and 512
def test_mma_cluster_sum_runs_correctly_on_a_hopper_gpu(k, n, epilogue, monkeypatch):
    """``gpu_gemm_mma.CLUSTER_SUM``: the plans whose split K it adds up in a thread-block
    cluster -- one kernel a GEMM -- against numpy on the GPU at lengths in every planned branch:
    SmolLM2's narrow tiles at 256 tokens (K in three), its down at 512 and Gemma-2B's q+k+v at
    256 and 512 (K in two)."""
    from tvm_lite.schedules import gpu_gemm_mma

    monkeypatch.setattr(gpu_gemm_mma, "CLUSTER_SUM", True)
    rule = GPUPrefillGEMM(CUDA, plan_lengths=(256, 512, 2048))
    ex = build(_mma_func("e0m4", k, n, epilogue), parse_target(WGMMA_TARGET), [rule])
    assert "__cluster_dims__(1, 1, " in _source(ex, "cuda")
    _check_gemm_on_gpu(ex, "e0m4", k, n, epilogue, (37, 200, 256, 300, 512, 700))


_TRAP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import tvm_ffi
import test_gpu_schedules as t
from tvm_lite import parse_target
from tvm_lite.schedules import cuda_cluster
# another library's hook replaces tvm_lite's: the kernel is built without __cluster_dims__
tvm_ffi.register_global_func(cuda_cluster.POSTPROC, lambda code, target: code, override=True)
rule = t.GPUPrefillGEMM(t.CUDA, wgmma=True, wgmma_tile=(128, 192), wgmma_specialised=4,
                        wgmma_w_buffers=2, wgmma_x_rows=True, wgmma_cluster_sum=True,
                        plan_lengths=(512,))
ex = t.build(t._mma_func("e0m4", 2048, 3072, None), parse_target(t.WGMMA_TARGET), [rule])
assert "__cluster_dims__" not in t._source(ex, "cuda")
try:
    t._check_gemm_on_gpu(ex, "e0m4", 2048, 3072, None, (512,))
except AssertionError as e:
    print("OUTCOME: wrong result", e)
except Exception as e:
    print("OUTCOME: launch error", type(e).__name__, str(e)[:300])
else:
    print("OUTCOME: ran")
"""


@HOPPER
def test_cluster_kernel_built_without_its_cluster_size_fails_to_launch(tmp_path):
    """A cluster-summed GEMM whose ``__cluster_dims__`` went missing (another CUDA source hook
    replaced tvm_lite's) stops with a launch error -- its marker traps -- rather than returning
    a wrong result. In a child process: the trap leaves its CUDA context unusable."""
    import os
    import sys

    script = tmp_path / "trap.py"
    script.write_text(_TRAP_SCRIPT.format(tests=os.path.dirname(__file__)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600)
    out = run.stdout + run.stderr
    assert "OUTCOME: wrong result" not in out and "OUTCOME: ran" not in out, out[-2000:]
    # On an H100 (twenty-seventh session) the trap surfaces at the next synchronisation, as
    # TVM's error escaping to std::terminate: the child aborts (-6) printing CUDA's "unspecified
    # launch failure" (cudaErrorLaunchFailure, 719). Either form names the launch failure; a
    # crash for another reason does not pass.
    assert ("OUTCOME: launch error" in out or "cudaErrorLaunchFailure" in out
            or "unspecified launch failure" in out), (run.returncode, out[-2000:])


# -- the GEMM with W dequantized in registers (schedules/gpu_gemm_wgmma_wreg.py) -----------------
# (fmt, K, N, M, epilogue, tile (tokens, features[, KS]), stages, group, X by rows): the default
# tile with M past one tile and short of the next; one consumer warpgroup; K split with the
# residual add in the sum kernel (and X by rows); 4 consumer warpgroups; groups of 16, 64 and
# 128 (two scale rows a slice, one, one every other slice); two stages (the ring refilled each
# slice) and fewer slices than stages (K 128)
WREG_CPU_CASES = [("e0m4", 512, 128, 300, None, (256, 128), 4, 32, False),
                  ("int4", 256, 64, 37, "residual", (64, 64), 3, 32, False),
                  ("e0m4", 1024, 128, 40, "residual", (128, 128, 2), 3, 64, True),
                  ("e0m4", 256, 256, 130, None, (128, 256), 2, 16, False),
                  ("e0m4", 512, 128, 77, None, (64, 128), 5, 128, False),
                  ("int4", 128, 128, 20, None, (64, 128), 4, 32, False)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", WREG_CPU_CASES)
def test_w_in_registers_gemm_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path):
    """The kernel with W dequantized in registers, its CUDA C run on the CPU
    (tests/mma_on_cpu.py: wgmma with A from registers, mma.sync's A fragment, and B K-major;
    the A fragment's dequant emulated; named barriers; cp.async landing at its waits), against
    numpy: the features permuted in the A rows and put back by the stores, the packed words and
    scale rows each thread reads, the ring, the two A sets, split-K and the epilogue."""
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr

    fmt, k, n, m, epilogue, tile, stages, group, x_rows = case
    target = parse_target(WGMMA_TARGET)
    func = _dequant_gemv(fmt, k, n, epilogue, lead=(1, m), group=group)
    with target:
        sch = wr.wreg_gemm_kernel(func, target, CUDA, tile, stages, x_rows)
    label = str(sch.mod["main"].attrs["tvm_lite.gemm"])
    assert f"{tile[0]}x{tile[1]} " in label and f"W in registers x{stages}" in label, label
    kernel = sch.mod["main"].with_attr("global_symbol", "main")
    src = _source(tvm.compile(tvm.IRModule({"main": kernel}), target=target), "cuda")
    assert "tvm_lite_dq_afrag(" in src and f"wgmma_rs_m64n{tile[0]}k16(" in src
    assert "tvm_lite_dq_kmajor(" not in src  # no fp16 W in shared memory
    plain = epilogue is None and "split-K 1" in label
    assert ("tvm_lite_st_f16x2(" in src) == plain  # two features a store where nothing follows
    KS = int(re.search(r"split-K (\d+)", label).group(1))
    _check_gemm_c_on_cpu(src, fmt, k, n, m, epilogue, (tile[0], tile[1], KS), 11, tmp_path, group)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
def test_w_in_registers_dequant_helper_agrees_with_its_emulation(tmp_path):
    """The CUDA of ``tvm_lite_dq_afrag`` (PRMT selectors computed from the byte, LOP3) compiled
    for the host -- ``__byte_perm`` and ``lop3`` as the PTX ISA defines them, fp16 arithmetic
    rounded per operation -- gives the same A fragment as the emulation the kernel test runs,
    for every byte, on random words, zeros and scales."""
    from mma_on_cpu import SHIM

    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr

    cuda = wr.HELPERS["tvm_lite_dq_afrag"].replace("__forceinline__ __device__", "static")
    cuda = cuda.replace("tvm_lite_dq_afrag(", "cuda_dq_afrag(")
    cuda = re.sub(r'asm\("lop3\.b32 %0, %1, %2, %3, 0xEA;" : "=r"\((\w+)\) : "r"\((\w+)\), '
                  r'"r"\((\w+)\), "r"\((\w+)\)\);', r"\1 = (\2 & \3) | \4;", cuda)
    assert "asm" not in cuda
    host = r"""
struct __half2 { half x, y; };
static __half2 __hsub2(__half2 a, __half2 b) { return {(half)(a.x - b.x), (half)(a.y - b.y)}; }
static __half2 __hmul2(__half2 a, __half2 b) { return {(half)(a.x * b.x), (half)(a.y * b.y)}; }
static unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = x | ((unsigned long long)y << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= ((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
"""
    main = r"""
int main() {
  unsigned seed = 12345;
  auto rnd = [&] { seed = seed * 1664525u + 1013904223u; return seed; };
  int bad = 0;
  for (int it = 0; it < 4000; ++it) {
    unsigned w[2] = {rnd(), rnd()}, b = it % 2;
    half z[2] = {(half)(1024 + rnd() % 16), (half)(1024 + rnd() % 16)};
    half s[2] = {(half)((rnd() % 1000) * 1e-4f + 0.001f), (half)((rnd() % 1000) * 1e-4f)};
    unsigned z2 = __pack_half2(z[0], z[1]), s2 = __pack_half2(s[0], s[1]), a[4], e[4];
    cuda_dq_afrag(a, &w[0], &w[1], b, z2, s2);
    tvm_lite_dq_afrag(e, &w[0], &w[1], b, z2, s2);
    for (int i = 0; i < 4; ++i) bad += a[i] != e[i];
  }
  printf("%d\n", bad);
  return 0;
}
"""
    src = tmp_path / "dq.cc"
    src.write_text(SHIM + host + cuda + main)
    exe = tmp_path / "dq"
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", "-fno-strict-aliasing",
                          str(src), "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout.strip() == "0"


def test_w_in_registers_gemm_builds_as_asked_and_compiles_without_spills(tmp_path):
    """``GPUPrefillGEMM(wgmma_w_in_registers=S)`` builds it for sm_90a at the asked tile
    (gate/up and the down projection with its residual add and K split); nvcc (if here) builds
    both without spills and without serializing the wgmmas (``setmaxnreg`` gives the consumers
    232 registers). Refused, naming why: a group it cannot take, too many stages."""
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr

    a90 = parse_target(WGMMA_TARGET)
    with pytest.raises(MatchError, match="quantization group 8"):
        with a90:
            wr.wreg_gemm_kernel(_dequant_gemv("e0m4", 256, 128, lead=(1, 64), group=8), a90,
                                CUDA, (64, 128), 3)
    with pytest.raises(MatchError, match="stages=8"):
        with a90:
            wr.wreg_gemm_kernel(_dequant_gemv("e0m4", 256, 128, lead=(1, 64)), a90, CUDA,
                                (64, 128), 8)
    srcs = []
    for k, n, epilogue in ((2048, 8192, None), (8192, 2048, "residual")):
        rule = GPUPrefillGEMM(CUDA, wgmma=True, wgmma_tile=wr.TILE, wgmma_w_in_registers=4)
        func = _mma_func("e0m4", k, n, epilogue)
        label = str(_schedule(rule, func, a90).mod["main"].attrs["tvm_lite.gemm"])
        assert "256x128" in label and "W in registers x4" in label, label
        srcs.append(_source(build(func, a90, [rule]), "cuda"))
    assert all("setmaxnreg.inc.sync.aligned.u32 232" in s for s in srcs)
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    for i, src in enumerate(srcs):
        path = tmp_path / f"wreg{i}.cu"
        path.write_text(src)
        res = subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o",
                              str(tmp_path / f"wreg{i}.cubin"), str(path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
        assert spills and all(v == "0" for v in spills), res.stderr[-2000:]
        assert "serialized" not in res.stderr, res.stderr[-2000:]


def test_bench_wgmma_variants_build_their_kernels():
    """``bench.prefill --wgmma 128x256x3,128x256xws3``: the wgmma kernel with X by cp.async and
    the warp-specialised one, built for sm_90a; a ring too big for shared memory is refused."""
    from tvm_lite.bench.prefill import gemm_rules
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    rules, _ = gemm_rules(parse_target(TARGETS["cuda"]), (), [(128, 256, "3"), (128, 256, "ws3")])
    func = kernel_func("e0m4", [1, DYN], 2048, 8192)
    a90 = parse_target(WGMMA_TARGET)
    for name, marker in (("e0m4 wgmma 128x256 x3", "x3"), ("e0m4 wgmma 128x256 xws3",
                                                             "warp-specialised x3")):
        attrs = _schedule(rules[name][0], func, a90).mod["main"].attrs
        assert str(attrs["tvm_lite.gemm"]).endswith(marker), attrs["tvm_lite.gemm"]
    with pytest.raises(MatchError, match="shared memory"):
        ws.ws_gemm_kernel(func, a90, CUDA, (128, 256), 4)
    # fewer fp16 W slices than stages: a deeper ring in the same shared memory (5 stages and 2
    # W slices fit at 128 x 256, 6 do not), within the 16 named barriers
    rules, _ = gemm_rules(parse_target(TARGETS["cuda"]), (), [(128, 256, "ws5w2")])
    attrs = _schedule(rules["e0m4 wgmma 128x256 xws5w2"][0], func, a90).mod["main"].attrs
    assert str(attrs["tvm_lite.gemm"]).endswith("warp-specialised x5 w2"), attrs["tvm_lite.gemm"]
    with pytest.raises(MatchError, match="shared memory"):
        ws.ws_gemm_kernel(func, a90, CUDA, (128, 256), 6, w_buffers=2)
    with pytest.raises(MatchError, match="named barriers"):
        ws.ws_gemm_kernel(func, a90, CUDA, (128, 128), 6, w_buffers=3)
    # W in registers: 256 tokens x 128 features, 4 and 5 stages fit, 6 do not
    rules, _ = gemm_rules(parse_target(TARGETS["cuda"]), (),
                          [(256, 128, "wr4"), (256, 128, "wr5r"), (256, 128, "wr6")])
    for spec, ends in (("wr4", "W in registers x4"), ("wr5r", "W in registers x5 x rows")):
        rule = rules[f"e0m4 wgmma 256x128 x{spec}"][0]
        label = str(_schedule(rule, func, a90).mod["main"].attrs["tvm_lite.gemm"])
        assert label.endswith(ends), label
    with pytest.raises(MatchError, match="shared memory"):
        from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr
        wr.wreg_gemm_kernel(func, a90, CUDA, (256, 128), 6)


@pytest.mark.parametrize("tile, staging, dequant, mma", [
    ((128, 256), "ws3", "tvm_lite_dq_kmajor", "tvm_lite_wgmma_m64n256k16"),
    ((256, 128), "wr4", "tvm_lite_dq_afrag", "tvm_lite_gemm_wgmma_rs_m64n256k16")])
def test_bench_wgmma_ablations_leave_out_their_part_only(tile, staging, dequant, mma):
    """``bench.prefill --wgmma 128x256xws3-dequant`` (and ``256x128xwr4-dequant``; a
    diagnostic): each part of ``gpu_gemm_wgmma_ws.ABLATIONS`` leaves its own code out of the
    warp-specialised kernel, or of the one with W in registers, and nothing else; an unknown part
    is refused by name."""
    from tvm_lite.bench.prefill import gemm_rules
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    tm, tn = tile
    specs = [(tm, tn, staging)] + [(tm, tn, f"{staging}-{a}") for a in ws.ABLATIONS]
    rules, _ = gemm_rules(parse_target(TARGETS["cuda"]), (), specs)
    func = kernel_func("e0m4", [1, DYN], 2048, 8192)
    a90 = parse_target(WGMMA_TARGET)

    def source(name):
        sch = _schedule(rules[f"e0m4 wgmma {tm}x{tn} x{name}"][0], func, a90)
        return sch.mod["main"].script()

    def count(src):
        return {part: src.count(marker) for part, marker in (
            ("copy", "tvm_lite_cp_async16"), ("dequant", dequant), ("mma", mma),
            ("store", "== T.float32(3000"))}

    whole = count(source(staging))
    assert whole["store"] == 0 and all(whole[p] for p in ("copy", "dequant", "mma"))
    for part in ws.ABLATIONS:
        got = count(source(f"{staging}-{part}"))
        assert got[part] < whole[part] if part != "store" else got[part] > 0, (part, got)
        if part == "copy":  # the first S - 1 slices are still copied
            assert got["copy"] > 0
        assert {p: v for p, v in got.items() if p != part} == \
            {p: v for p, v in whole.items() if p != part}, (part, got, whole)
    with pytest.raises(ValueError, match="ablate: unknown nope"):
        ws.ws_gemm_kernel(func, a90, CUDA, (128, 256), 3, ablate=("nope",))
    with pytest.raises(ValueError, match="ablate: unknown nope"):
        wr.wreg_gemm_kernel(func, a90, CUDA, (256, 128), 4, ablate=("nope",))


@pytest.mark.parametrize("spec, says", [
    ("128x256xws3-nope", "only copy, dequant, mma, store"),
    ("128x256x3-dequant", "wrS kernel only"), ("128x256x5w2", "S, wsS, wsSwB"),
    ("128x256x3p", "S, wsS, wsSwB"), ("128x256x3r", "S, wsS, wsSwB"),
    ("128x256x3s", "S, wsS, wsSwB"), ("256x128xwr4p", "wrS or wrSr"),
    ("256x128xwr4w2", "wrS or wrSr"), ("256x128xwr4-nope", "only copy, dequant"),
    ("128x256x3d1", "S, wsS, wsSwB"), ("256x128xwr4d1", "wrS or wrSr"),
    ("128x256", "not TMxTNxS")])
def test_bench_prefill_names_a_bad_wgmma_spec(spec, says, capsys):
    """``bench.prefill --wgmma`` stops on a spec it cannot build, before any GPU work, saying
    which spec and what is allowed; ``--gemm-layers`` names the layers it knows."""
    from tvm_lite.bench.prefill import main, parse_wgmma_stages

    assert parse_wgmma_stages("ws5w2-copy-mma") == (True, 5, 2, False, ("copy", "mma"), False,
                                                    False, False, False, None)
    assert parse_wgmma_stages("ws3p") == (True, 3, None, True, (), False, False, False, False, None)
    assert parse_wgmma_stages("ws5w2pr") == (True, 5, 2, True, (), True, False, False, False, None)
    assert parse_wgmma_stages("ws5w2s") == (True, 5, 2, False, (), False, True, False, False, None)
    assert parse_wgmma_stages("ws4w2rc") == (True, 4, 2, False, (), True, False, False, True, None)
    assert parse_wgmma_stages("3") == (False, 3, None, False, (), False, False, False, False, None)
    assert parse_wgmma_stages("wr4") == (False, 4, None, False, (), False, False, True, False, None)
    assert parse_wgmma_stages("ws4w2rd1") == (True, 4, 2, False, (), True, False, False, False, 1)
    assert parse_wgmma_stages("wr5r").x_rows and parse_wgmma_stages("wr5r").w_in_registers
    with pytest.raises(SystemExit):
        main(["--parts", "gemm", "--wgmma", spec])
    err = capsys.readouterr().err
    assert spec in err and says in err, err
    with pytest.raises(SystemExit):
        main(["--parts", "gemm", "--gemm-layers", "gate"])
    assert "known: down;gate+up;gate,up;k,v;o;q;q+k+v" in capsys.readouterr().err


def test_bench_prefill_gemm_switches_set_constants_while_building(capsys):
    """``bench.prefill --gemm-switch NAME:MODULE.CONSTANT=VALUE``: a malformed or unknown
    constant stops the command before any build, naming it; a switch's variant is the sm_90a
    rules built with the constant set (here: a split K's partials in fp16), and the constant is
    put back after."""
    from tvm_lite.bench.kernels import kernel_plan
    from tvm_lite.bench.prefill import gemm_rules, main
    from tvm_lite.profile import model_switch, switched
    from tvm_lite.schedules import gpu_gemm_mma

    for spec, says in (("p:schedules.gpu_gemm_mma.NOPE=1", "has no NOPE"),
                       ("p:PARTIALS_FP16=True", "is not MODULE.CONSTANT")):
        with pytest.raises(SystemExit):
            main(["--parts", "gemm", "--gemm-switch", spec])
        assert says in capsys.readouterr().err
    rules, _ = gemm_rules(parse_target(TARGETS["cuda"]))
    a90 = parse_target(WGMMA_TARGET)
    deep = kernel_func("e0m4", [1, tirx.Var("n", "int64")], 8192, 2048)
    _, assignments = model_switch("p16:schedules.gpu_gemm_mma.PARTIALS_FP16=True")
    with switched(assignments):
        src = _source(build(deep, a90, rules["sm_90a"]), "cuda")
        plan = kernel_plan(deep, a90, rules["sm_90a"])
    assert not gpu_gemm_mma.PARTIALS_FP16 and "split-K 8" in plan
    assert "half* __restrict__ ws_ptr" in src
    assert "float* __restrict__ ws_ptr" in _source(build(deep, a90, rules["sm_90a"]), "cuda")


def test_bench_prefill_times_the_merged_projections_the_models_run():
    """``bench.prefill --parts gemm`` has each model's merged q/k/v and gate/up GEMMs (what
    MergeSharedInputProjections makes and the profile shows), next to the exported projections."""
    from tvm_lite.bench.prefill import gemm_layers

    llama = {name: (k, n) for _, name, k, n in gemm_layers(("llama-3.2-1b",))}
    assert llama["q+k+v"] == (2048, 3072) and llama["gate+up"] == (2048, 16384)
    assert llama["q"] == (2048, 2048) and "o" not in llama  # o has q's shape: timed once
    asked = gemm_layers(("llama-3.2-1b",), ("o", "down"))  # ... as o where q is not asked for
    assert [(name, k, n) for _, name, k, n in asked] == [("o", 2048, 2048), ("down", 8192, 2048)]
    smol = {name: (k, n) for _, name, k, n in gemm_layers(("smollm2-135m",))}
    assert smol["q+k+v"] == (576, 960) and smol["gate+up"] == (576, 3072)


def test_bench_nvtx_names_are_ncu_filters():
    """Each timed variant of the benches sits in an NVTX range whose name ncu's ``--nvtx-include
    "<name>/"`` can match: no spaces, slashes, ``@`` or parentheses (the README's ncu commands
    spell these names)."""
    from tvm_lite.bench.kernels import nvtx_name

    assert nvtx_name("gemm", "llama-3.2-1b", "gate,up", "e0m4 wgmma 128x256 xws3") == \
        "gemm:llama-3.2-1b:gate+up:e0m4_wgmma_128x256_xws3"
    assert nvtx_name("attention", "llama-3-8b (hd 128)", "n2048", "tree") == \
        "attention:llama-3-8b_hd_128:n2048:tree"
    assert nvtx_name("decode", "14-2-64", "m2048", "split-K") == "decode:14-2-64:m2048:split-K"
    assert nvtx_name("attention", "a/b@c", "q_regs.py") == "attention:a_b_c:q_regs.py"


def test_bench_prefill_table_shows_each_baselines_time_chunks_and_error():
    """A ``--baseline-kernel`` column of ``bench.prefill``'s attention table: the candidate's
    time over the tree's, its own chunked ratio, and its error against SDPA (a fast, wrong
    candidate shows as such)."""
    from tvm_lite.bench.prefill import format_tables

    row = dict(shape="llama-3.2-1b", heads=32, kv_heads=8, head_dim=64, n=2048, key_tile=None,
               m_tiles=None, tvm_lite_ms=0.124, tflops=110.0, sdpa_ms=0.06, sdpa_tflops=290.0,
               vs_sdpa=0.38, chunked_ratio=1.46, baselines={"wgmma": 0.093},
               baselines_chunked={"wgmma": 0.1395}, baselines_err={"wgmma": 0.25})
    table = format_tables({"attention": [row]})
    assert "wgmma: us (/ tvm_lite's), chunks / one call, err" in table
    assert "| 93.0 (0.75x), 1.50x, 2e-01 |" in table


def test_wgmma_gemm_is_taken_on_sm90a_only_and_compiles_without_spills(tmp_path):
    """The rule takes the wgmma kernel for 4-bit weights on ``sm_90a`` when asked (fp16 weights
    and ``sm_90`` keep the mma.sync kernel); nvcc builds it for sm_90a without spills."""
    from tvm_lite.schedules import gpu_gemm_wgmma as wg

    func = kernel_func("e0m4", [1, DYN], 2048, 8192)
    a90 = parse_target(WGMMA_TARGET)
    rule = GPUPrefillGEMM(CUDA, wgmma=True)
    assert "wgmma" in str(_schedule(rule, func, a90).mod["main"].attrs["tvm_lite.gemm"])
    assert "mma_m16n8k16" in str(_schedule(rule, func, parse_target(TARGETS["cuda"]))
                                 .mod["main"].attrs["tvm_lite.gemm"])
    fp16 = kernel_func("fp16", [1, DYN], 2048, 2048)
    assert "mma_m16n8k16" in str(_schedule(rule, fp16, a90).mod["main"].attrs["tvm_lite.gemm"])
    with pytest.raises(MatchError, match="sm_90a"):
        wg.wgmma_gemm_kernel(func, parse_target(TARGETS["cuda"]), CUDA)
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    src = _source(build(func, a90, [rule]), "cuda")
    path = tmp_path / "wgmma.cu"
    path.write_text(src)
    res = subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o",
                          str(tmp_path / "wgmma.cubin"), str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "0 bytes spill stores" in res.stderr, res.stderr[-2000:]


def test_default_rule_takes_w_in_registers_for_deep_and_wide_gemms_when_on(monkeypatch):
    """``gpu_gemm_wgmma_wreg.ENABLED`` (off until timed) puts the W-in-registers kernel where the
    default rule takes the warp-specialised one -- down and gate/up on sm_90a -- and nowhere
    else: square GEMMs, fp16 weights and sm_90 keep mma.sync; ``ENABLED_FOR`` with "other"
    gives it the square 4-bit ones too."""
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr

    a90 = parse_target(WGMMA_TARGET)

    def label(fmt, k, n, target=a90):
        return str(_schedule(GPUPrefillGEMM(CUDA), kernel_func(fmt, [1, DYN], k, n), target)
                   .mod["main"].attrs["tvm_lite.gemm"])

    assert "W in registers" not in label("e0m4", 8192, 2048)
    monkeypatch.setattr(wr, "ENABLED", True)
    for k, n in ((8192, 2048), (2048, 8192)):
        got = label("e0m4", k, n)
        assert got.startswith("wgmma_m64n256k16 256x128 ") and got.endswith(
            f"W in registers x{wr.STAGES}"), got
    for fmt, k, n, target in [("e0m4", 2048, 2048, a90), ("fp16", 8192, 2048, a90),
                              ("e0m4", 8192, 2048, parse_target(TARGETS["cuda"]))]:
        assert "mma_m16n8k16" in label(fmt, k, n, target), (fmt, k, n, target)
    monkeypatch.setattr(wr, "ENABLED_FOR", ("deep", "wide", "other"))  # q, o, k/v too
    assert "W in registers" in label("e0m4", 2048, 2048)
    assert "mma_m16n8k16" in label("fp16", 2048, 2048)  # (4-bit weights only)


def _tiny_e0m4(onnx_dir):
    """The tiny model (fp16) imported, its weights E0M4 (RTN, groups of 32), ready to build."""
    import tvm_lite
    from tvm_lite.artifact import weights_as_built
    from tvm_lite.quant import QuantConfig, quantize_module
    from tvm_lite.quant.quantize import tokenizer_of

    mod = tvm_lite.from_onnx(onnx_dir / "model.onnx")
    mod, _ = quantize_module(mod, QuantConfig("e0m4", "rtn", 32), tokenizer_of(onnx_dir),
                             progress=lambda *_: None)
    # (gate and up as halves, the default: the W-in-registers kernel stores no gated epilogue)
    return tvm_lite.detach_params(weights_as_built(mod, progress=None))[0]


def test_a_whole_model_takes_w_in_registers_where_on(tiny_decoder_fp16, monkeypatch):
    """A real model's sm_90a build (the tiny Llama in fp16, E0M4 weights) gives its wide GEMM
    (gate/up: K 64, N 256) the W-in-registers kernel when ``ENABLED``, and no GEMM of it
    otherwise: the kernel takes the pipeline's own PrimFuncs (symbolic M, the quantizer's
    packed weight), not only the tests'."""
    import tvm_lite
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr

    mod = _tiny_e0m4(tiny_decoder_fp16)
    off = tvm_lite.device_source(tvm_lite.build(mod, WGMMA_TARGET), "cuda")
    monkeypatch.setattr(wr, "ENABLED", True)
    on = tvm_lite.device_source(tvm_lite.build(mod, WGMMA_TARGET), "cuda")
    assert "tvm_lite_dq_afrag(" not in off
    assert on.count("tvm_lite_gemm_wgmma_rs_m64n256k16(") >= 2  # its definition and a call
    assert "setmaxnreg.inc.sync.aligned.u32 232" in on


@HOPPER
@NAN_ON_H100  # the rule's tile is 256 x 128
def test_a_whole_model_with_w_in_registers_gives_the_default_builds_logits(tiny_decoder_fp16,
                                                                         monkeypatch, tmp_path):
    """On a Hopper GPU the tiny model built with the W-in-registers GEMM gives the logits of the
    default sm_90a build (prefill, a chunk, decode steps)."""
    from tvm_lite.arch_matrix import engine_logits
    from tvm_lite.artifact import compile_model
    from tvm_lite.engine import Engine
    from tvm_lite.quant import QuantConfig
    from tvm_lite.schedules import gpu_gemm_wgmma_wreg as wr

    def logits(name):
        art = compile_model(tiny_decoder_fp16, WGMMA_TARGET, out_dir=tmp_path / name,
                            quant=QuantConfig("e0m4", "rtn", 32), progress=lambda *_: None)
        return engine_logits(Engine(art, device="cuda:0")).astype(np.float32)

    base = logits("default")
    monkeypatch.setattr(wr, "ENABLED", True)
    got = logits("w_in_registers")
    assert np.abs(got - base).max() <= 2e-2 * max(1.0, float(np.abs(base).max())), \
        float(np.abs(got - base).max())


def test_default_rule_takes_the_warp_specialised_kernel_for_deep_and_wide_gemms_on_sm90a():
    """Without options the rule gives a deep 4-bit GEMM (K >= 4 N, N >= 2048: the down
    projections) and a wide one (N >= 4 K: gate/up) on sm_90a the warp-specialised wgmma kernel
    at the tile, stages and W slots that beat mma.sync there on the H200 (the wide one with its
    outputs staged through shared memory: faster on an H100); square and narrow GEMMs, fp16
    weights and sm_90 keep mma.sync."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    a90 = parse_target(WGMMA_TARGET)
    rule = GPUPrefillGEMM(CUDA)

    def label(fmt, k, n, target=a90):  # the longest prompts' plan (PLAN_LENGTHS: the first)
        return str(_schedule(rule, kernel_func(fmt, [1, DYN], k, n), target)
                   .mod["main"].attrs["tvm_lite.gemm"]).split("; if ")[0]

    deep = label("e0m4", 8192, 2048)
    assert deep.startswith("wgmma_m64n256k16 128x256 split-K ") and deep.endswith(
        f"warp-specialised x{ws.DEEP_STAGES} w{ws.DEEP_W_BUFFERS} x rows"), deep
    wide = label("e0m4", 2048, 8192)
    assert wide.startswith("wgmma_m64n256k16 128x256 ") and wide.endswith(
        f"warp-specialised x{ws.WIDE_STAGES} w{ws.WIDE_W_BUFFERS} staged"), wide
    assert "warp-specialised" in label("int4", 4 * 2048, 2048)
    assert "warp-specialised" not in label("e0m4", 4 * 2048 - 64, 2048)  # K < 4 N
    assert "warp-specialised" not in label("e0m4", 2048, 512)  # k / v alone: N < DEEP_MIN_N
    assert "warp-specialised" not in label("e0m4", 2048, 4 * 2048 - 64)  # N < 4 K
    for fmt, k, n, target in [("e0m4", 2048, 2048, a90), ("e0m4", 2048, 3072, a90),
                              ("fp16", 8192, 2048, a90),
                              ("e0m4", 8192, 2048, parse_target(TARGETS["cuda"]))]:
        assert "mma_m16n8k16" in label(fmt, k, n, target), (fmt, k, n, target)
    assert "mma_m16n8k16" in str(_schedule(GPUPrefillGEMM(CUDA, wgmma=False),
                                           kernel_func("e0m4", [1, DYN], 8192, 2048), a90)
                                 .mod["main"].attrs["tvm_lite.gemm"])


@HOPPER
@pytest.mark.parametrize("fmt,k,n,epilogue,stages", [("e0m4", 2048, 2048, "residual", 0),
                                                     ("int4", 2048, 512, None, 3),
                                                     ("e0m4", 8192, 2048, None, 3),
                                                     ("e0m4", 2048, 8192, "residual", 4)])
def test_wgmma_gemm_runs_correctly_on_a_hopper_gpu(fmt, k, n, epilogue, stages):
    """The wgmma GEMM on the GPU against numpy at prompt lengths that are and are not multiples
    of the tile (1, 37, 128, 200, 512), X through registers or a cp.async ring."""
    target = parse_target(WGMMA_TARGET)
    ex = build(_mma_func(fmt, k, n, epilogue), target,
               [GPUPrefillGEMM(CUDA, wgmma=True, wgmma_x_stages=stages)])
    assert "tvm_lite_wgmma_m64n" in _source(ex, "cuda")
    _check_gemm_on_gpu(ex, fmt, k, n, epilogue)


@HOPPER
@pytest.mark.parametrize("fmt,k,n,epilogue,tile,stages,w_buffers,pairs,x_rows,staged", [
    ("e0m4", 2048, 2048, "residual", None, 4, None, False, False, False),
    ("int4", 2048, 512, None, (64, 128), 2, None, False, False, False),
    ("e0m4", 8192, 2048, None, (128, 256), 3, None, False, False, False),
    ("e0m4", 2048, 8192, "residual", (128, 256), 3, None, False, False, False),
    # the deeper ring, 2 W slots
    ("e0m4", 2048, 8192, "residual", (128, 256), 5, 2, False, False, False),
    ("e0m4", 8192, 2048, None, (256, 128), 4, 2, False, False, False),
    ("e0m4", 8192, 2048, "residual", (128, 256), 4, 2, False, False, False),  # the deep default
    ("e0m4", 2048, 8192, None, (128, 256), 5, 2, True, False, False),  # ... outputs in pairs
    ("e0m4", 2048, 8192, None, (128, 256), 5, 2, True, True, False),  # ... X copied a row a quarter
    ("e0m4", 8192, 2048, "residual", (128, 256), 4, 2, False, True, False),
    ("e0m4", 2048, 8192, None, (128, 256), 5, 2, False, False, True)])  # staged outputs
def test_warp_specialised_wgmma_gemm_runs_correctly_on_a_hopper_gpu(fmt, k, n, epilogue, tile,
                                                                   stages, w_buffers, pairs,
                                                                   x_rows, staged):
    """The warp-specialised wgmma GEMM on the GPU against numpy (M = 1, 37, 128, 200, 512): the
    asynchronous MMAs, which the CPU emulation runs at once, may not see a W slot rewritten."""
    ex = build(_mma_func(fmt, k, n, epilogue), parse_target(WGMMA_TARGET),
               [GPUPrefillGEMM(CUDA, wgmma=True, wgmma_tile=tile, wgmma_specialised=stages,
                               wgmma_w_buffers=w_buffers, wgmma_pair_stores=pairs,
                               wgmma_x_rows=x_rows, wgmma_staged_stores=staged)])
    assert "tvm_lite_bar_arrive(" in _source(ex, "cuda")
    _check_gemm_on_gpu(ex, fmt, k, n, epilogue)


@HOPPER
@pytest.mark.parametrize("fmt,k,n,epilogue,tile,stages,x_rows,staged", [
    ("e0m4", 8192, 2048, "residual", (128, 256), 4, True, False),  # the deep default
    ("e0m4", 2048, 8192, None, (128, 256), 5, False, True),  # the wide default
    ("int4", 2048, 1024, None, (64, 128), 4, False, False)])  # one consumer warpgroup
def test_consumer_dequant_gemm_runs_correctly_on_a_hopper_gpu(fmt, k, n, epilogue, tile, stages,
                                                             x_rows, staged):
    """``CONSUMER_UNITS = 1`` on the GPU against numpy (M = 1, 37, 128, 200, 512): a consumer
    writes its share of slice j's W while slice j - 1's asynchronous wgmmas (its own and the
    other warpgroup's) still read the other W slot."""
    ex = build(_mma_func(fmt, k, n, epilogue), parse_target(WGMMA_TARGET),
               [GPUPrefillGEMM(CUDA, wgmma=True, wgmma_tile=tile, wgmma_specialised=stages,
                               wgmma_w_buffers=2, wgmma_x_rows=x_rows,
                               wgmma_staged_stores=staged, wgmma_consumer_units=1)])
    _check_gemm_on_gpu(ex, fmt, k, n, epilogue)


@HOPPER
@pytest.mark.parametrize("fmt,k,n,epilogue", [("e0m4", 8192, 2048, "residual"),
                                              ("int4", 2048, 3072, None)])
def test_paired_partials_gemm_runs_correctly_on_a_hopper_gpu(fmt, k, n, epilogue, monkeypatch):
    """``PAIR_PARTIALS`` on the GPU against numpy (M = 1, 37, 128, 200, 512): the deep default
    (128 x 256, 4 stages, 2 W slots, X by rows; K split by M) and a merged q+k+v's shape."""
    from tvm_lite.schedules import gpu_gemm_wgmma_ws as ws

    monkeypatch.setattr(ws, "PAIR_PARTIALS", True)
    ex = build(_mma_func(fmt, k, n, epilogue), parse_target(WGMMA_TARGET),
               [GPUPrefillGEMM(CUDA, wgmma=True, wgmma_tile=(128, 256), wgmma_specialised=4,
                               wgmma_w_buffers=2, wgmma_x_rows=True)])
    assert "tvm_lite_st_f32x2(" in _source(ex, "cuda")
    _check_gemm_on_gpu(ex, fmt, k, n, epilogue)


@HOPPER
@pytest.mark.parametrize("fmt,k,n,epilogue,tile,stages,x_rows", [
    pytest.param("e0m4", 2048, 8192, None, (256, 128), 4, False,  # gate/up, the default tile
                 marks=NAN_ON_H100),
    pytest.param("e0m4", 2048, 8192, None, (256, 128), 5, False, marks=NAN_ON_H100),
    pytest.param("e0m4", 8192, 2048, "residual", (256, 128), 4, True,  # down: K split, X by rows
                 marks=NAN_ON_H100),
    pytest.param("int4", 2048, 2048, None, (128, 128), 3, False, marks=pytest.mark.xfail(
        reason="wrong at M = 1 on an H100 (thirtieth session; W in registers is in no plan)",
        strict=False)),
    ("e0m4", 2048, 8192, None, (128, 256), 4, False)])  # four consumer warpgroups
def test_w_in_registers_gemm_runs_correctly_on_a_hopper_gpu(fmt, k, n, epilogue, tile, stages,
                                                            x_rows):
    """The kernel with W dequantized in registers on the GPU against numpy (M = 1, 37, 128,
    200, 512): the A registers of a slice's wgmmas, which the CPU emulation reads at once, may
    not be rewritten before those wgmmas are done (two A sets, ``wait_group 1``), and
    ``setmaxnreg`` must hand the consumers their registers."""
    ex = build(_mma_func(fmt, k, n, epilogue), parse_target(WGMMA_TARGET),
               [GPUPrefillGEMM(CUDA, wgmma=True, wgmma_tile=tile, wgmma_w_in_registers=stages,
                               wgmma_x_rows=x_rows)])
    assert "tvm_lite_dq_afrag(" in _source(ex, "cuda")
    _check_gemm_on_gpu(ex, fmt, k, n, epilogue)


# -- injective kernels with a vector a thread (schedules/gpu_elementwise.py) ---------------------
def _silu_mul_func(rows, inter, dtype="float16", compute="float16"):
    """SiLU(gate) * up from one [1, rows, 2 * inter] tensor (the prefill's gate/up output),
    computed in ``compute`` (the exported models cast to fp32 around the sigmoid)."""
    from tvm import te

    x = te.placeholder((1, rows, 2 * inter), dtype, name="x")

    def silu_mul(a, s, d):
        g, u = x[a, s, d].astype(compute), x[a, s, d + inter].astype(compute)
        return (g * tvm.tirx.sigmoid(g) * u).astype(dtype)

    out = te.compute((1, rows, inter), silu_mul, name="silu_mul")
    return te.create_prim_func([x, out])


def _rotate_half_func(rows, heads, d, dtype="float16"):
    """Rotary embedding's rotate-half: out = x * cos + (-x[d + D/2] if d < D/2 else x[d - D/2])
    * sin, the shape of the K/V append's rotation."""
    from tvm import te

    x = te.placeholder((rows, heads, d), dtype, name="x")
    cos = te.placeholder((rows, d), dtype, name="cos")
    sin = te.placeholder((rows, d), dtype, name="sin")
    half = d // 2
    out = te.compute((rows, heads, d), lambda s, h, j: x[s, h, j] * cos[s, j] + tvm.tirx.if_then_else(
        j < half, -x[s, h, tvm.tirx.min(j + half, d - 1)], x[s, h, tvm.tirx.max(j - half, 0)])
        * sin[s, j], name="rot")
    return te.create_prim_func([x, cos, sin, out])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", ["silu_mul", "silu_mul_fp32", "rotate_half", "fp32_add",
                                  "odd_inner"])
def test_vector_elementwise_cuda_c_run_on_the_cpu_matches_numpy(case, tmp_path):
    """``GPUProfile.vector_elementwise`` (on in the CUDA profile): an injective kernel gets
    16-byte vectors a thread -- the SiLU product over the two halves of a row, fp32 (4 a
    vector); an fp16 SiLU computed in fp32 gets 4 a vector too (8 would be an fp32x8, which
    TVM's CUDA codegen writes as a ``make_ulonglong4`` of 8 floats). A rotate-half (a select per lane: TVM's CUDA codegen would gather, or not compile)
    and an inner dim that vectors do not divide go to Fallback. The CUDA C run on the CPU
    (tests/mma_on_cpu.py) against numpy."""
    from dataclasses import replace

    from mma_on_cpu import run_kernels_to
    from tvm_lite.schedules import gpu_rules

    from tvm import te

    rng = np.random.default_rng(11)
    target = parse_target(TARGETS["cuda"])
    if case.startswith("silu_mul"):
        func = _silu_mul_func(5, 64, compute="float32" if case == "silu_mul_fp32" else "float16")
        x = rng.standard_normal((1, 5, 128)).astype(np.float16)
        g, u = x[..., :64].astype(np.float32), x[..., 64:].astype(np.float32)
        arrays, want, size = {"x": x}, g / (1 + np.exp(-g)) * u, 5 * 64
    elif case == "rotate_half":
        func = _rotate_half_func(6, 4, 64)
        x = rng.standard_normal((6, 4, 64)).astype(np.float16)
        cos = rng.standard_normal((6, 64)).astype(np.float16)
        sin = rng.standard_normal((6, 64)).astype(np.float16)
        xf, rot = x.astype(np.float32), np.concatenate([-x[..., 32:], x[..., :32]], -1)
        want = xf * cos[:, None].astype(np.float32) + rot.astype(np.float32) * sin[:, None]
        arrays, size = {"x": x, "cos": cos, "sin": sin}, 6 * 4 * 64
    else:
        inner = 64 if case == "fp32_add" else 60
        dtype = "float32" if case == "fp32_add" else "float16"
        a = te.placeholder((3, inner), dtype, name="a")
        b = te.placeholder((3, inner), dtype, name="b")
        func = te.create_prim_func([a, b, te.compute((3, inner), lambda i, j: a[i, j] + b[i, j],
                                                     name="add")])
        av, bv = (rng.standard_normal((3, inner)).astype(dtype) for _ in range(2))
        arrays, want, size = {"a": av, "b": bv}, av.astype(np.float32) + bv, 3 * inner
    on = gpu_rules(replace(CUDA, vector_elementwise=True))
    src = _source(build(func, target, on), "cuda")
    vectorized = case in ("silu_mul", "silu_mul_fp32", "fp32_add")
    assert ("uint4" in src or "float4" in src) == vectorized, src[-1500:]
    assert "ulonglong4" not in src
    off = gpu_rules(replace(CUDA, vector_elementwise=False))
    assert ("uint4" in _source(build(func, target, off), "cuda")) is False
    out_name = {"silu_mul": "silu_mul", "silu_mul_fp32": "silu_mul",
                "rotate_half": "rot"}.get(case, "add") + "_ptr"
    bound = int(re.search(r"__launch_bounds__\((\d+)\)", src).group(1))
    named = {f"{k}_ptr": v for k, v in arrays.items()}
    dtype = np.float32 if case == "fp32_add" else np.float16
    lanes = 4 if case in ("silu_mul_fp32", "fp32_add") else 8  # 16 bytes of the widest type
    threads = size // lanes if vectorized else size  # a thread's share
    got = run_kernels_to(src, named, {"main_kernel": (-(-threads // bound), 1, 1)},
                         {out_name: (size, dtype)}, tmp_path, size)[out_name]
    np.testing.assert_allclose(got.astype(np.float32).reshape(want.shape), want, rtol=1e-2,
                               atol=1e-2)
