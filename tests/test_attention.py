"""Fused attention on the in-place KV cache (relax_passes/fuse_attention.py, schedules/gpu_attention.py).

    python -m pytest tests/test_attention.py            # CPU: pass, kernels, whole models
    python -m pytest tests/test_attention.py -k gpu     # GPU numerics (skipped without CUDA)
"""

import glob
import logging
import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I, relax as R, tirx as T

import tvm_lite
from tvm_lite.relax_passes import FuseAttention
from tvm_lite.relax_passes.fuse_attention import (attention_params, reference_kernel,
                                                  reference_numpy)
from tvm_lite.schedules.gpu_attention import TILES, Attention
from conftest import CLANG, clang_opencl, cuda_device

LAYERS = 30  # SmolLM2-135M
GPU_TARGETS = {"adreno": "opencl -device=adreno", "mali": "opencl -device=mali",
               "cuda": "cuda -arch=sm_90", "gpu": "opencl"}


def _phase1(mod, fused_attention=True):
    from tvm_lite.pipeline import phases

    target = tvm.target.Target({"kind": "llvm"})
    name, passes = phases(target, "inplace", fused_attention=fused_attention)[0]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _count_calls(func, name_prefix):
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            if e.args[0].name_hint.startswith(name_prefix):
                found.append(e.args[0].name_hint)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.nn.softmax":
            found.append("softmax")

    relax.analysis.post_order_visit(func, visit)
    return found


def _imported(folder):
    mod = tvm_lite.from_onnx(folder / "model.onnx")
    return tvm_lite.detach_params(mod)[0]


# -- the pass on the real exports -------------------------------------------------------------------
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fires_once_per_layer_on_smollm2(exporter, export_dir):
    mod = _phase1(_imported(export_dir(exporter)))
    for fn, kernel in (("prefill", "attention_prefill"), ("decode", "attention_decode")):
        calls = _count_calls(mod[fn], "attention")
        assert calls.count(kernel) == LAYERS, (fn, calls[:5])
        assert "softmax" not in calls  # nothing left of the op-by-op attention
        # no GQA copy, no broadcast of the cache to the 9 query heads
        assert "R.Tensor((1, 3, 3, past_seq" not in mod[fn].script()
    prim = mod["attention_decode"]
    assert prim.attrs["tvm_lite.kernel"] == "attention_decode"
    p = prim.attrs["tvm_lite.attention"]
    assert (int(p["heads"]), int(p["kv_heads"]), int(p["head_dim"])) == (9, 3, 64)
    assert abs(float(p["scale"]) - 0.125) < 1e-9


# -- the kernel against numpy (CPU) ----------------------------------------------------------------
def _inputs(rng, heads, kv, d, n, past, dtype, pad=0):
    """q, k, v, an additive causal mask whose last ``pad`` keys (and query rows) are padding."""
    m = past + n
    q = rng.standard_normal((1, heads, n, d)).astype(dtype)
    k = rng.standard_normal((m, kv, d)).astype(dtype)
    v = rng.standard_normal((m, kv, d)).astype(dtype)
    allowed = np.arange(m)[None, :] <= past + np.arange(n)[:, None]
    allowed[:, m - pad:] = False  # padded keys (mask 0)
    lowest = np.finfo(dtype).min
    mask = np.where(allowed, 0, lowest).astype(dtype)[None, None]
    return q, k, v, mask


def _run(func, target, dev, q, k, v, mask, merged_heads=False):
    """Run an attention PrimFunc; the result in (1, H, n, D). One kv head: a (m, D) cache."""
    if k.shape[1] == 1:
        k, v = k[:, 0], v[:, 0]
    mod = tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")})
    ex = tvm.compile(mod, target=target)
    args = [tvm.runtime.tensor(a, dev) for a in (q, k, v, mask)]
    _, heads, n, d = q.shape
    out = tvm.runtime.empty((1, n, heads * d) if merged_heads else q.shape, str(q.dtype), dev)
    ex["attn"](*args, out)
    got = out.numpy()
    return got.reshape(1, n, heads, d).transpose(0, 2, 1, 3) if merged_heads else got


CASES = [  # heads, kv heads, head_dim, n, past, pad, dtype
    (9, 3, 64, 5, 7, 2, "float32"),   # SmolLM2-shaped prefill with padding, past > 0
    (9, 3, 64, 1, 40, 0, "float32"),  # decode
    (8, 1, 256, 3, 0, 1, "float16"),  # Gemma-shaped: 1 kv head, head_dim 256, fp16
]


@pytest.mark.parametrize("merged_heads", [False, True])
@pytest.mark.parametrize("heads, kv, d, n, past, pad, dtype", CASES)
def test_reference_kernel_matches_numpy(heads, kv, d, n, past, pad, dtype, merged_heads):
    rng = np.random.default_rng(0)
    q, k, v, mask = _inputs(rng, heads, kv, d, n, past, dtype, pad)
    p = attention_params(heads, kv, d, dtype, d ** -0.5, dtype, False, True, n == 1, merged_heads,
                         kv == 1)
    got = _run(reference_kernel(p), tvm.target.Target({"kind": "llvm"}), tvm.cpu(), q, k, v, mask,
               merged_heads)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_ring_kernel_matches_numpy_over_chunks_past_the_window():
    """The ring kernel of a sliding-window layer (a cache of ``window`` rows written at position
    mod window) against numpy attention over the whole history with the window mask: a prefill
    longer than the window, chunks shorter and longer than it, decode steps far past it. The ring
    is the kernel's only memory of the past, carried from call to call; the kernel masks by
    position (it takes ``past``, no mask)."""
    from tvm_lite.relax_passes.fuse_attention import ring_kernel

    heads, kv, d, window, scale = 4, 2, 16, 5, 0.25
    rng = np.random.default_rng(0)
    keys, values = (rng.standard_normal((64, kv, d)).astype("float32") for _ in range(2))
    ring = [tvm.runtime.tensor(np.zeros((window, kv, d), "float32")) for _ in range(2)]
    compiled = {}
    past = 0
    for n in (7, 1, 3, 9, 1, 1, 1, 2, 1, 1, 1, 1):
        p = attention_params(heads, kv, d, "float32", scale, "float32", False, True, n == 1,
                             window=window)
        if (n == 1) not in compiled:
            compiled[n == 1] = tvm.compile(tvm.IRModule(
                {"main": ring_kernel(p).with_attr("global_symbol", "main")}), "llvm")
        q = rng.standard_normal((1, heads, n, d)).astype("float32")
        qpos, kpos = past + np.arange(n)[:, None], np.arange(past + n)[None]
        mask = np.where((kpos <= qpos) & (kpos > qpos - window), 0, -1e9).astype("float32")
        new_k, new_v = (a[past:past + n].transpose(1, 0, 2)[None].copy() for a in (keys, values))
        out = tvm.runtime.empty((1, heads, n, d), "float32")
        compiled[n == 1]["main"](tvm.runtime.tensor(q), *ring, tvm.runtime.tensor(new_k),
                                 tvm.runtime.tensor(new_v), past, out)
        want = reference_numpy(q, keys[:past + n], values[:past + n], mask[None, None], scale,
                               heads // kv)
        np.testing.assert_allclose(out.numpy(), want, atol=1e-5, err_msg=f"n={n} past={past}")
        past += n
        filled = np.arange(max(0, past - window), past)  # the ring holds the last window rows
        np.testing.assert_array_equal(ring[0].numpy()[filled % window], keys[filled])
    assert past > 4 * window


# -- GPU kernels: compile for every profile, OpenCL C checked by clang -----------------------------
def _gpu_kernel(p, target):
    t = tvm_lite.parse_target(target)
    sch = Attention().apply(reference_kernel(p), t, False)
    assert sch is not None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), t


@pytest.mark.parametrize("profile", sorted(GPU_TARGETS))
def test_gpu_kernels_compile(profile, tmp_path):
    sources = []
    for d, kv, dtype, window in ((64, 3, "float16", 0), (256, 1, "float32", 0),
                                 (64, 3, "float16", 512), (256, 1, "float32", 4)):
        for decode in (False, True):
            # soft-capped scores (Gemma 2) in the fp16 prefill (tensor cores on CUDA) and the
            # fp32 decode kernel; ring caches (sliding-window layers) too
            cap = 30.0 if decode == (kv == 1) else 0.0
            p = attention_params(9 if kv == 3 else 8, kv, d, dtype, 0.125, dtype, False,
                                 not decode, decode, merged_heads=decode, kv_squeezed=kv == 1,
                                 softcap=cap, window=window)
            func, t = _gpu_kernel(p, GPU_TARGETS[profile])
            assert ("tanh" in func.script()) == bool(cap)
            # a ring kernel takes the new rows and the position, no mask (it masks by position)
            assert [x.name for x in func.params][3:-1] == (["nk", "nv", "past"] if window
                                                           else ["mask"])
            ex = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}),
                             target=t)
            if t.kind.name == "opencl":
                sources.append(tvm_lite.device_source(ex, "opencl"))
    if sources and CLANG:
        for i, src in enumerate(sources):
            path = tmp_path / f"attn{i}.cl"
            path.write_text(src)
            res = clang_opencl(path)
            assert res.returncode == 0, res.stderr[:2000]


def test_prefill_tiles_split_head_dim_and_fit_local_memory():
    """Every profile's prefill kernel splits head_dim across threads (no thread holds a whole q
    row or accumulator at head_dim 256) within its local-memory budget; on CUDA fp16 runs on
    tensor cores (mma.sync, ldmatrix), fp32 on the SIMT kernel."""
    from tvm_lite.schedules.gpu_attention_prefill import m_tiles_for, simt_tiles, \
        tensor_core_tiles

    for profile, tile in TILES.items():
        for d in (32, 64, 128, 256):
            for dtype in ("float16", "float32"):
                p = attention_params(8, 1, d, dtype, 0.1, dtype, False, True, False)
                size = 2 if dtype == "float16" else 4
                rows, keys = simt_tiles(p, tile["threads"], tile["local_bytes"], 8 // size)
                lanes = tile["threads"] // rows
                assert d % lanes == 0 and (d == 32 or d // lanes < d), (profile, d, rows)
                assert (rows + 2 * keys) * (d + 8 // size) * size + rows * (keys + 1) * 4 \
                    <= tile["local_bytes"]
    p = attention_params(8, 1, 256, "float16", 0.0625, "float16", False, True, False, True, True)
    assert tensor_core_tiles(p) == (64, 64)
    # two m-tiles a warp: 128 rows, by default at head_dim <= TC_M_TILES_MAX_DIM only (above,
    # their accumulators spill); asked for (a sweep), at any head_dim, the key tile shrinking
    # to fit shared memory
    assert m_tiles_for(p) == 1 and m_tiles_for(p, 2) == 2
    assert tensor_core_tiles(p, m_tiles=2) == (128, 32)
    assert tensor_core_tiles(dict(p, head_dim=64), m_tiles=2) == (128, 64)
    func, t = _gpu_kernel(p, GPU_TARGETS["cuda"])
    src = tvm_lite.device_source(tvm.compile(
        tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}), target=t), "cuda")
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src and "ldmatrix" in src
    p32 = dict(p, dtype="float32", mask_dtype="float32")
    func, _ = _gpu_kernel(p32, GPU_TARGETS["cuda"])
    assert "tvm_lite_mma16816" not in func.script()


@pytest.mark.parametrize("profile", sorted(GPU_TARGETS))
def test_split_decode_fits_every_profile(profile, tmp_path):
    """Flash-decoding for head_dim 32..256 and GQA ratios 1..16: two kernels (split + merge), the
    profile's local memory and thread limits kept, the query heads of a kv head in one
    workgroup (the grid's y axis is the kv heads), vector loads of K/V; OpenCL passes clang."""
    from tvm_lite.schedules.gpu_attention_decode import plan
    from tvm_lite.schedules.profiles import fit_to_target, gpu_profile

    t = tvm_lite.parse_target(GPU_TARGETS[profile])
    prof = fit_to_target(gpu_profile(profile), t)
    for heads, kv, d in ((9, 3, 64), (8, 1, 256), (16, 1, 128), (4, 4, 32), (32, 8, 128)):
        p = attention_params(heads, kv, d, "float16", 0.1, "float16", False, False, True,
                             merged_heads=True, kv_squeezed=kv == 1)
        pl = plan(p, prof, prof.max_threads)
        assert pl["threads"] <= prof.max_threads and pl["threads"] % pl["DV"] == 0
        local = 4 * (pl["tile"] * (pl["DV"] * pl["G"] + 1 + pl["G"])
                     + pl["L"] * (pl["GH"] * d + 2 * pl["G"]))
        assert local <= prof.local_memory_bytes, (heads, kv, d, local)
        # the key lanes merged GH query heads a round (one at head_dim > 64: measured slower)
        assert pl["G"] % pl["GH"] == 0 and (pl["GH"] == 1 or d <= 64)
        # the merge: a workgroup per (query head, DM dims), DM x P threads
        assert d % pl["DM"] == 0 and pl["DM"] * pl["P"] <= prof.max_threads
        assert pl["V"] * 2 == min(prof.vector_bytes, 2 * d)  # fp16 lanes of one vector load
        func, _ = _gpu_kernel(p, GPU_TARGETS[profile])
        ex = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}), target=t)
        kind = "opencl" if t.kind.name == "opencl" else "cuda"
        src = tvm_lite.device_source(ex, kind)
        kernels = len(set(re.findall(r"(?:__kernel void|__global__ void(?: __launch_bounds__"
                                     r"\(\d+\))?) (\w+)\(", src)))
        assert kernels == 2, (profile, heads, kv, d, kernels)
        if kind == "cuda":
            assert "uint4" in src  # K/V read 16 bytes at a time
            if shutil.which("nvcc"):  # NVRTC-free check that the CUDA C compiles
                path = tmp_path / f"decode_{heads}_{kv}_{d}.cu"
                path.write_text(src)
                res = subprocess.run(["nvcc", "-arch=sm_90", "-c", str(path), "-o",
                                      str(path.with_suffix(".o"))], capture_output=True, text=True)
                assert res.returncode == 0, res.stderr[-2000:]
        elif CLANG:
            path = tmp_path / f"decode_{heads}_{kv}_{d}.cl"
            path.write_text(src)
            res = clang_opencl(path)
            assert res.returncode == 0, res.stderr[:2000]



GPU_CASES = CASES + [
    (9, 3, 64, 130, 300, 5, "float16"),  # several query tiles and key tiles, fp16
    (9, 3, 64, 1, 700, 0, "float16"),    # decode over several key chunks
    (8, 1, 256, 1, 33, 0, "float32"),    # Gemma-shaped decode
    # prefill: head_dim 32-256, GQA 1-8, padding, chunk boundaries (past = a multiple of 256)
    (32, 8, 128, 200, 0, 7, "float16"),   # head_dim 128, GQA 4, padded
    (8, 8, 128, 70, 256, 0, "float16"),   # no GQA, a second chunk
    (8, 1, 256, 300, 0, 3, "float16"),    # Gemma-2B: GQA 8, head_dim 256, padded
    (8, 1, 256, 256, 256, 0, "float16"),  # Gemma-2B, a second 256-token chunk
    (32, 8, 64, 256, 1792, 0, "float16"),  # Llama-3.2-1B, the last chunk of 2048
    (16, 2, 32, 77, 5, 2, "float32"),     # head_dim 32, fp32
    # split-K decode: many splits, a partial last tile, masked keys at the end, GQA 1..8
    (9, 3, 64, 1, 3000, 7, "float16"),
    (8, 1, 256, 1, 2000, 0, "float16"),
    (14, 2, 64, 1, 1500, 3, "float32"),
    (32, 8, 128, 1, 4100, 0, "float16"),
    (4, 4, 32, 1, 100, 0, "float32"),    # multi-head (G = 1), head_dim 32
]


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda", "gpu"])
@pytest.mark.parametrize("heads, kv, d, n, past, pad, dtype", GPU_CASES)
def test_gpu_kernels_numerics_on_cuda(profile, heads, kv, d, n, past, pad, dtype):
    """The profile's schedule (Adreno's/Mali's too) compiled for CUDA, run, checked against numpy:
    its indexing proven on real hardware."""
    rng = np.random.default_rng(1)
    q, k, v, mask = _inputs(rng, heads, kv, d, n, past, dtype, pad)
    merged_heads = n % 2 == 1  # both output layouts
    p = attention_params(heads, kv, d, dtype, d ** -0.5, dtype, False, True, n == 1, merged_heads,
                         kv == 1)
    func, _ = _gpu_kernel(p, GPU_TARGETS[profile])
    # the profile's kernel, built for the CUDA device at hand
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    got = _run(func, target, tvm.cuda(0), q, k, v, mask, merged_heads)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    tol = 2e-3 if dtype == "float16" else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# the split decode kernel's load orders (constants of gpu_attention_decode), off by default
LOAD_ORDERS = {"first_tile": {"FIRST_TILE_WITH_Q": True}, "mask_with_kv": {"MASK_WITH_KV": True},
               "both": {"FIRST_TILE_WITH_Q": True, "MASK_WITH_KV": True}}


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("order", sorted(LOAD_ORDERS))
@pytest.mark.parametrize("heads, kv, d, n, past, pad, dtype",
                         [c for c in GPU_CASES if c[3] == 1] + [(14, 2, 64, 1, 2047, 0, "float16")])
def test_split_decode_load_order_on_cuda(order, heads, kv, d, n, past, pad, dtype, monkeypatch):
    """The load orders on the GPU: the decode cases above (and (14, 2, 64) at 2048 keys) with
    the first tile's loads issued before q's, the mask loaded with K/V, or both."""
    from tvm_lite.schedules import gpu_attention_decode

    for name, value in LOAD_ORDERS[order].items():
        monkeypatch.setattr(gpu_attention_decode, name, value)
    test_gpu_kernels_numerics_on_cuda("cuda", heads, kv, d, n, past, pad, dtype)


def _tensor_core_on_cuda_twice(heads, kv, d, n, past, pad=0, **kernel_args):
    """The tensor-core prefill kernel built with ``kernel_args`` for this GPU (sm_90a for
    wgmma), run twice in a row on the same inputs, each output against numpy."""
    from tvm_lite.schedules.gpu_attention_prefill import tensor_core_kernel

    rng = np.random.default_rng(3)
    q, k, v, mask = _inputs(rng, heads, kv, d, n, past, "float16", pad)
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False,
                         False, kv == 1)
    func = tensor_core_kernel(p, **kernel_args).with_attr("tirx.is_scheduled", True) \
        .with_attr("global_symbol", "attn")
    arch = "sm_90a" if kernel_args.get("wgmma") else "sm_90"
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    ex = tvm.compile(tvm.IRModule({"attn": func}), target=target)
    dev = tvm.cuda(0)
    if kv == 1:
        k, v = k[:, 0], v[:, 0]
    args = [tvm.runtime.tensor(a, dev) for a in (q, k, v, mask)]
    want = reference_numpy(q, k if kv > 1 else k[:, None], v if kv > 1 else v[:, None], mask,
                           d ** -0.5, heads // kv)
    real = n - pad  # padded query rows see no key: their output is not compared
    for _ in range(2):
        out = tvm.runtime.empty(q.shape, "float16", dev)
        ex["attn"](*args, out)
        np.testing.assert_allclose(out.numpy()[:, :, :real], want[:, :, :real], rtol=2e-3,
                                   atol=2e-3)


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("heads, kv, d, n, past", [
    (8, 1, 256, 256, 1792), (32, 8, 64, 256, 1792), (9, 3, 64, 256, 768), (32, 8, 128, 64, 448)])
def test_tensor_core_prefill_merge_in_kernel_on_cuda(heads, kv, d, n, past):
    """``MERGE_IN_KERNEL`` on the GPU: chunks after a cache (key splits), each row tile merged by
    its last split (a ticket, fences, partials read from L2) -- twice in a row, so a ticket
    left off 0 by the first call would show in the second."""
    _tensor_core_on_cuda_twice(heads, kv, d, n, past, merge_in_kernel=True)


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("switches", [
    {"LONGEST_FIRST_ACROSS_HEADS": True}, {"PROMPT_SPLITS": 2},
    {"LONGEST_FIRST_ACROSS_HEADS": True, "PROMPT_SPLITS": 2},
    {"MERGE_IN_KERNEL": True, "MERGE_IN_FLIGHT": 16}])
@pytest.mark.parametrize("heads, kv, d, n, past, pad", [
    (9, 3, 64, 2048, 0, 0), (8, 1, 256, 1000, 0, 9), (32, 8, 64, 512, 0, 0),
    (9, 3, 64, 256, 768, 0), (8, 1, 256, 256, 1792, 0)])
def test_tensor_core_prefill_order_and_splits_on_cuda(switches, heads, kv, d, n, past, pad,
                                                      monkeypatch):
    """The workgroup order across kv heads, a prompt's key splits (merged in the kernel) and the
    chunks' in-kernel merge with two units in flight, on the GPU: prompts (SmolLM2's at 2048,
    Gemma-2B's padded, Llama-1B's at 512) and chunks after a cache, twice in a row (a ticket
    left off 0 shows in the second call)."""
    from tvm_lite.schedules import gpu_attention_prefill

    for name, value in switches.items():
        monkeypatch.setattr(gpu_attention_prefill, name, value)
    _tensor_core_on_cuda_twice(heads, kv, d, n, past, pad)


@pytest.mark.skipif(cuda_device() is None or cuda_device().compute_version != "9.0",
                    reason="needs a Hopper GPU (wgmma, sm_90a)")
@pytest.mark.parametrize("heads, kv, d, n, past, pad", [
    (8, 1, 256, 512, 0, 0), (32, 8, 64, 300, 0, 7), (9, 3, 64, 256, 768, 0),
    (32, 8, 128, 200, 0, 0), (32, 8, 128, 64, 448, 0), (32, 32, 80, 100, 0, 0), (8, 2, 32, 70, 0, 0)])
@pytest.mark.parametrize("ahead", [False, True])
def test_tensor_core_prefill_wgmma_on_cuda(heads, kv, d, n, past, pad, ahead):
    """``TC_WGMMA`` on the H200: Q Kᵀ and P V by wgmma (K-major Q and K, V's descriptor
    transposed, P from registers), prompts (padded too) and chunks after a cache, head_dim
    32-256, with the next tile's Q Kᵀ in flight during the softmax or not -- what the CPU
    emulation cannot prove: the hardware's reading of the layouts, and the waits."""
    _tensor_core_on_cuda_twice(heads, kv, d, n, past, pad, wgmma=True, scores_ahead=ahead)


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda", "gpu"])
@pytest.mark.parametrize("kv, d", [(1, 256), (8, 64)])
def test_gpu_prefill_never_loads_tiles_above_the_diagonal(profile, kv, d):
    """Keys 128.. hold NaN: a workgroup whose rows are all at positions < 64 must not load them
    (a loaded NaN times a zero probability is NaN), so those rows come out exact."""
    rng = np.random.default_rng(2)
    heads, n = 8, 256
    q, k, v, mask = _inputs(rng, heads, kv, d, n, 0, "float16")
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)[:, :, :64]
    k[128:], v[128:] = np.nan, np.nan
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    func, _ = _gpu_kernel(p, GPU_TARGETS[profile])
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    got = _run(func, target, tvm.cuda(0), q, k, v, mask)[:, :, :64]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


# -- soft-capped scores -------------------------------------------------------------------------
_SOFTCAPPED_LAYER = """
@I.ir_module
class Mod:
    @R.function
    def main(x: R.Tensor((1, "seq", 8), "float32"),
             mask: R.Tensor((1, "past_seq + seq"), "int64"),
             past_k: R.Tensor((1, 1, "past_seq", 4), "float32"),
             past_v: R.Tensor((1, 1, "past_seq", 4), "float32"), w: R.Tensor((8, 4), "float32")):
        R.func_attr({"num_input": 4, "tvm_lite.input_names": ["x", "mask", "past.k", "past.v"],
                     "tvm_lite.output_names": ["out", "present.k", "present.v"]})
        seq = T.int64()
        past_seq = T.int64()
        with R.dataflow():
            h = R.reshape(R.matmul(x, w), R.shape([1, seq, 1, 4]))
            kv = R.permute_dims(h, [0, 2, 1, 3])
            pk = R.concat([past_k, kv], axis=2)
            pv = R.concat([past_v, kv], axis=2)
            s = R.matmul(kv, R.permute_dims(pk, [0, 1, 3, 2]))
            s = R.multiply(R.tanh(R.multiply(s, R.const(0.5, "float32"))), R.const(2.0, "float32"))
            keep = R.astype(mask, "bool")  # (1, T): padding
MASK_ROWS
            bias = R.where(keep, R.const(0.0, "float32"), R.const(-1e30, "float32"))
            p = R.nn.softmax(R.add(s, R.expand_dims(bias, [0, 1])), axis=-1)
            o = R.matmul(p, pv)
            gv = (o, pk, pv)
            R.output(gv)
        return gv
"""


# the mask's rows: causal (each query row's keys up to its position) or none (padding only)
_CAUSAL_ROWS = """
            qpos = R.arange(R.prim_value(past_seq), R.prim_value(past_seq + seq), R.prim_value(1), "int64")
            kpos = R.arange(R.prim_value(0), R.prim_value(past_seq + seq), R.prim_value(1), "int64")
            keep = R.logical_and(keep, R.less_equal(R.expand_dims(kpos, [0]), R.expand_dims(qpos, [1])))"""


def _softcapped_layer(causal=True):
    """One decoder layer in the exported layout whose scores are soft-capped before the additive
    mask, ``2 * tanh(s * 0.5)`` (Gemma 2's ``c * tanh(s / c)`` with ``c = 2``). The mask: the
    padding mask ``(1, T)`` and, with ``causal``, each row's keys up to its position (``(1, 1,
    seq, T)``); without, ``(1, 1, 1, T)``."""
    from tvm.script import from_source

    src = _SOFTCAPPED_LAYER.replace("MASK_ROWS\n", _CAUSAL_ROWS[1:] + "\n" if causal else "")
    return from_source(src, extra_vars={"I": I, "R": R, "T": T})


def test_softcapped_attention_is_fused_with_its_cap(caplog):
    """Soft-capping is part of the fused kernel (issue 18): no softmax left, the cap recorded in
    the kernel's parameters, no "left unfused" warning."""
    with caplog.at_level(logging.WARNING, logger="tvm_lite.fuse_attention"):
        mod = _phase1(_softcapped_layer())
    assert "attention_prefill" in [gv.name_hint for gv in mod.get_global_vars()]
    assert _count_calls(mod["prefill"], "attention") == ["attention_prefill"]
    assert '"softcap": 2.0' in str(mod["attention_prefill"].attrs)
    assert not any("left unfused" in r.message for r in caplog.records)


def test_prefill_mask_without_query_rows_is_fused(caplog):
    """A mask with no query-row axis ``(1, 1, 1, T)`` on a prefill of ``seq`` rows (padding only:
    a bidirectional model) is fused too: the kernels walk every key tile whose mask is not causal
    (the kernels' numerics: ``test_prefill_walks_every_key_tile_for_a_non_causal_mask``)."""
    with caplog.at_level(logging.WARNING, logger="tvm_lite.fuse_attention"):
        mod = _phase1(_softcapped_layer(causal=False))
    assert _count_calls(mod["prefill"], "attention") == ["attention_prefill"]
    assert '"mask_rows": False' in str(mod["attention_prefill"].attrs)
    assert not any("left unfused" in r.message for r in caplog.records)


# -- whole models: fused against unfused, and tiny architectures against torch --------------------
@pytest.fixture(scope="module")
def unfused_engine(export_dir):
    """The default model without FuseAttention (cached under $TVM_LITE_CACHE like the others)."""
    art = tvm_lite.compile_model(export_dir("dynamo"), "llvm", fused_attention=False,
                                 progress=lambda _: None)
    return tvm_lite.Engine(art)


@pytest.mark.slow
def test_fused_matches_unfused_smollm2(engine, unfused_engine):
    fused = engine("dynamo")
    assert fused.manifest["options"]["fused_attention"]
    assert not unfused_engine.manifest["options"]["fused_attention"]
    ids = fused.encode_prompt("What is the capital of France? Answer in one sentence.")
    logits = {}
    for name, e in (("fused", fused), ("unfused", unfused_engine)):
        s = e.new_session()
        first = e.prefill(s, ids[:11])  # padded to a bucket: padding rows/keys with mask 0
        rest = e.prefill(s, ids[11:], chunk_size=4)  # chunked prefill continuing a past
        step = e.forward(s, [int(np.argmax(rest[-1]))])  # decode
        logits[name] = (first, rest, step)
    for a, b in zip(logits["fused"], logits["unfused"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-3)
    cfg = tvm_lite.GenerationConfig(max_new_tokens=16)
    assert fused.generate("Name three colors.", cfg).token_ids == \
        unfused_engine.generate("Name three colors.", cfg).token_ids


def test_fires_on_a_torchscript_fp16_export():
    """TorchScript's fp16 export casts the attention probabilities to fp32 and straight back;
    RemoveNoOpOps drops that pair, so the attention fuses as in the dynamo export (the tiny
    Llama: 2 layers)."""
    from tvm_lite import arch_matrix

    onnx_dir = tvm_lite.export_onnx(arch_matrix.hf_folder("llama"), exporter="torchscript",
                                    dtype="float16", progress=lambda _: None)
    mod = _phase1(_imported(onnx_dir))
    for fn in ("prefill", "decode"):
        calls = _count_calls(mod[fn], "attention")
        assert calls.count(f"attention_{fn}") == 2 and "softmax" not in calls, calls


TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.slow
@pytest.mark.parametrize("arch, extra, exporter", [
    ("qwen2", {"tie_word_embeddings": False}, "torchscript"),
    ("qwen3", {"head_dim": 32}, "dynamo"),
    # Gemma: one kv head, head_dim 256, scale 1/sqrt(head_dim) (the lead runs a 2B-shaped one)
    ("gemma", {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256}, "dynamo"),
])
def test_tiny_architectures_fuse_and_match_torch(arch, extra, exporter, tmp_path, export_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **{**TINY, **extra})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    src = tmp_path / arch
    model.save_pretrained(src)
    for f in glob.glob(str(export_dir("dynamo") / "tokenizer*")):
        shutil.copy(f, src)
    onnx_dir = tvm_lite.export_onnx(src, out_dir=tmp_path / "onnx", exporter=exporter,
                                    progress=lambda _: None)
    mod = _phase1(_imported(onnx_dir))
    for fn in ("prefill", "decode"):
        assert _count_calls(mod[fn], "attention").count(f"attention_{fn}") == 2
    art = tvm_lite.compile_model(onnx_dir, "llvm", out_dir=tmp_path / "art", progress=lambda _: None)
    engine = tvm_lite.Engine(art)
    ids = [5, 17, 300, 42, 9, 1000, 7]
    session = engine.new_session()
    first = engine.prefill(session, ids[:4])
    rest = engine.forward(session, ids[4:])
    last = engine.forward(session, [11])
    with torch.no_grad():
        ref = model(torch.tensor([ids + [11]])).logits[0].numpy()
    np.testing.assert_allclose(first, ref[3], atol=1e-4)
    np.testing.assert_allclose(rest, ref[4:7], atol=1e-4)
    np.testing.assert_allclose(last[-1], ref[7], atol=1e-4)


# -- the split-K decode kernels' CUDA C, run on the CPU --------------------------------------------
EMULATED = [  # heads, kv heads, head_dim, context, masked keys at the end
    (9, 3, 64, 300, 5), (8, 1, 256, 200, 3), (32, 8, 128, 130, 0), (4, 4, 32, 77, 2),
]


def _cuda_decode_case(rng, heads, kv, d, m, pad, mask_heads=False):
    """(params, the CUDA profile's plan, fp32 inputs) of a decode step at context ``m`` with the
    last ``pad`` keys masked (``mask_heads``: params for a mask per query head)."""
    from tvm_lite.schedules import gpu_attention_decode
    from tvm_lite.schedules.profiles import fit_to_target, gpu_profile

    prof = fit_to_target(gpu_profile("cuda"), tvm_lite.parse_target("cuda -arch=sm_90"))
    p = attention_params(heads, kv, d, "float32", d ** -0.5, "float32", mask_heads, False, True,
                         merged_heads=True, kv_squeezed=kv == 1)
    return (p, gpu_attention_decode.plan(p, prof, prof.max_threads),
            _inputs(rng, heads, kv, d, 1, m - 1, "float32", pad))


def _check_decode_on_cpu(p, pl, q, k, v, mask, tmp_path):
    """The CUDA profile's split + merge decode kernels for ``p`` (plan ``pl``) as fp32 CUDA C run
    on the CPU (tests/cuda_on_cpu.py), against numpy."""
    from cuda_on_cpu import run_decode_attention

    heads, d = p["heads"], p["head_dim"]
    func, _ = _gpu_kernel(p, GPU_TARGETS["cuda"])
    ex = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}),
                     target=tvm_lite.parse_target("cuda -arch=sm_90"))
    got = run_decode_attention(tvm_lite.device_source(ex, "cuda"), pl, q, k, v, mask, tmp_path)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // p["kv_heads"])
    np.testing.assert_allclose(got.reshape(1, 1, heads, d).transpose(0, 2, 1, 3), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
def test_split_decode_with_fewer_lanes_for_large_groups(monkeypatch, tmp_path):
    """A lower accumulator limit halves the vector lanes where the GQA group is large (8 query
    heads: 2 lanes of fp32 instead of 4); the kernels still match numpy."""
    from tvm_lite.schedules import gpu_attention_decode

    monkeypatch.setattr(gpu_attention_decode, "MAX_ACCUMULATORS", 16)
    rng = np.random.default_rng(5)
    for heads, kv, d, m, pad in [(8, 1, 256, 200, 3), (9, 3, 64, 300, 5)]:
        p, pl, (q, k, v, mask) = _cuda_decode_case(rng, heads, kv, d, m, pad)
        assert pl["G"] * pl["V"] <= 16 and pl["V"] == (2 if heads // kv == 8 else 4)
        _check_decode_on_cpu(p, pl, q, k, v, mask, tmp_path)


def test_split_decode_halves_vector_lanes_while_key_lanes_last():
    """FEWER_ACCUMULATORS: fp16 on CUDA, a group of 7 query heads (14 / 2, head_dim 64) takes 4
    lanes (28 accumulators, 8 key lanes) instead of 8; a group of 8 at head_dim 256 keeps 8 (4
    would leave 2 key lanes, under FEWER_MIN_KEY_LANES); a group of 3 is under the limit."""
    from tvm_lite.schedules import gpu_attention_decode as dec
    from tvm_lite.schedules.profiles import fit_to_target, gpu_profile

    prof = fit_to_target(gpu_profile("cuda"), tvm_lite.parse_target("cuda -arch=sm_90"))
    got = {}
    for heads, kv, d in [(14, 2, 64), (8, 1, 256), (9, 3, 64)]:
        p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, False, True,
                             merged_heads=True, kv_squeezed=kv == 1)
        pl = dec.plan(p, prof, prof.max_threads)
        got[(heads, kv, d)] = (pl["V"], pl["L"])
    assert dec.FEWER_ACCUMULATORS == 32 and dec.FEWER_MIN_KEY_LANES == 8
    assert got == {(14, 2, 64): (4, 8), (8, 1, 256): (8, 4), (9, 3, 64): (8, 16)}, got


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("order, check", [
    ("first_tile", "ring"), ("first_tile", "opencl"), ("mask_with_kv", "opencl"),
    ("both", "emulated")])
def test_split_decode_load_order(order, check, monkeypatch, tmp_path):
    """The split kernel's load orders: ``FIRST_TILE_WITH_Q`` (the first key tile loaded before
    q, q by vector loads, the loop loading the later tiles), ``MASK_WITH_KV`` (each thread's
    mask values of the tile loaded with its K/V, before the barriers), both. Emulated (fp32
    CUDA C on the CPU) against numpy: one-tile and many-tile splits, masked keys, a mask per
    query head, GQA 1-8, head_dim 32-256 (both orders at once: each alone takes the same code
    paths; both are off, each lost a shape on an H100); the ring cache's decode (its first tile
    is the live window's); Adreno's and Mali's OpenCL through clang."""
    from tvm_lite.schedules import gpu_attention_decode

    for name, value in LOAD_ORDERS[order].items():
        monkeypatch.setattr(gpu_attention_decode, name, value)
    if check == "emulated":
        rng = np.random.default_rng(13)
        for heads, kv, d, m, pad in EMULATED + [(14, 2, 64, 2048, 3)]:  # one-tile splits
            p, pl, (q, k, v, mask) = _cuda_decode_case(rng, heads, kv, d, m, pad)
            _check_decode_on_cpu(p, pl, q, k, v, mask, tmp_path)
        # a mask per query head (each head its own padded keys): the score of (key, head)
        # takes that head's value
        p, pl, (q, k, v, _) = _cuda_decode_case(rng, 9, 3, 64, 300, 0, mask_heads=True)
        mask = np.where(np.arange(300)[None, :] < 300 - 7 * np.arange(9)[:, None], 0.0,
                        np.finfo("float32").min).astype("float32")[None, :, None, :]
        _check_decode_on_cpu(p, pl, q, k, v, mask, tmp_path)
        # one split a kv head (no workgroups per unit asked for): every split walks many tiles
        monkeypatch.setattr(gpu_attention_decode, "WORKGROUPS_PER_UNIT", 0)
        for heads, kv, d, m, pad in EMULATED[:2]:
            p, pl, (q, k, v, mask) = _cuda_decode_case(rng, heads, kv, d, m, pad)
            assert pl["max_splits"] == 1 and m > 4 * pl["tile"]
            _check_decode_on_cpu(p, pl, q, k, v, mask, tmp_path)
    elif check == "ring":
        test_gpu_ring_decode_cuda_c_run_on_the_cpu_matches_numpy("cuda", tmp_path)
    else:
        for profile in ("adreno", "mali"):
            test_split_decode_fits_every_profile(profile, tmp_path)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("unroll, many", [(1, 0), (2, 0), (8, 0), (2, 4), (8, 16)])
def test_split_decode_merge_rounds_on_the_cpu(unroll, many, monkeypatch, tmp_path):
    """``MERGE_UNROLL``: each merge lane loads that many splits before folding them. Contexts
    with more splits than a round of the 16 lanes covers, and a last round cut short (35 and 69
    splits of 32 keys), against numpy. ``MERGE_UNROLL_MANY``: rounds of that many where a lane
    has more than ``MERGE_UNROLL`` splits -- (2, 4) takes them in both contexts, (8, 16) in
    neither (the kernel's other branch)."""
    from tvm_lite.schedules import gpu_attention_decode

    monkeypatch.setattr(gpu_attention_decode, "MERGE_UNROLL", unroll)
    monkeypatch.setattr(gpu_attention_decode, "MERGE_UNROLL_MANY", many)
    rng = np.random.default_rng(9)
    for heads, kv, d, m, pad in [(2, 1, 64, 1100, 4), (4, 2, 64, 2200, 0)]:
        p, pl, (q, k, v, mask) = _cuda_decode_case(rng, heads, kv, d, m, pad)
        splits = -(-m // (max(pl["min_tiles"], -(-m // (pl["max_splits"] * pl["tile"])))
                          * pl["tile"]))
        assert splits > pl["P"] * unroll or unroll == 8, splits
        _check_decode_on_cpu(p, pl, q, k, v, mask, tmp_path)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda"])
def test_split_decode_cuda_c_run_on_the_cpu_matches_numpy(profile, tmp_path):
    """Each profile's split + merge kernels, as CUDA C (fp32), with threads as CPU threads and
    barriers as std::barrier (tests/cuda_on_cpu.py): splits, partial tiles, masked keys, GQA 1..8,
    head_dim 32..256 against numpy, without a GPU."""
    from cuda_on_cpu import run_decode_attention

    from tvm_lite.schedules.gpu_attention_decode import plan
    from tvm_lite.schedules.profiles import fit_to_target, gpu_profile

    rng = np.random.default_rng(2)
    cuda = tvm_lite.parse_target("cuda -arch=sm_90")
    t = tvm_lite.parse_target(GPU_TARGETS[profile])
    for i, (heads, kv, d, m, pad) in enumerate(EMULATED):
        cap = 1.5 if i % 2 else 0.0  # soft-capped scores (Gemma 2) in every other case
        q, k, v, mask = _inputs(rng, heads, kv, d, 1, m - 1, "float32", pad)
        p = attention_params(heads, kv, d, "float32", d ** -0.5, "float32", False, False, True,
                             merged_heads=True, kv_squeezed=kv == 1, softcap=cap)
        func, _ = _gpu_kernel(p, GPU_TARGETS[profile])
        ex = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}),
                         target=cuda)
        prof = fit_to_target(gpu_profile(profile), t)
        got = run_decode_attention(tvm_lite.device_source(ex, "cuda"),
                                   plan(p, prof, prof.max_threads), q, k, v, mask, tmp_path)
        want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv, softcap=cap)
        np.testing.assert_allclose(got.reshape(1, 1, heads, d).transpose(0, 2, 1, 3), want,
                                   rtol=1e-5, atol=1e-5)


def test_tensor_core_prefill_splits_keys_only_for_small_grids():
    """The split count is evaluated at run time from ``n`` and ``m``: a 256-token chunk of a
    one-kv-head model (32 workgroups) splits its 2048 keys, a 2048-token Llama prompt (1,024
    workgroups) does not, a 2048-token Gemma-2B prompt (256) does in two (PROMPT_SPLITS, from
    PROMPT_SPLIT_MIN_KEYS keys: a 512-token prompt does not); the split kernel is followed by
    the merge kernel."""
    from tvm_lite.schedules.gpu_attention_prefill import split_value, tensor_core_kernel

    def count(heads, kv, n, m):
        p = attention_params(heads, kv, 64, "float16", 0.125, "float16", False, True, False, True,
                             kv == 1)
        return split_value(p, 64, 64, n, m)

    assert count(8, 1, 256, 2048) == 8  # Gemma-shaped chunk: 32 workgroups
    # Llama-1B: a chunk after a cache rounds down to one wave (2 x 128 workgroups); the first
    # chunk and a whole prompt are not split (the merge cost more than the split saved)
    assert count(32, 8, 256, 2048) == 2
    assert count(32, 8, 256, 512) == 2  # m = 2 n: a chunk
    assert count(32, 8, 512, 768) == 1  # m < 2 n
    assert count(32, 8, 2048, 2048) == 1
    assert count(8, 1, 2048, 2048) == 2  # Gemma-2B prompt: 256 workgroups, 2048 keys
    assert count(8, 1, 512, 512) == 1  # 64 workgroups, but 512 keys: not split
    assert count(8, 1, 64, 64) == 1  # one key tile: nothing to split
    p = attention_params(8, 1, 256, "float16", 0.0625, "float16", False, True, False, True, True)
    assert split_value(p, 64, 64, 256, 2048) == 4  # head_dim 256: half the wave (SPLIT_WAVE_WIDE_HEADS)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    for split, kernels in ((True, 2), (False, 1)):
        func = tensor_core_kernel(p, split=split).with_attr("global_symbol", "main") \
            .with_attr("tirx.is_scheduled", True)
        src = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.imports[0].inspect_source()
        assert len(set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", src))) == kernels



# heads, kv heads, head_dim, n, past: one split (21 workgroups, 3 key tiles: too few to split),
# then small chunks after a cache (2 splits each): SmolLM2-, GQA-4- and Gemma-shaped (head_dim 256)
TC_CPU_CASES = [(9, 3, 64, 130, 0, 1), (9, 3, 64, 40, 300, 1), (8, 2, 64, 32, 224, 1),
                (8, 1, 256, 16, 240, 1),
                (8, 2, 32, 70, 0, 1), (32, 32, 80, 50, 0, 1),  # head_dim 32; Phi-2's 80, no GQA
                # two m-tiles a warp (128-row workgroups): one split, then a 2-split chunk;
                # head_dim 128 (a sweep's variant: bench.prefill --m-tiles 2)
                (9, 3, 64, 130, 0, 2), (8, 2, 64, 64, 224, 2), (8, 2, 128, 70, 0, 2)]


def _profile_prefill_on_cpu(p, profile, n, m, m_tiles=None, merge_in_kernel=None, wgmma=False):
    """The ``profile``'s prefill kernel for ``p`` (``n``, ``m`` static) compiled for CUDA, and a
    function running its CUDA C on the CPU (tests/mma_on_cpu.py): ``run(q, k, v, mask, dir)``
    -> out (1, H, n, D) in ``p``'s dtype. ``m_tiles``: the tensor-core kernel's m-tiles a warp;
    ``merge_in_kernel``: its splits merged by the last of them (no merge kernel); ``wgmma``:
    both products by wgmma (compiled for sm_90a).
    Returns (run, (rows, keys) of its tiles, key splits)."""
    from mma_on_cpu import run_kernels_to
    from tvm_lite.schedules.gpu_attention_prefill import grid as prefill_grid, merge_dims, \
        prefill_kernel, simt_tiles, split_value, tensor_core_kernel, tensor_core_tiles
    from tvm_lite.schedules.profiles import gpu_profile

    heads, kv, d = p["heads"], p["kv_heads"], p["head_dim"]
    t = tvm_lite.parse_target(GPU_TARGETS[profile])
    tile, G = TILES[profile], heads // kv
    vector_bytes = gpu_profile(profile).vector_bytes
    spl = 1
    if profile == "cuda" and p["dtype"] == "float16":
        func = tensor_core_kernel(p, static={"n": n, "m": m}, m_tiles=m_tiles,
                                  merge_in_kernel=merge_in_kernel, wgmma=wgmma)
        rows, keys = tensor_core_tiles(p, m_tiles=m_tiles)
        spl = split_value(p, rows, keys, n, m)
        grids = {"attn_kernel": prefill_grid(kv, -(-n * G // rows), spl)}
        if not merge_in_kernel:
            grids["attn_kernel_1"] = ((-(-n * d // merge_dims(p) // 256), heads, 1) if spl > 1
                                      else (1, 1, 1))
        mask_name = "mflat_ptr"
    else:
        func = prefill_kernel(p, profile, t, tile["threads"], tile["local_bytes"], vector_bytes,
                              static={"n": n, "m": m})
        threads = min(tile["threads"], int(t.attrs["max_num_threads"]))
        vec = max(1, min(vector_bytes // np.dtype(p["dtype"]).itemsize, 8))
        rows, keys = simt_tiles(p, threads, tile["local_bytes"], vec)
        grids, mask_name = {"attn_kernel": prefill_grid(kv, -(-n * G // rows))}, "mask_ptr"
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a" if wgmma else "sm_90"},
                               host={"kind": "llvm"})
    src = tvm_lite.device_source(tvm.compile(tvm.IRModule(
        {"attn": func.with_attr("global_symbol", "attn").with_attr("tirx.is_scheduled", True)}),
        target=target), "cuda")

    def run(q, k, v, mask, out_dir):
        out_dir.mkdir()
        if p["kv_squeezed"]:
            k, v = k[:, 0], v[:, 0]
        size = heads * n * d
        got = run_kernels_to(src, {"q_ptr": q, "k_ptr": k, "v_ptr": v, mask_name: mask}, grids,
                             {"o_ptr": (size, np.dtype(p["dtype"]))}, out_dir, size * 8)
        return got["o_ptr"].reshape(1, heads, n, d)

    run.src = src  # (what a test may check of the CUDA C)
    return run, (rows, keys), spl


def _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path, m_tiles=None, merge_in_kernel=None,
                        wgmma=False):
    """Build the tensor-core prefill kernel for ``p`` with ``n`` and ``m`` static, run its CUDA
    C on the CPU (tests/mma_on_cpu.py) and return (output (1, H, n, D), key splits, rows)."""
    n = q.shape[2]
    run, (rows, _), splits = _profile_prefill_on_cpu(p, "cuda", n, past + n, m_tiles,
                                                     merge_in_kernel, wgmma)
    return run(q, k, v, mask, tmp_path / "out"), splits, rows


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, m_tiles", TC_CPU_CASES)
def test_tensor_core_prefill_cuda_c_run_on_the_cpu_matches_numpy(heads, kv, d, n, past, m_tiles,
                                                                  tmp_path):
    """The tensor-core prefill kernel's generated CUDA C -- key splits and their merge included,
    one or two 16-row m-tiles a warp -- run on the CPU with the PTX helpers emulated lane by lane
    (tests/mma_on_cpu.py)."""
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(4), heads, kv, d, n, past, "float16", 0)
    got, splits, rows = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path, m_tiles)
    assert rows == 64 * m_tiles
    assert (splits > 1) == (past > 0)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


_STORE_SHAPES = [(9, 3, 64, 130, 1), (8, 2, 128, 70, 1), (8, 1, 256, 40, 1), (9, 3, 64, 130, 2),
                 (4, 4, 80, 50, 1)]  # head_dim 80 (Phi-2's): 10 16-byte vectors a row


# (the paired stores, the default, run at every TC_CPU_CASES shape too)
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("stores, heads, kv, d, n, m_tiles", [
    *(("staged", *shape) for shape in _STORE_SHAPES),
    ("one", *_STORE_SHAPES[0]), ("one", *_STORE_SHAPES[2]), ("pairs", *_STORE_SHAPES[1])])
def test_tensor_core_prefill_output_stores_on_the_cpu(stores, heads, kv, d, n, m_tiles, tmp_path,
                                                      monkeypatch):
    """An unsplit call's output stored one fp16 at a time, two dims a 4-byte store
    (``TC_PAIR_STORES``) or staged through the warp's rows of Q's tile and stored 16 bytes a
    thread (``TC_STAGED_STORES``): the rows past ``n`` not written (partial row tiles), at
    head_dim 64, 80, 128 and 256 and two m-tiles a warp. CUDA C run on the CPU."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_PAIR_STORES", stores == "pairs")
    monkeypatch.setattr(gpu_attention_prefill, "TC_STAGED_STORES", stores == "staged")
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(7), heads, kv, d, n, 0, "float16", 0)
    run, _, splits = _profile_prefill_on_cpu(p, "cuda", n, n, m_tiles)
    assert splits == 1
    assert ("tvm_lite_st_f16x2(" in run.src) == (stores != "one")
    assert ("tvm_lite_st_v4(" in run.src) == (stores == "staged")
    got = run(q, k, v, mask, tmp_path / "out")
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, pairs, in_kernel", [
    (9, 3, 64, 40, 300, True, True),  # SmolLM2-shaped chunk, merged by the last split
    (8, 1, 256, 16, 240, False, False)])  # Gemma-2B's head_dim, one dim a store, merge kernel
def test_tensor_core_prefill_pair_partials_on_the_cpu(heads, kv, d, n, past, pairs, in_kernel,
                                                      tmp_path, monkeypatch):
    """``TC_PAIR_PARTIALS`` (on by default; the split tests below run it at every shape): a
    split's fp32 partials stored two dims an 8-byte store, or one dim a store where off, then
    merged. CUDA C run on the CPU, against numpy."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_PAIR_PARTIALS", pairs)
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(8), heads, kv, d, n, past, "float16", 0)
    run, _, splits = _profile_prefill_on_cpu(p, "cuda", n, past + n, None, in_kernel)
    assert splits > 1
    assert bool(re.search(r"\*\(float2\*\)\(ws_o_ptr \+", run.src)) == pairs, run.src[:200]
    got = run(q, k, v, mask, tmp_path / "out")
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past", [
    (9, 3, 64, 40, 300),   # SmolLM2-shaped chunk: 2 splits
    (8, 1, 64, 16, 1008),  # one kv head, 2 workgroups: SPLIT_MAX splits (the unrolled loop full)
    (8, 1, 256, 16, 240),  # Gemma-2B's head_dim
    (4, 4, 80, 16, 300)])  # head_dim 80 (Phi-2's), no GQA
@pytest.mark.parametrize("in_kernel", [False, True])
def test_tensor_core_prefill_split_merge_on_the_cpu(heads, kv, d, n, past, in_kernel, tmp_path):
    """The split kernel's merge (``MERGE_VEC`` dims a thread, the splits unrolled, loads guarded
    by the run-time split count), in its own kernel or (``MERGE_IN_KERNEL``) by the last split
    of each row tile, found by its ticket. The CUDA C run on the CPU, against numpy."""
    from tvm_lite.schedules import gpu_attention_prefill

    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(6), heads, kv, d, n, past, "float16", 0)
    got, splits, _ = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path,
                                         merge_in_kernel=in_kernel)
    assert splits > 1
    if (heads, n, past) == (8, 16, 1008):
        assert splits == gpu_attention_prefill.SPLIT_MAX
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, pad, hole", [
    (16, 4, 64, 140, 0, 5, None),    # Llama-1B's group of 4: padded keys (last tiles not clean)
    (9, 3, 64, 130, 70, 0, 37),      # a chunk after a cache, one key masked for every row
    (8, 1, 256, 70, 0, 3, 20),       # Gemma-2B's: 16-key tiles, 3 positions a warp
    (8, 2, 64, 150, 0, 0, None)])    # causal only
def test_tensor_core_prefill_clean_tiles_on_the_cpu(heads, kv, d, n, past, pad, hole, tmp_path,
                                                     monkeypatch):
    """``TC_MASK_CLEAN_TILES``: a warp's vote over its positions' mask elements decides whether a
    whole key tile adds the mask. Tiles holding padded keys, the diagonal or a masked key below it
    (``hole``: masked for every row) must vote "not clean"; the others skip the mask. The CUDA C
    run on the CPU, against numpy."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_MASK_CLEAN_TILES", True)
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    src = tvm_lite.device_source(tvm.compile(tvm.IRModule({"attn": gpu_attention_prefill
        .tensor_core_kernel(p, static={"n": n, "m": past + n}).with_attr("global_symbol", "attn")
        .with_attr("tirx.is_scheduled", True)}), target=tvm.target.Target(
            {"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})), "cuda")
    assert "tvm_lite_warp_none(" in src
    q, k, v, mask = _inputs(np.random.default_rng(5), heads, kv, d, n, past, "float16", pad)
    if hole is not None:
        mask[..., hole] = np.finfo(np.float16).min
    got, _, _ = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    real = n - pad  # padded query rows see no key: their output is not compared
    np.testing.assert_allclose(got[:, :, :real].astype(np.float32), want[:, :, :real],
                               rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
def test_tensor_core_prefill_reads_a_per_head_mask_on_the_cpu(tmp_path):
    """A mask with a head axis ``(1, H, n, m)``: causal and padded, plus a different additive
    bias per head (ALiBi-like, so a head reading another head's row would be off), through the
    kernel's flat view of the mask; 100 rows after 37 cached keys (a chunk whose last key tile is
    partial). The CUDA C run on the CPU (tests/mma_on_cpu.py)."""
    heads, kv, d, n, past = 8, 2, 64, 100, 37
    m = past + n
    q, k, v, mask = _inputs(np.random.default_rng(8), heads, kv, d, n, past, "float16", pad=3)
    slope = np.linspace(0.05, 0.4, heads)[:, None, None]
    bias = -slope * np.abs(np.arange(m)[None, None, :] - past - np.arange(n)[None, :, None])
    lowest = np.finfo(np.float16).min
    mask = np.maximum(mask[0].astype("float32") + bias, lowest).astype("float16")[None]  # (1, H, n, m)
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", True, True, False, False,
                         False)
    assert p["mask_heads"] and p["mask_rows"]
    got, _, _ = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got[:, :, :n - 3].astype(np.float32), want[:, :, :n - 3],
                               rtol=2e-3, atol=2e-3)


# -- sliding-window layers' ring caches on the GPU: CUDA C run on the CPU -------------------------
def _ring_case(rng, heads, kv, d, window, past, n, dtype, softcap=0.0):
    """A ring cache after ``past`` tokens (slots holding no position the call may read are NaN:
    never-written slots and the one of position ``past - window``), ``n`` new rows and their
    queries; numpy attention over the whole history with the window mask; the ring's rows that
    must hold positions ``[past + n - window, past + n)`` after the call."""
    m = past + n
    keys, values = (rng.standard_normal((m, kv, d)).astype(dtype) for _ in range(2))
    ring = np.full((2, window, kv, d), np.nan, dtype)
    for a in range(max(0, past - window + 1), past):
        ring[:, a % window] = keys[a], values[a]
    new = [x[past:].transpose(1, 0, 2)[None].copy() for x in (keys, values)]
    q = rng.standard_normal((1, heads, n, d)).astype(dtype)
    qpos, kpos = past + np.arange(n)[:, None], np.arange(m)[None]
    mask = np.where((kpos <= qpos) & (kpos > qpos - window), 0, -np.inf)[None, None]
    want = reference_numpy(q, keys, values, mask, d ** -0.5, heads // kv, softcap)
    kept = np.arange(max(0, m - window), m)
    return q, ring, new, want, (kept % window, keys[kept], values[kept])


RING_ARCH = "sm_90"  # (sm_90a where a test builds the wgmma ring kernel)


def _ring_kernel_on_cpu(func, p, case, grids, tmp_path, work_floats=1 << 20):
    """Run the ring kernel ``func``'s CUDA C on the CPU (tests/mma_on_cpu.py) on ``case``:
    ``grids`` one (gx, gy, gz) per kernel in launch order. Returns (out (1, H, n, D), ring k, v)."""
    from mma_on_cpu import _kernels, run_kernels_to

    q, ring, new, _, _ = case
    target = tvm.target.Target({"kind": "cuda", "arch": RING_ARCH}, host={"kind": "llvm"})
    func = func.with_attr("global_symbol", "attn").with_attr("tirx.is_scheduled", True)
    src = tvm_lite.device_source(tvm.compile(tvm.IRModule({"attn": func}), target=target), "cuda")
    names = [k[0] for k in _kernels(src)[1]]
    assert len(names) == len(grids), (names, grids)
    squeeze = (lambda a: a[:, 0]) if p["kv_squeezed"] else (lambda a: a)
    _, heads, n, d = q.shape
    dt = np.dtype(p["dtype"])
    got = run_kernels_to(src, {"q_ptr": q, "k_ptr": squeeze(ring[0]), "v_ptr": squeeze(ring[1]),
                               "nk_ptr": new[0], "nv_ptr": new[1]}, dict(zip(names, grids)),
                         {"o_ptr": (heads * n * d, dt), "k_ptr": (ring[0].size, dt),
                          "v_ptr": (ring[1].size, dt)}, tmp_path, work_floats)
    out = got["o_ptr"].reshape(1, n, heads, d).transpose(0, 2, 1, 3) if p["merged_heads"] \
        else got["o_ptr"].reshape(1, heads, n, d)
    return out, got["k_ptr"].reshape(ring[0].shape), got["v_ptr"].reshape(ring[1].shape)


def _check_ring(got, case, tol):
    out, rk, rv = got
    _, _, _, want, (slots, keys, values) = case
    np.testing.assert_allclose(out.astype("float32"), want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(rk[slots], keys)  # the ring holds the last window positions
    np.testing.assert_array_equal(rv[slots], values)


def _write_grid(p, n, threads=128):
    return (-(-min(n, p["window"]) * p["kv_heads"] * p["head_dim"] // threads), 1, 1)


# heads, kv heads, head_dim, window, past, n: a prefill longer than the window, chunks after a
# full ring and before it fills, GQA 1..4, one kv head of head_dim 64
RING_PREFILL = [(4, 2, 16, 8, 0, 40), (4, 2, 16, 8, 21, 5), (8, 2, 32, 16, 9, 30),
                (4, 1, 64, 8, 3, 2), (4, 4, 16, 32, 50, 70)]
RING_DECODE = [(4, 2, 16, 8, 0), (4, 2, 16, 8, 5), (8, 2, 32, 16, 100), (4, 1, 64, 8, 7),
               (9, 3, 64, 64, 300)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda", "gpu"])
def test_gpu_ring_decode_cuda_c_run_on_the_cpu_matches_numpy(profile, tmp_path):
    """Each profile's ring decode (the new row written at ``past mod W``, then flash-decoding over
    the live window only: ``min(past + 1, W)`` ring slots, no mask), as CUDA C (fp32) on the CPU:
    against numpy attention over the whole history with the window mask, before and after the
    ring fills, soft-capped in every other case; the ring then holds the last ``W`` positions.
    NaN in every slot the step must not read."""
    from tvm_lite.schedules.gpu_attention_decode import decode_kernel, plan
    from tvm_lite.schedules.profiles import fit_to_target, gpu_profile

    rng = np.random.default_rng(5)
    prof = fit_to_target(gpu_profile(profile), tvm_lite.parse_target(GPU_TARGETS[profile]))
    for i, (heads, kv, d, window, past) in enumerate(RING_DECODE):
        cap = 1.5 if i % 2 else 0.0
        p = attention_params(heads, kv, d, "float32", d ** -0.5, "float32", False, False, True,
                             merged_heads=True, kv_squeezed=kv == 1, softcap=cap, window=window)
        case = _ring_case(rng, heads, kv, d, window, past, 1, "float32", cap)
        pl = plan(p, prof, prof.max_threads)
        m = min(past + 1, window)  # the keys the step reads: the live window
        chunk_tiles = max(pl["min_tiles"], -(-m // (pl["max_splits"] * pl["tile"])))
        splits = -(-m // (chunk_tiles * pl["tile"]))
        func = decode_kernel(p, prof, prof.max_threads, static={"past": past})
        got = _ring_kernel_on_cpu(func, p, case, [_write_grid(p, 1), (splits, kv, 1),
                                                  (heads, d // pl["DM"], 1)], tmp_path)
        _check_ring(got, case, 1e-5)


def _ring_prefill(p, profile, n, past):
    """The profile's ring prefill kernel with ``n`` and ``past`` static, its grids (launch order)
    and its (rows, keys) tile."""
    from tvm_lite.schedules.gpu_attention_prefill import (grid as prefill_grid, prefill_kernel,
                                                          simt_tiles, split_value,
                                                          tensor_core_applies, tensor_core_tiles)
    from tvm_lite.schedules.profiles import gpu_profile

    t = tvm_lite.parse_target(GPU_TARGETS[profile])
    tile = TILES[profile]
    G, kv, m = p["heads"] // p["kv_heads"], p["kv_heads"], min(past, p["window"] - 1) + n
    func = prefill_kernel(p, profile, t, tile["threads"], tile["local_bytes"],
                          gpu_profile(profile).vector_bytes, static={"past": past, "n": n})
    if profile == "cuda" and tensor_core_applies(p, t):
        rows, keys = tensor_core_tiles(p)
        spl = split_value(p, rows, keys, n, m)
        grids = [prefill_grid(kv, -(-n * G // rows), spl)]
        grids += [(-(-n * p["head_dim"] // 256), p["heads"], 1)] if spl > 1 else []
        threads = 128
    else:
        threads = min(tile["threads"], int(t.attrs["max_num_threads"]))
        vec = min(gpu_profile(profile).vector_bytes // 2, 8)  # fp16 lanes, as simt_kernel
        while p["head_dim"] % vec:
            vec //= 2
        rows, keys = simt_tiles(p, threads, tile["local_bytes"], vec)
        grids = [prefill_grid(kv, -(-n * G // rows))]
    return func, grids + [_write_grid(p, n, threads)], (rows, keys)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda", "gpu"])
def test_gpu_ring_prefill_cuda_c_run_on_the_cpu_matches_numpy(profile, tmp_path):
    """Each profile's ring prefill (keys: the ring's last ``min(past, W - 1)`` positions, then the
    new rows; causal and window by position; the last ``min(n, W)`` rows written after), fp16 (the
    tensor-core kernel on CUDA, the SIMT kernel elsewhere), as CUDA C on the CPU against numpy."""
    rng = np.random.default_rng(6)
    for i, (heads, kv, d, window, past, n) in enumerate(RING_PREFILL):
        cap = 1.5 if i % 2 else 0.0
        p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False,
                             kv_squeezed=kv == 1, softcap=cap, window=window)
        case = _ring_case(rng, heads, kv, d, window, past, n, "float16", cap)
        func, grids, _ = _ring_prefill(p, profile, n, past)
        _check_ring(_ring_kernel_on_cpu(func, p, case, grids, tmp_path), case, 2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda", "gpu"])
@pytest.mark.parametrize("kv, d", [(1, 64), (2, 32)])
def test_gpu_ring_prefill_never_loads_tiles_below_the_window(profile, kv, d, tmp_path):
    """A 200-token chunk after 40 tokens, window 16: the last row tile's positions see only the
    keys of the last ~16 positions, so every key tile below the tile of its first visible key
    -- the whole ring and most new rows -- holds NaN (K and V): a loaded NaN times a zero
    probability is NaN, so those rows come out exact only if no such tile is loaded. (The
    kernels' CUDA C run on the CPU; tiles above the diagonal: the test before.)"""
    heads, window, past, n = 8, 16, 40, 200
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False,
                         kv_squeezed=kv == 1, window=window)
    case = _ring_case(np.random.default_rng(7), heads, kv, d, window, past, n, "float16")
    func, grids, (rows, keys) = _ring_prefill(p, profile, n, past)
    G, ring_rows = heads // kv, window - 1
    first_pos = (-(-n * G // rows) - 1) * rows // G  # the last row tile's first position
    below = (first_pos + ring_rows + 1 - window) // keys * keys  # keys of the tiles below
    assert below > ring_rows + 2 * keys  # the ring and tiles of new rows
    q, ring, new, want, kept = case
    ring[:] = np.nan
    for x in new:
        x[0, :, :below - ring_rows] = np.nan
    got = _ring_kernel_on_cpu(func, p, (q, ring, new, want, kept), grids, tmp_path)[0]
    np.testing.assert_allclose(got[:, :, first_pos:].astype("float32"), want[:, :, first_pos:],
                               rtol=2e-3, atol=2e-3)
    assert np.isnan(got[:, :, :first_pos]).any()  # (earlier rows do read the NaN keys)


@pytest.mark.skipif(cuda_device() is None, reason="needs a CUDA device")
@pytest.mark.parametrize("profile", ["adreno", "mali", "cuda", "gpu"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_ring_kernels_on_cuda(profile, dtype):
    """Each profile's ring kernels (sizes and ``past`` at run time), compiled for CUDA and run
    on the device: a prefill longer than the window, chunks, decode steps past it, one ring
    carried from call to call, against numpy over the whole history with the window mask."""
    heads, kv, d, window = 8, 2, 64, 48
    rng = np.random.default_rng(8)
    keys, values = (rng.standard_normal((700, kv, d)).astype(dtype) for _ in range(2))
    ring = [tvm.runtime.tensor(np.zeros((window, kv, d), dtype), tvm.cuda(0)) for _ in range(2)]
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    compiled, past = {}, 0
    for n in (300, 1, 1, 70, 5, 1, 200, 1, 1):
        decode = n == 1
        p = attention_params(heads, kv, d, dtype, d ** -0.5, dtype, False, not decode, decode,
                             merged_heads=decode, window=window)
        if decode not in compiled:
            func, _ = _gpu_kernel(p, GPU_TARGETS[profile])
            compiled[decode] = tvm.compile(tvm.IRModule(
                {"attn": func.with_attr("global_symbol", "attn")}), target=target)
        q = rng.standard_normal((1, heads, n, d)).astype(dtype)
        new = [x[past:past + n].transpose(1, 0, 2)[None].copy() for x in (keys, values)]
        out = tvm.runtime.empty((1, n, heads * d) if decode else (1, heads, n, d), dtype,
                                tvm.cuda(0))
        compiled[decode]["attn"](tvm.runtime.tensor(q, tvm.cuda(0)), *ring,
                                 *(tvm.runtime.tensor(x, tvm.cuda(0)) for x in new), past, out)
        got = out.numpy()
        if decode:
            got = got.reshape(1, n, heads, d).transpose(0, 2, 1, 3)
        qpos, kpos = past + np.arange(n)[:, None], np.arange(past + n)[None]
        mask = np.where((kpos <= qpos) & (kpos > qpos - window), 0, -np.inf)[None, None]
        want = reference_numpy(q, keys[:past + n], values[:past + n], mask, d ** -0.5, heads // kv)
        tol = 2e-3 if dtype == "float16" else 1e-4
        np.testing.assert_allclose(got.astype("float32"), want, rtol=tol, atol=tol,
                                   err_msg=f"n={n} past={past}")
        past += n


def test_bench_prefill_builds_a_baseline_version_of_the_kernel(tmp_path):
    """``bench.prefill --baseline-kernel FILE[,FILE]`` builds the rule's attention with other
    versions of ``gpu_attention_prefill.py`` (here: 16- and 32-key tiles instead of 64) for the
    same shape, and leaves the rule's own builder in place afterwards."""
    from pathlib import Path

    from tvm_lite.bench.prefill import attention_kernel, baseline_prefill_kernel
    from tvm_lite.schedules import gpu_attention, gpu_attention_prefill

    src = Path(gpu_attention_prefill.__file__).read_text()
    assert "TC_KEY_TILES = (64, 32, 16)" in src
    old = tmp_path / "old.py"
    old.write_text(src.replace("TC_KEY_TILES = (64, 32, 16)", "TC_KEY_TILES = (16,)"))
    target = tvm_lite.parse_target("cuda -arch=sm_90")
    mine = tvm_lite.device_source(attention_kernel(32, 8, 64, target), "cuda")
    base = tvm_lite.device_source(
        attention_kernel(32, 8, 64, target, prefill_kernel=baseline_prefill_kernel(str(old))), "cuda")
    assert gpu_attention.prefill_kernel is gpu_attention_prefill.prefill_kernel
    # a key tile is 8-column n-tiles of the scores: Q Kᵀ issues keys / 8 MMAs per 16 of head_dim
    # and P V head_dim / 8 per 16 keys -- (4 * 8) + (4 * 8) calls at 64 keys, 4 * 2 + 1 * 8 at 16
    assert mine.count("tvm_lite_mma16816(") - base.count("tvm_lite_mma16816(") == 64 - 16
    # several versions in one run (comma-separated): each file its own module
    other = tmp_path / "old32.py"
    other.write_text(src.replace("TC_KEY_TILES = (64, 32, 16)", "TC_KEY_TILES = (32,)"))
    base32 = tvm_lite.device_source(attention_kernel(
        32, 8, 64, target, prefill_kernel=baseline_prefill_kernel(str(other))), "cuda")
    again = tvm_lite.device_source(
        attention_kernel(32, 8, 64, target, prefill_kernel=baseline_prefill_kernel(str(old))), "cuda")
    assert mine.count("tvm_lite_mma16816(") - base32.count("tvm_lite_mma16816(") == 64 - 32
    assert again == base


def test_bench_attention_times_other_versions_of_the_decode_kernel(tmp_path, capsys):
    """``bench.attention --baseline-kernel copy.py``: a copy of ``gpu_attention_decode.py`` with
    one constant changed builds its own split-K kernel by the same rule, next to the tree's (the
    same where the constant does not apply), and its column reaches the table; a missing file
    stops the bench before any GPU work, naming it."""
    from pathlib import Path

    from tvm_lite.bench import attention as bench
    from tvm_lite.schedules import gpu_attention_decode

    src = Path(gpu_attention_decode.__file__).read_text()
    assert "\nFEWER_ACCUMULATORS = 32\n" in src
    copy = tmp_path / "acc128.py"  # the tree's FEWER_ACCUMULATORS off
    copy.write_text(src.replace("\nFEWER_ACCUMULATORS = 32\n", "\nFEWER_ACCUMULATORS = 128\n"))
    target = tvm_lite.parse_target("cuda -arch=sm_90")
    gqa7 = bench._kernels(14, 2, 64, target, [str(copy)])
    assert list(gqa7) == ["split-K", "per-head", "acc128"]
    assert gqa7["acc128"].script() != gqa7["split-K"].script()  # 7 heads: 8 lanes, not 4
    gqa4 = bench._kernels(32, 8, 64, target, [str(copy)])
    assert gqa4["acc128"].script() == gqa4["split-K"].script()  # 4 x 8 = 32: unchanged
    timing = {"gpu_us": 5.0, "wall_us": 9.0, "gb_s": 100.0, "max_abs_err": 1e-4}
    row = {"heads": 14, "kv_heads": 2, "head_dim": 64, "context": 2048, "kv_bytes": 1048576,
           "split-K": timing, "per-head": timing, "SDPA": dict(timing, gpu_us=5.5),
           "acc32": dict(timing, gpu_us=4.4)}
    table = bench.format_table({"copy_gb_s": 4000.0, "rows": [row], "baselines": ["acc32"]})
    assert "acc32: GPU, SDPA / it, err" in table and "4.4 us, 1.25x, 1.0e-04" in table
    # issue 17's target as a time (1 MiB at half of 4000 GB/s), and the same bytes' copy beside
    # it (a row from before the copy column shows none)
    assert " 0.52 | -- |" in table
    row["copy"] = {"gpu_us": 3.0, "wall_us": 6.0, "gb_s": 1048576 / 3e-6 / 1e9}
    table = bench.format_table({"copy_gb_s": 4000.0, "rows": [row], "baselines": ["acc32"]})
    assert " 0.52 | 3.0 us (9%) |" in table and table.splitlines()[2].count("|") == 12
    with pytest.raises(SystemExit):
        bench.main(["--baseline-kernel", "nope.py"])
    assert "--baseline-kernel: no file nope.py" in capsys.readouterr().err


def test_bench_switch_builds_a_copy_with_the_constants_changed(tmp_path, capsys):
    """``--switch NAME:CONST=VALUE[,...]`` (bench.prefill, bench.attention): a copy of the
    tree's schedule with those constants changed, timed as the baseline kernel NAME -- the
    same kernel builder, a different kernel. A constant the module does not assign (a typo, a
    renamed switch) or a malformed spec stops the bench before any GPU work, naming it, instead
    of timing the tree's own kernel under another name."""
    from tvm_lite.bench import attention as bench_attention
    from tvm_lite.bench import prefill as bench_prefill
    from tvm_lite.bench.kernels import schedule_version, switched_schedule
    from tvm_lite.schedules import gpu_attention_prefill

    path = switched_schedule(gpu_attention_prefill.__file__,
                             "both:LONGEST_FIRST_ACROSS_HEADS=False,PROMPT_SPLIT_MIN_KEYS=0",
                             tmp_path)
    assert path == tmp_path / "both.py"
    copy = schedule_version(str(path))
    assert copy.LONGEST_FIRST_ACROSS_HEADS is False and copy.PROMPT_SPLIT_MIN_KEYS == 0
    # the tree's module is left alone
    assert gpu_attention_prefill.LONGEST_FIRST_ACROSS_HEADS is True
    assert gpu_attention_prefill.PROMPT_SPLIT_MIN_KEYS == 1024
    p = attention_params(32, 8, 64, "float16", 0.125, "float16", False, True, False, True,
                         False)
    assert copy.split_value(p, 64, 64, 512, 512) == 2
    assert gpu_attention_prefill.split_value(p, 64, 64, 512, 512) == 1
    tiles = schedule_version(str(switched_schedule(
        gpu_attention_prefill.__file__, "mt2:TC_KEY_TILES=(32, 16),TC_M_TILES=2", tmp_path)))
    assert tiles.TC_KEY_TILES == (32, 16) and tiles.TC_M_TILES == 2  # a value with a comma
    for spec, cause in (("x:NO_SUCH_SWITCH=1", "NO_SUCH_SWITCH is assigned 0 times"),
                        ("PROMPT_SPLITS=2", "expected NAME:CONSTANT=VALUE"),
                        ("x:PROMPT_SPLITS", "'PROMPT_SPLITS' is not CONSTANT=VALUE")):
        with pytest.raises(ValueError, match=cause):
            switched_schedule(gpu_attention_prefill.__file__, spec, tmp_path)
    with pytest.raises(SystemExit):
        bench_prefill.main(["--parts", "attention", "--switch", "x:NO_SUCH_SWITCH=1"])
    assert "NO_SUCH_SWITCH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_attention.main(["--switch", "x:FIRST_TILE_WITH_QQ=True"])
    assert "FIRST_TILE_WITH_QQ is assigned 0 times" in capsys.readouterr().err


def test_grid_model_of_the_prefill_call(capsys):
    """``python -m tvm_lite.bench.grid_model``: the list-scheduling model behind
    LONGEST_FIRST_ACROSS_HEADS and PROMPT_SPLITS. Its makespan is never below either lower bound
    (the longest workgroup, the total work over the slots); the order across heads matters only
    with several kv heads and more workgroups than slots; a split shortens a grid that is one
    long row tile's wait."""
    from tvm_lite.bench.grid_model import FIXED, main, makespan, row_tile_work

    work = row_tile_work(32, 8, 2048)
    assert len(work) == 128 and work[0] == 1 and work[-1] == 32  # 16 positions a row tile
    for heads, kv, n, slots in ((32, 8, 2048, 264), (9, 3, 2048, 264), (8, 1, 512, 396)):
        w = row_tile_work(heads, kv, n)
        for fast in (False, True):
            t = makespan(heads, kv, n, slots, heads_fastest=fast)
            assert t >= max(w) + FIXED and t >= kv * sum(x + FIXED for x in w) / slots - 1e-9
    assert makespan(32, 8, 2048, 264) / makespan(32, 8, 2048, 264, heads_fastest=True) > 1.15
    assert makespan(8, 1, 2048, 264, heads_fastest=True) == makespan(8, 1, 2048, 264)
    assert makespan(8, 1, 2048, 264, splits=2) < 0.6 * makespan(8, 1, 2048, 264)
    main(["--lengths", "2048", "--slots", "264"])
    out = capsys.readouterr().out
    assert "| gemma-2b | 2048 | 264 | 256 | 32.5 | 1.00x |" in out


def test_bench_prefill_names_an_unknown_shape(capsys):
    """``bench.prefill --shapes`` takes the names of its shape table; another name stops it
    before any GPU work, with the name and the known ones."""
    from tvm_lite.bench.prefill import ATTENTION_SHAPES, main

    with pytest.raises(SystemExit):
        main(["--parts", "attention", "--shapes", "llama-3.2-1b,mistral-7b"])
    err = capsys.readouterr().err
    assert "unknown mistral-7b" in err and all(name in err for name in ATTENTION_SHAPES)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("profile, heads, kv, d, n, past, pad, dtype", [
    ("adreno", 32, 32, 80, 37, 5, 2, "float16"),  # Phi-2's heads: head_dim 80, no GQA
    ("mali", 32, 8, 96, 30, 0, 0, "float16"),     # Phi-3-mini's head_dim 96, GQA 4
    ("gpu", 16, 2, 80, 25, 0, 0, "float32")])     # fp32, GQA 8
def test_simt_prefill_cuda_c_run_on_the_cpu_matches_numpy(profile, heads, kv, d, n, past, pad,
                                                         dtype, tmp_path):
    """The SIMT prefill kernel (Adreno, Mali, the generic GPU) at head_dims other than powers of
    two, its CUDA C run on the CPU against numpy: lanes that split head_dim unevenly into
    vectors, padded keys, a chunk after a cache."""
    p = attention_params(heads, kv, d, dtype, d ** -0.5, dtype, False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(3), heads, kv, d, n, past, dtype, pad)
    run, _, _ = _profile_prefill_on_cpu(p, profile, n, past + n)
    got = run(q, k, v, mask, tmp_path / "out")
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got[:, :, :n - pad].astype(np.float32), want[:, :, :n - pad],
                               rtol=tol, atol=tol)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("profile", ["cuda", "adreno", "mali", "gpu"])
@pytest.mark.parametrize("kind", ["prefix_lm", "padding_only"])
def test_prefill_walks_every_key_tile_for_a_non_causal_mask(profile, kind, tmp_path):
    """The prefill kernels skip key tiles above the causal diagonal only when the mask is causal
    there. ``prefix_lm``: the first 70 of 96 positions see each other both ways; ``padding_only``:
    a mask without a query-row axis ``(1, 1, 1, m)`` (a bidirectional model), its last 5 keys
    padding. The workgroups walk every tile they need and every profile's kernel (CUDA C on the
    CPU) matches numpy, as does the CPU kernel. With a causal mask the same kernel still skips:
    workgroup 0's rows come out exact with NaN in every K/V row after the tiles they walk."""
    heads, kv, d, n, prefix = 8, 2, 64, 96, 70
    rows_axis = kind == "prefix_lm"
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, rows_axis, False,
                         False, kv == 1)
    q, k, v, causal_mask = _inputs(np.random.default_rng(11), heads, kv, d, n, 0, "float16")
    if rows_axis:
        mask = causal_mask.copy()
        mask[..., :prefix, :prefix] = 0  # the prefix: bidirectional
    else:
        mask = np.zeros((1, 1, 1, n), "float16")
        mask[..., -5:] = np.finfo("float16").min
    G = heads // kv
    want = reference_numpy(q, k, v, mask, d ** -0.5, G)
    if profile == "cuda":  # (once a kind) the CPU kernel walks every key
        got = _run(reference_kernel(p), tvm.target.Target({"kind": "llvm"}), tvm.cpu(), q, k, v,
                   mask)
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    run, (rows, keys), _ = _profile_prefill_on_cpu(p, profile, n, n)
    got = run(q, k, v, mask, tmp_path / kind)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    if not rows_axis:
        return
    # causal: workgroup 0's positions never read the key tiles after their last position (NaN)
    first = (rows - 1) // G + 1  # positions of workgroup 0
    cut = -(-first // keys) * keys  # the key tiles they walk end here
    kk, vv = k.copy(), v.copy()
    kk[cut:], vv[cut:] = np.nan, np.nan
    got = run(q, kk, vv, causal_mask, tmp_path / "causal")
    want = reference_numpy(q, k, v, causal_mask, d ** -0.5, G)
    assert np.isnan(got[:, :, cut:]).any()  # (later positions read them: the NaN is real)
    np.testing.assert_allclose(got[:, :, :first].astype(np.float32), want[:, :, :first],
                               rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, m_tiles, in_kernel", [
    (9, 3, 64, 130, 0, 1, False),    # SmolLM2's shape, a prompt: 3 key tiles, one split
    (8, 2, 64, 64, 224, 1, True),    # a chunk after a cache: splits merged by the last of them
    (8, 2, 128, 70, 0, 2, False),    # head_dim 128 with two m-tiles a warp: 64 Q registers
    (8, 1, 256, 16, 240, 1, False)])  # head_dim 256: above TC_Q_REGISTERS_MAX_DIM, not taken
def test_tensor_core_prefill_q_in_registers_on_the_cpu(heads, kv, d, n, past, m_tiles, in_kernel,
                                                       tmp_path, monkeypatch):
    """``TC_Q_REGISTERS``: Q's A fragments loaded once before the key loop (after the Q tile's
    and the first K tile's wait) and kept in registers, instead of an ``ldmatrix`` of Q per key
    tile. The CUDA C run on the CPU, against numpy; at head_dim 256 the kernel keeps the loads
    in the loop."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_Q_REGISTERS", True)
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    func = gpu_attention_prefill.tensor_core_kernel(p, static={"n": n, "m": past + n},
                                                    m_tiles=m_tiles)
    assert ("qf = T.alloc_local" in func.script()) == (d <= 128)
    q, k, v, mask = _inputs(np.random.default_rng(9), heads, kv, d, n, past, "float16", 0)
    got, splits, _ = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path, m_tiles,
                                         merge_in_kernel=in_kernel)
    assert (splits > 1) == (past > 0)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("check, case", [
    ("plain", (9, 3, 64, 40, 300, 1)), ("plain", (8, 1, 256, 16, 240, 1)),
    ("plain", (8, 2, 64, 64, 224, 2)),
    ("clean", (9, 3, 64, 130, 70, 0, 37)),
    ("merge_in_kernel", (9, 3, 64, 40, 300, True)),
    ("ring", ()), ("ring_window", (1, 64))])
def test_tensor_core_prefill_scores_ahead_on_the_cpu(check, case, tmp_path, monkeypatch):
    """``TC_SCORES_AHEAD`` (off: it lost on the H200 in the eighteenth session, 0-17% slower):
    tile kb + 1's Q Kᵀ before tile kb's softmax, two K and two V buffers, one barrier a tile.
    The CPU emulation lands a thread's ``cp.async`` copies only at its next wait, so a tile read
    before its copy was waited for, or a buffer refilled while another warp still reads it,
    comes out wrong. Seven of the cases of the tests above, each run with it on: a chunk's
    splits, head_dim 256, two m-tiles, a clean-tile vote with padding and a hole, the in-kernel
    merge, a ring cache and its window bound."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_SCORES_AHEAD", True)
    if check == "plain":
        test_tensor_core_prefill_cuda_c_run_on_the_cpu_matches_numpy(*case, tmp_path)
    elif check == "clean":
        test_tensor_core_prefill_clean_tiles_on_the_cpu(*case, tmp_path, monkeypatch)
    elif check == "merge_in_kernel":
        test_tensor_core_prefill_split_merge_on_the_cpu(*case, tmp_path)
    elif check == "ring":
        test_gpu_ring_prefill_cuda_c_run_on_the_cpu_matches_numpy("cuda", tmp_path)
    else:
        test_gpu_ring_prefill_never_loads_tiles_below_the_window("cuda", *case, tmp_path)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past", [
    (9, 3, 64, 40, 300), (8, 1, 64, 16, 1008), (8, 1, 256, 16, 240)])
def test_in_kernel_merge_with_more_partials_in_flight_on_the_cpu(heads, kv, d, n, past, tmp_path,
                                                                 monkeypatch):
    """``MERGE_IN_FLIGHT = 16``: a chunk's in-kernel merge loads two units of up to 8 splits'
    partials before folding them (each unit its own buffers and guard); the CUDA C on the CPU
    against numpy (a unit folded with another's partials or index comes out wrong)."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "MERGE_IN_FLIGHT", 16)
    assert gpu_attention_prefill.merge_units_in_flight(gpu_attention_prefill.SPLIT_MAX, 8) == 2
    test_tensor_core_prefill_split_merge_on_the_cpu(heads, kv, d, n, past, True, tmp_path)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, pad, in_kernel", [
    (9, 3, 64, 300, 0, 0, False),    # SmolLM2's shape, a prompt of 5 key tiles: 2 splits
    (16, 4, 64, 280, 0, 7, False),   # GQA 4, padded keys and rows (clean-tile votes)
    (8, 1, 256, 260, 0, 0, False),   # Gemma-2B's head_dim
    (8, 2, 64, 40, 300, 0, False),   # a chunk after a cache: its splits keep the merge kernel
    (9, 3, 64, 300, 0, 0, True)])    # MERGE_IN_KERNEL too: every split merged in the kernel
def test_tensor_core_prefill_prompt_splits_on_the_cpu(heads, kv, d, n, past, pad, in_kernel,
                                                      tmp_path, monkeypatch):
    """``PROMPT_SPLITS``: a prompt with a small grid has its keys split too, each row tile
    merged by the last of its splits (a ticket); a chunk after a cache keeps its merge kernel.
    The CUDA C run on the CPU against numpy (a split that took a ticket before writing its
    partials, or a merge that missed a split, comes out wrong), with the split counts the
    schedule says."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "PROMPT_SPLITS", 2)
    monkeypatch.setattr(gpu_attention_prefill, "PROMPT_SPLIT_MIN_KEYS", 0)  # prompts this short
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(12), heads, kv, d, n, past, "float16", pad)
    got, splits, _ = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path,
                                         merge_in_kernel=in_kernel)
    assert splits == 2 if past == 0 else splits > 1
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got[:, :, :n - pad].astype(np.float32), want[:, :, :n - pad],
                               rtol=2e-3, atol=2e-3)
    # a prompt of 64 row tiles x 8 kv heads (Llama-1B's shape at n = 2048) is not split
    big = attention_params(32, 8, 64, "float16", 0.125, "float16", False, True, False, False,
                           False)
    assert gpu_attention_prefill.split_value(big, 64, 64, 2048, 2048) == 1
    monkeypatch.setattr(gpu_attention_prefill, "PROMPT_SPLIT_MIN_KEYS", 0)  # any length
    assert gpu_attention_prefill.split_value(big, 64, 64, 512, 512) == 2
    monkeypatch.setattr(gpu_attention_prefill, "PROMPT_SPLIT_MIN_KEYS", 1024)  # longer only
    assert gpu_attention_prefill.split_value(big, 64, 64, 512, 512) == 1
    assert gpu_attention_prefill.split_value(p, 64, 64, 1024, 1024) == 2


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("check, case", [
    ("plain", (9, 3, 64, 130, 0, 1)), ("plain", (8, 2, 64, 32, 224, 1)),
    ("plain", (8, 1, 256, 16, 240, 1)), ("plain", (8, 2, 128, 70, 0, 2)),
    ("merge_in_kernel", (9, 3, 64, 40, 300, True)),
    ("simt", ("adreno", 32, 32, 80, 37, 5, 2, "float16")),
    ("simt", ("mali", 32, 8, 96, 30, 0, 0, "float16")),
    ("non_causal", ("adreno", "prefix_lm")), ("non_causal", ("cuda", "prefix_lm")),
    ("ring_window", ("cuda", 2, 32)), ("ring_window", ("mali", 2, 32)),
    ("opencl", ("adreno",))])
def test_prefill_longest_row_tiles_first_across_heads_on_the_cpu(check, case, tmp_path,
                                                                 monkeypatch):
    """``LONGEST_FIRST_ACROSS_HEADS``: the kv head is blockIdx.x and the row tile blockIdx.y,
    last rows first, in the tensor-core and the SIMT kernels. Cases of the tests above run with
    it on (CUDA C on the CPU against numpy): prompts and chunks with key splits, both merges,
    two m-tiles, head_dim 64-256; the SIMT profiles; a non-causal mask (every tile walked) and
    the causal bound's NaN check; the window's lower bound (a row tile's bounds computed from
    the wrong index read NaN or miss keys); Adreno's OpenCL through clang."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "LONGEST_FIRST_ACROSS_HEADS", True)
    assert gpu_attention_prefill.grid(8, 40, 3) == (8, 40, 3)
    p = attention_params(8, 2, 64, "float16", 0.125, "float16", False, True, False, False, False)
    for func in (gpu_attention_prefill.tensor_core_kernel(p),
                 gpu_attention_prefill.simt_kernel(p, 256, 32768, 16)):
        assert re.search(r'for kvh in T\.thread_binding\([^\n]*thread="blockIdx\.x"\)',
                         func.script())
    if check == "plain":
        test_tensor_core_prefill_cuda_c_run_on_the_cpu_matches_numpy(*case, tmp_path)
    elif check == "merge_in_kernel":
        test_tensor_core_prefill_split_merge_on_the_cpu(*case, tmp_path)
    elif check == "simt":
        test_simt_prefill_cuda_c_run_on_the_cpu_matches_numpy(*case, tmp_path)
    elif check == "non_causal":
        test_prefill_walks_every_key_tile_for_a_non_causal_mask(*case, tmp_path)
    elif check == "opencl":
        test_gpu_kernels_compile(*case, tmp_path)
    else:
        test_gpu_ring_prefill_never_loads_tiles_below_the_window(*case, tmp_path)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, pad, in_kernel", [
    (9, 3, 64, 40, 300, 0, False),    # a chunk after a cache: key splits and their merge
    (8, 2, 64, 32, 224, 0, True),     # ... merged by the last split
    (8, 1, 256, 16, 240, 0, False),   # Gemma-2B's head_dim: P V is m64n256k16
    (16, 4, 128, 140, 0, 5, False)])  # head_dim 128, padded keys (clean-tile votes)
def test_tensor_core_prefill_wgmma_on_the_cpu(heads, kv, d, n, past, pad, in_kernel, tmp_path):
    """``TC_WGMMA`` (off: 32-49% slower than mma.sync on the H200, eighteenth session): Q Kᵀ by
    ``wgmma`` from shared memory (Q and K K-major core matrices), P V
    with P from registers and V's descriptor transposed (MN-major). The CUDA C run on the CPU,
    each wgmma emulated lane by lane from the PTX ISA's layouts (tests/mma_on_cpu.py), against
    numpy."""
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    q, k, v, mask = _inputs(np.random.default_rng(11), heads, kv, d, n, past, "float16", pad)
    got, splits, rows = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path,
                                            merge_in_kernel=in_kernel, wgmma=True)
    assert rows == 64 and (splits > 1) == (past > 0)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    real = n - pad
    np.testing.assert_allclose(got[:, :, :real].astype(np.float32), want[:, :, :real],
                               rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("heads, kv, d, n, past, warps, key_tiles", [
    (9, 3, 64, 130, 0, 4, None), (8, 2, 64, 32, 224, 8, None), (8, 1, 256, 16, 240, 4, None),
    (16, 4, 128, 140, 0, 4, (128, 64, 32, 16))])
def test_tensor_core_prefill_wgmma_scores_ahead_on_the_cpu(heads, kv, d, n, past, warps, key_tiles,
                                                            tmp_path, monkeypatch):
    """``TC_WGMMA`` with ``TC_SCORES_AHEAD``: tile kb + 1's Q Kᵀ left in flight while tile kb's
    softmax runs, two K and V buffers of core matrices; one or two warpgroups (64 or 128 rows a
    workgroup, each warpgroup's Q at its row groups); 128-key tiles where they fit. The CUDA C
    run on the CPU, against numpy."""
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_SCORES_AHEAD", True)
    monkeypatch.setattr(gpu_attention_prefill, "TC_WARPS", warps)  # 8: two warpgroups, 128 rows
    if key_tiles:  # 128-key tiles where they fit (Q Kᵀ as m64n128k16)
        monkeypatch.setattr(gpu_attention_prefill, "TC_KEY_TILES", key_tiles)
    p = attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False, False,
                         kv == 1)
    func = gpu_attention_prefill.tensor_core_kernel(p, static={"n": n, "m": past + n}, wgmma=True)
    assert "s2 = T.alloc_local" in func.script() and "wgmma_ss" in func.script()
    q, k, v, mask = _inputs(np.random.default_rng(12), heads, kv, d, n, past, "float16", 0)
    got, _, _ = _tensor_core_on_cpu(p, q, k, v, mask, past, tmp_path, wgmma=True)
    want = reference_numpy(q, k, v, mask, d ** -0.5, heads // kv)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("check", ["ring", "window"])
def test_tensor_core_prefill_wgmma_ring_on_the_cpu(check, tmp_path, monkeypatch):
    """``TC_WGMMA`` for sliding-window layers' ring caches (keys: the ring's rows, then the new
    rows, through the core-matrix layout; the window bound): the ring tests above, the rule's
    kernel built for sm_90a with wgmma on, run on the CPU."""
    import test_attention as me
    from tvm_lite.schedules import gpu_attention_prefill

    monkeypatch.setattr(gpu_attention_prefill, "TC_WGMMA", True)
    monkeypatch.setattr(gpu_attention_prefill, "wgmma_supported", lambda target: True)
    monkeypatch.setattr(me, "RING_ARCH", "sm_90a")
    if check == "ring":
        test_gpu_ring_prefill_cuda_c_run_on_the_cpu_matches_numpy("cuda", tmp_path)
    else:
        test_gpu_ring_prefill_never_loads_tiles_below_the_window("cuda", 1, 64, tmp_path)
