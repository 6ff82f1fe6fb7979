"""FuseGEMVPrologue (relax_passes/fuse_gemv_prologue.py) and its GEMV schedule: a decode GEMV that
computes its RMSNorm (the row's sum of squares reduced by every workgroup) or its gated activation
(``silu(gate) * up`` of a merged gate/up output) itself.

* the pass groups the pair into one kernel for every GPU profile; the OpenCL C passes clang's
  OpenCL front end;
* the kernel's CUDA C (a cuda target with ``thread_warp_size = 1``: sums through shared memory),
  run on the CPU by ``tests/cuda_on_cpu.py``, matches numpy -- including a K that the
  workgroup's threads do not divide and a split-K plan;
* the CPU pipeline keeps them apart (the switch is the pipeline's).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_lite import parse_target
from tvm_lite.bench.gemv_plans import EPS, lower_gemv_prologue as _lowered
from tvm_lite.bench.gemv_plans import norm_dequant_gemv as _norm_dequant_gemv
from tvm_lite.relax_passes import FuseAddRMSNorm, FuseGEMVPrologue, FuseSiluMul
from tvm_lite.schedules.gpu_gemv import GPUDecodeGEMV
from tvm_lite.schedules.profiles import PROFILES, fit_to_target
from conftest import clang_opencl, cuda_device
from cuda_on_cpu import run_kernel

OPENCL = {"adreno": "opencl -device=adreno", "mali": "opencl -device=mali", "gpu": "opencl"}


def _norm_gemv(k: int, n: int) -> tvm.IRModule:
    """``y = RMSNorm(x + r) @ W`` with the residual sum returned too, as the importer spells it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, k), "float32"))
    r = relax.Var("r", relax.TensorType((1, 1, k), "float32"))
    w = relax.Var("w", relax.TensorType((k,), "float32"))
    wm = relax.Var("wm", relax.TensorType((k, n), "float32"))
    op = relax.op
    with bb.function("decode", [x, r, w, wm]):
        with bb.dataflow():
            s = bb.emit(op.add(x, r))
            m = bb.emit(op.mean(op.power(s, relax.const(2.0, "float32")), axis=[-1], keepdims=True))
            inv = bb.emit(op.rsqrt(op.add(m, relax.const(EPS, "float32"))))
            h = bb.emit(op.multiply(w, op.multiply(s, inv)))
            y = bb.emit(op.matmul(h, wm))
            out = bb.emit_output(relax.Tuple([y, s]))
        bb.emit_func_output(out)
    return bb.get()


def _silu_gemv(i: int, n: int) -> tvm.IRModule:
    """``y = (silu(gu[:i]) * gu[i:]) @ W``: a merged gate/up output into the down projection."""
    bb = relax.BlockBuilder()
    gu = relax.Var("gu", relax.TensorType((1, 1, 2 * i), "float32"))
    wm = relax.Var("wm", relax.TensorType((i, n), "float32"))
    op = relax.op
    with bb.function("decode", [gu, wm]):
        with bb.dataflow():
            g = bb.emit(op.strided_slice(gu, [2], [0], [i]))
            u = bb.emit(op.strided_slice(gu, [2], [i], [2 * i]))
            a = bb.emit(op.multiply(op.multiply(g, op.sigmoid(g)), u))
            y = bb.emit_output(op.matmul(a, wm))
        bb.emit_func_output(y)
    return bb.get()


def _fused(mod: tvm.IRModule):
    (func,) = [f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint]
    return func


def _prim_calls(mod) -> int:
    text = mod["decode"].script()
    return text.count("R.call_tir(")


@pytest.mark.parametrize("case", ["norm", "silu"])
def test_one_kernel_per_gemv_with_its_prologue_on_gpus_only(case):
    mod = _norm_gemv(576, 960) if case == "norm" else _silu_gemv(1536, 576)
    gpu, fused = _lowered(mod, gpu=True)
    cpu, none = _lowered(mod, gpu=False)
    assert fused == 1 and none == 0
    # GPU: the residual add (its own kernel here: no GEMV before it) + the norm-GEMV; CPU: the
    # add + norm kernel and the GEMV. silu: one kernel vs the activation and the GEMV
    assert _prim_calls(gpu) == (2 if case == "norm" else 1)
    assert _prim_calls(cpu) == 2


@pytest.mark.parametrize("profile", ["adreno", "mali", "gpu", "cuda"])
@pytest.mark.parametrize("case", ["norm", "silu"])
def test_prologue_gemv_is_one_kernel_for_every_profile(profile, case, tmp_path):
    mod = _norm_gemv(576, 960) if case == "norm" else _silu_gemv(1536, 576)
    func = _fused(_lowered(mod)[0])
    target = parse_target(OPENCL.get(profile, "cuda -arch=sm_90"))
    with target:
        sch = GPUDecodeGEMV(PROFILES[profile]).apply(func, target, False)
    assert sch is not None
    ex = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                     target=target)
    from tvm_lite.compiler import device_source

    kind = "cuda" if profile == "cuda" else "opencl"
    src = device_source(ex, kind)
    kernels = set(re.findall(r"(?:__kernel void|__global__ void(?: __launch_bounds__\(\d+\))?)"
                             r" (\w+)\(", src))
    assert len(kernels) == 1, kernels
    if kind == "opencl" and shutil.which("clang-15"):
        path = tmp_path / f"{case}.cl"
        path.write_text(src)
        res = clang_opencl(path)
        assert res.returncode == 0, res.stderr[-2000:]


def _numpy(case, arrays):
    if case == "norm":
        s = arrays["s"].astype(np.float64)
        h = s / np.sqrt((s * s).mean(-1, keepdims=True) + EPS) * arrays["w"]
        return (h @ arrays["wm"]).reshape(-1)
    gu = arrays["gu"].astype(np.float64).reshape(-1)
    i = gu.size // 2
    g, u = gu[:i], gu[i:]
    return (g / (1 + np.exp(-g)) * u) @ arrays["wm"]


# (case, K, N, plan override): SmolLM2's q/k/v (576 x 960) and down (1536 x 576); K = 600 that
# the 256 threads do not divide; a split-K plan (two kernels: only the first is run here, so
# the cases below keep ks = 1)
CPU_CASES = [("norm", 576, 960, None), ("norm", 600, 128, None), ("silu", 1536, 576, None),
             ("norm", 576, 192, {"tn": 4, "tk": 18, "kg": 1})]


@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
@pytest.mark.parametrize("case,k,n,override", CPU_CASES)
def test_prologue_gemv_cuda_c_run_on_the_cpu_matches_numpy(case, k, n, override, tmp_path):
    rng = np.random.default_rng(7)
    mod = _norm_gemv(k, n) if case == "norm" else _silu_gemv(k, n)
    func = _fused(_lowered(mod)[0])
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "thread_warp_size": 1},
                               host={"kind": "llvm"})
    rule = GPUDecodeGEMV(PROFILES["cuda"])
    plan = rule.plan(n, k, 4, target, bytes_read=n * k * 4)
    plan.update(override or {})
    assert plan["ks"] == 1
    from tvm import s_tir
    from tvm_lite.schedules.gpu_gemv import match_gemv

    with target:
        sch = s_tir.Schedule(func)
        main, dequant, producers, epilogues, _, _ = match_gemv(sch)
        sch = rule._schedule(sch, main, dequant, producers, epilogues, plan)
        ex = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                         target=target)
    from tvm_lite.compiler import device_source

    src = device_source(ex, "cuda")
    assert "shfl" not in src
    # the kernel's inputs, in its parameter order: the residual sum (the add before it is the
    # previous kernel's), the norm weight, W; or the merged gate/up row and W
    if case == "norm":
        arrays = {"s": rng.standard_normal((1, 1, k)) * 3, "w": rng.standard_normal(k),
                  "wm": rng.standard_normal((k, n)) / np.sqrt(k)}
    else:
        arrays = {"gu": rng.standard_normal((1, 1, 2 * k)),
                  "wm": rng.standard_normal((k, n)) / np.sqrt(k)}
    arrays = {a: v.astype(np.float32) for a, v in arrays.items()}
    names = [p.name for p in func.params]  # the pointers are named after them (``<name>_ptr``)
    assert len(names) == len(arrays) + 1
    inputs = dict(zip(names, arrays.values()))
    vec, tn = plan["vec"], plan["tn"]
    got = run_kernel(src, n // (vec * tn), (tn, plan["tk"]), inputs, names[-1], n, tmp_path)
    ref = _numpy(case, arrays)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())



# tiny random models (tvm_lite/arch_matrix.py): Llama (the SmolLM2 structure), Qwen2 (q/k/v
# biases after the norm-GEMV), Qwen3 (QK norms: the Q rotary reads the normed heads), Gemma
# (1 + w norms, GELU-tanh gate)
GPU_ARCHS = ["llama", "qwen2", "qwen3", "gemma"]


@pytest.mark.slow
@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_fused_cuda_build_matches_unfused_and_torch(arch, tmp_path):
    """On a CUDA GPU: the logits of every position (prefill, a chunk, decode steps) of the fused
    build (norms and activations in the GEMVs, Q rotary and cos/sin in kv_append) equal the
    unfused build's and torch's."""
    from tvm_lite import arch_matrix
    from tvm_lite.artifact import compile_model
    from tvm_lite.engine import Engine

    onnx = arch_matrix.export(arch, "dynamo")
    got = {}
    for fusion in (True, False):
        art = compile_model(onnx, "cuda -arch=sm_90", out_dir=tmp_path / f"fusion_{fusion}",
                            progress=lambda *_: None, fusion=fusion)
        got[fusion] = arch_matrix.engine_logits(Engine(art, device="cuda:0"))
    np.testing.assert_allclose(got[True], got[False], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[True], arch_matrix.torch_logits(arch),
                               atol=arch_matrix.TOLERANCE, rtol=0)


def _silu_dequant_gemv(i: int, n: int, dtype: str) -> tvm.IRModule:
    """``_silu_gemv`` with a 4-bit (E0M4 g32) down projection: tvm_lite's dequant matmul kernel."""
    from tvm_lite.quant.kernels import matmul_func

    bb = relax.BlockBuilder()
    gu = relax.Var("gu", relax.TensorType((1, 1, 2 * i), dtype))
    codes = relax.Var("codes", relax.TensorType((i // 4, n), "uint16"))
    scale = relax.Var("scale", relax.TensorType((i // 32, n), "float16"))
    zero = relax.Var("zero", relax.TensorType((i // 32, n), "float16"))
    op = relax.op
    with bb.function("decode", [gu, codes, scale, zero]):
        with bb.dataflow():
            g = bb.emit(op.strided_slice(gu, [2], [0], [i]))
            u = bb.emit(op.strided_slice(gu, [2], [i], [2 * i]))
            a = bb.emit(op.multiply(op.multiply(g, op.sigmoid(g)), u))
            gv = bb.add_func(matmul_func("e0m4", [1, 1], i, n, 32, dtype), "e0m4_matmul")
            y = bb.emit_output(relax.call_tir(gv, [a, codes, scale, zero],
                                              relax.TensorType((1, 1, n), dtype)))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_4bit_gemv_takes_its_prologue_in_every_dtype(dtype):
    """A 4-bit GEMV fuses with its producer whatever the row's dtype (fp16 rows on CUDA: the
    packed half2 kernel stages the computed row in shared memory)."""
    mod = FuseSiluMul()(_silu_dequant_gemv(256, 128, dtype))
    seq = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
           relax.transform.FuseOps(), relax.transform.FuseTIR()]
    p = FuseGEMVPrologue()
    p(tvm.transform.Sequential(seq)(mod))
    assert p.count == 1


@pytest.mark.parametrize("target, gpu", [("opencl -device=adreno", True),
                                         ("opencl -device=mali", True),
                                         ("cuda -arch=sm_90", True), ("llvm", False)])
def test_pipeline_switch_by_target(target, gpu):
    """GPU targets run FuseGEMVPrologue; the CPU pipeline does not, and keeps FuseAddRMSNorm's
    adds in its kernels."""
    from tvm_lite import pipeline

    passes = [p for _, ps in pipeline.phases(parse_target(target)) for p in ps]
    prologue = [p for p in passes if isinstance(p, FuseGEMVPrologue)]
    norm = [p for p in passes if isinstance(p, FuseAddRMSNorm)]
    assert len(norm) == 1 and norm[0].norm_before_gemv == gpu
    assert len(prologue) == int(gpu)


# -- the packed half2 4-bit GEMV of fp16 rows (CUDA) with its prologue -----------------------------
def test_gemma_norm_cast_to_fp16_is_still_the_gemv_prologue():
    """Gemma's fp16 norm ends in fp32 and casts the row back before the GEMV: the residual add
    still stays out of the norm (the previous GEMV's epilogue in a model) and the GEMV computes
    norm and cast itself -- 2 kernels a layer fewer than an add_rms_norm kernel of its own."""
    mod, count = _lowered(_norm_dequant_gemv(256, 128, gemma=True, residual=True))
    assert count == 2  # the norm (its weight's cast fused in by FuseOps), then the row's cast
    text = mod["decode"].script()
    assert "add_rms_norm" not in text and text.count("R.call_tir(") == 2  # the add, the GEMV


def _half2_fused(case: str, k: int, n: int):
    mod = (_norm_dequant_gemv(k, n, gemma=case == "gemma") if case in ("norm", "gemma")
           else _silu_dequant_gemv(k, n, "float16"))
    mod, count = _lowered(mod)
    assert count == 1 + (case == "gemma")
    (func,) = [f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("fused")]
    return func


def _half2_inputs(case: str, k: int, n: int, rng) -> tuple[list, np.ndarray]:
    """The fused kernel's inputs (fp16 row(s), E0M4 codes/scale/zero) and numpy's result: the
    prologue in fp32 rounded to fp16 where the model rounds, the weights dequantized."""
    from tvm_lite.quant.format import dequantize

    ng = k // 32
    codes = rng.integers(0, 1 << 16, size=(k // 4, n), dtype=np.uint16)
    scale = (rng.random((ng, n), dtype=np.float32) * 0.02 + 0.01).astype(np.float16)
    zero = (1024 + rng.integers(0, 16, size=(ng, n))).astype(np.float16)
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    if case == "norm":
        s = (rng.standard_normal((1, 1, k)) * 2).astype(np.float16)
        w = rng.standard_normal(k).astype(np.float16)
        sf = s.astype(np.float32).reshape(-1)
        x = f16(f16(sf / np.sqrt((sf * sf).mean() + EPS)) * w.astype(np.float32))
        rows = [s, w]
    elif case == "gemma":
        s = (rng.standard_normal((1, 1, k)) * 2).astype(np.float16)
        w = rng.standard_normal(k).astype(np.float16)
        sf = s.astype(np.float32).reshape(-1)
        x = f16(sf / np.sqrt((sf * sf).mean() + EPS) * (1 + w.astype(np.float32)))
        rows = [w, s]  # (FuseOps puts the weight's cast, and so the weight, first)
    else:
        gu = rng.standard_normal((1, 1, 2 * k)).astype(np.float16)
        g, u = gu.reshape(-1)[:k].astype(np.float32), gu.reshape(-1)[k:].astype(np.float32)
        x = f16(f16(g / (1 + np.exp(-g))) * u)
        rows = [gu]
    wt = dequantize("e0m4", codes, scale, zero, k, 32).astype(np.float32)
    return rows + [codes, scale, zero], x @ wt


# (case, K, N, plan override): SmolLM2's q/k/v (norm) and down (silu) shapes, 576 -> 1536 with
# several groups a thread, and split-K plans (every split stages only its rows)
HALF2_PROLOGUE_CASES = [("norm", 576, 960, None), ("silu", 1536, 576, None),
                        ("norm", 576, 1536, {"ks": 1, "kg": 3, "tn": 32, "tk": 6}),
                        ("norm", 2048, 256, {"ks": 4, "kg": 2, "tn": 4, "tk": 8}),
                        ("silu", 1536, 576, {"ks": 2, "kg": 3, "tn": 8, "tk": 8}),
                        ("gemma", 2048, 256, None),
                        ("gemma", 2048, 256, {"ks": 4, "kg": 2, "tn": 4, "tk": 8}),
                        # 16 threads along N, K split 4 ways (one group a thread)
                        ("norm", 2048, 512, {"ks": 4, "kg": 1, "tn": 16, "tk": 16}),
                        # the 16 x 8 plan gpu_gemv.PROLOGUE_KS gives Gemma-2B's gate/up, at a narrower N
                        ("gemma", 2048, 256, {"ks": 8, "kg": 1, "tn": 16, "tk": 8})]


@pytest.mark.parametrize("case,k,n,override", HALF2_PROLOGUE_CASES)
def test_half2_gemv_with_its_prologue_emulated_on_the_cpu_matches_numpy(case, k, n, override):
    """The packed kernel stages the norm or SiLU row in shared memory (the norm's sum of squares
    first) and reads it there: its own loop nest, run on the CPU (``emulate``), against numpy."""
    from tvm_lite.schedules.gpu_gemv_half2 import half2_kernel

    func = _half2_fused(case, k, n)
    cuda = PROFILES["cuda"]
    plan = GPUDecodeGEMV(cuda).plan(n, k, 2, parse_target("cuda -arch=sm_90"), 32)
    plan.update(override or {})
    sch, p = half2_kernel(func, parse_target("llvm"), cuda, plan, emulate=True)
    assert p.prologue and p.row_stat == (case != "silu") and p.ks == plan["ks"]
    ex = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                     target=parse_target("llvm"))
    args, ref = _half2_inputs(case, k, n, np.random.default_rng(1))
    out = tvm.runtime.empty((1, 1, n), "float16", tvm.cpu())
    ex.mod["main"](*[tvm.runtime.tensor(a) for a in args], out)
    err = np.abs(out.numpy().reshape(-1).astype(np.float32) - ref).max() / np.abs(ref).max()
    assert err < 5e-3, err


@pytest.mark.parametrize("case", ["norm", "silu"])
def test_cuda_rule_gives_fp16_4bit_gemvs_the_packed_kernel_with_their_prologue(case):
    """On CUDA the fused norm/SiLU + 4-bit GEMV of an fp16 row is the packed half2 kernel, one
    kernel even where the plan splits K (its last workgroup sums the splits), and its CUDA C
    compiles."""
    k, n = (576, 960) if case == "norm" else (1536, 576)
    func = _half2_fused(case, k, n)
    target = parse_target("cuda -arch=sm_90")
    ks = GPUDecodeGEMV(PROFILES["cuda"]).plan(n, k, 2, target, 32)["ks"]
    with target:
        sch = GPUDecodeGEMV(PROFILES["cuda"]).apply(func, target, False)
    assert sch is not None and str(sch.mod["main"].attrs["tvm_lite.gemv"]) == "gemv_half2"
    from tvm_lite.compiler import device_source

    ex = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                     target=target)
    src = device_source(ex, "cuda")
    kernels = set(re.findall(r"__global__ void(?: __launch_bounds__\(\d+\))? (\w+)\(", src))
    assert len(kernels) == 1 and "xs32" in src
    assert ("tvm_lite_split_last(" in src) == (ks > 1)


@pytest.mark.parametrize("gemma", [False, True])
def test_bench_gemv_plans_norm_kernel_and_its_numpy_agree_on_the_cpu(gemma):
    """``bench.gemv_plans``' fused RMSNorm + E0M4 GEMV (the pipeline's own fusion; Llama's norm
    and Gemma's, ``--model gemma-2b``) built for the CPU, fed as the bench feeds it, against the
    bench's numpy reference: the parameter order and the norm's rounding the GPU rows are
    checked with."""
    from tvm.s_tir import dlight as dl

    from tvm_lite.bench import gemv_plans
    from tvm_lite.bench.kernels import random_half, reference, weights
    from tvm_lite.schedules import rules_for

    k, n = 256, 64
    func = gemv_plans.norm_gemv_func(k, n, gemma)
    llvm = parse_target("llvm")
    mod = tvm.IRModule({"main": func})
    with llvm:
        ex = tvm.compile(dl.ApplyDefaultSchedule(*rules_for(llvm))(mod), target=llvm)
    rng = np.random.default_rng(3)
    row, w = random_half((1, 1, k), rng), random_half((k,), rng)
    arrays = weights("e0m4", k, n, rng)
    out = tvm.runtime.empty((1, 1, n), "float16", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in (row, w, *arrays.values())], out)
    want = reference("e0m4", gemv_plans._norm_row(row, w, gemma), arrays, k, n)
    got = out.numpy().reshape(1, n).astype(np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
