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

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import s_tir, tirx

from tvm_lite import parse_target
from tvm_lite.bench_kernels import build, kernel_func, reference, weights
from tvm_lite.schedules import gpu_rules, profile_of, rules_for, stock_gpu_rules
from tvm_lite.schedules.gpu_gemm import GPUPrefillGEMM, simt_only
from tvm_lite.schedules.gpu_gemv import GPUDecodeGEMV, MatchError, match_matmul
from tvm_lite.schedules.guards import StaticBuffersOnly
from tvm_lite.schedules.profiles import ADRENO, CUDA, MALI, PROFILES, fit_to_target, gpu_profile

TARGETS = {"adreno": "opencl -device=adreno", "mali": "opencl -device=mali", "cuda": "cuda -arch=sm_90"}
CLANG = ["clang-15", "-x", "cl", "-cl-std=CL2.0", "-Xclang", "-finclude-default-header",
         "-Xclang", "-cl-ext=+cl_khr_fp16", "-fsyntax-only"]
# (K, N): a SmolLM2 k/v projection (N = 192: not a power of two), its down projection, a 2B k/v
SHAPES = [(576, 192), (1536, 576), (2048, 256)]
DYN = tirx.Var("n", "int64")


def _source(ex, kind):
    from tvm_lite.compiler import device_source

    return device_source(ex, kind)


def _kernel_names(src):
    return set(re.findall(r"__kernel void (\w+)\(", src))


def _schedule(rule, func, target):
    with target:
        return rule.apply(func, target, False)


# -- profiles and rule lists ---------------------------------------------------------------------
def test_targets_map_to_profiles_and_rules_in_order():
    for name, text in TARGETS.items():
        target = parse_target(text)
        assert profile_of(target) == name
        names = [type(r).__name__ for r in rules_for(target)]
        # tvm_lite's own kernels first (fused attention, fused norms), then the matmul rules
        assert names[:2] == ["Attention", "FusedRMSNorm"]
        rules = rules_for(target)[2:]
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
    kv = rule.plan(256, 2048, 2)  # a 2B k/v projection: one column tile, so K is split
    assert kv["ks"] >= 8


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
            assert "25600" in src and "convert_half" not in src and "__ushort2half" not in src
        sources.append((f"{phase}_{fmt}_{k}x{n}", src))
    if kind == "opencl":
        if not shutil.which("clang-15"):
            pytest.skip("clang-15 not installed")
        for name, src in sources:
            path = tmp_path / f"{name}.cl"
            path.write_text(src)
            res = subprocess.run([*CLANG, str(path)], capture_output=True, text=True)
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
    func = kernel_func("e0m4", [1, 1], 16384, 2048)  # a 2B down projection: N is small
    plan = GPUDecodeGEMV(MALI).plan(2048, 16384, 2, target)
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


def _cuda_device():
    try:
        dev = tvm.cuda(0)
        return dev if dev.exist else None
    except Exception:  # pylint: disable=broad-except
        return None


@pytest.mark.skipif(_cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda"])
def test_profile_kernels_run_correctly_on_a_cuda_gpu(profile):
    """Each profile's GEMV and GEMM schedules, compiled for CUDA, against numpy: the indexing the
    Adreno and Mali kernels use is exercised on real hardware."""
    dev = _cuda_device()
    target = parse_target("cuda -arch=sm_90")
    prof = PROFILES[profile]
    rng = np.random.default_rng(2)
    cases = [("gemv", fmt, k, n, [1]) for fmt in ("e0m4", "int4", "fp16") for k, n in SHAPES]
    cases += [("gemv", "e0m4", 16384, 2048, [1])]  # K split over workgroups: two kernels
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
            res = subprocess.run([*CLANG, str(path)], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-2000:]
