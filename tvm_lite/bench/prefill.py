r"""Prefill kernels next to PyTorch on the same GPU: attention vs SDPA, GEMMs vs ``torch.matmul``.

For the shapes of the benchmarked models (SmolLM2-135M, Llama-3.2-1B, Gemma-2B; plus a head_dim
128 attention, Llama-3-8B's), in one process on one CUDA device:

* **attention** (causal, fp16, one prompt of ``n`` tokens, batch 1): tvm_lite's
  ``attention_prefill`` kernel as the CUDA rule schedules it (:mod:`tvm_lite.schedules.
  gpu_attention_prefill`) against ``torch.nn.functional.scaled_dot_product_attention(...,
  is_causal=True)`` (K/V expanded to the query heads before timing). TFLOP/s count the causal
  work only, the same for both: ``4 * H * D * sum_i (past + i + 1)``. ``chunked``: the same
  ``n``-token prompt as calls of ``chunk`` tokens (each reading the cache written so far), the
  sum of their times over the one call's.
* **GEMM** (``x[1, n, K] @ W[K, N]``, the linear layers but the lm_head): tvm_lite E0M4, int4
  and fp16 weights (tvm_lite's rules: the ``mma.sync`` kernel of :mod:`tvm_lite.schedules.
  gpu_gemm_mma`) and ``e0m4 (wmma)`` (the rule without that kernel: DLight's WMMA, what ran
  before) against ``torch.matmul`` fp16.

``--baseline-kernel old.py`` times the rule's attention built by another version of
``schedules/gpu_attention_prefill.py`` on the same inputs in the same run (``git show
REV:schedules/gpu_attention_prefill.py > old.py``): a kernel change measured against what it
replaced, not against another session's numbers. Several files, comma-separated, time several
versions in one run (one column each, named by the file).

Every tvm_lite attention output is checked against the same SDPA call (max abs error; each
baseline's too); every GEMM against numpy on a column slice (``bench.kernels``). Times: medians
of ``time_evaluator`` repeats (TVM) and of CUDA-event-timed loops (torch). Attention is built
for this GPU's target (``sm_90a`` on Hopper, which a baseline with ``TC_WGMMA`` needs).

    python -m tvm_lite.bench.prefill [--json out.json] [--parts attention,gemm]

One kernel under Nsight Compute: each timed call sits in an NVTX range
(:func:`tvm_lite.bench.kernels.nvtx_name`: ``attention:<shape>:n<N>:<variant>[:past<P>]``,
``gemm:<model>:<layer>:<variant>``), e.g.

    ncu --nvtx --nvtx-include "attention:llama-3.2-1b:n2048:tree/" --launch-count 1 --set full \
        python -m tvm_lite.bench.prefill --parts attention --shapes llama-3.2-1b --lengths 2048 --chunk 0
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .kernels import (add_baseline_arguments, baseline_kernels, int_list, nvtx_name,
                      require_cuda_gpu)

# name: (heads, kv_heads, head_dim)
ATTENTION_SHAPES = {
    "smollm2-135m": (9, 3, 64),
    "llama-3.2-1b": (32, 8, 64),
    "llama-3-8b (hd 128)": (32, 8, 128),
    "gemma-2b": (8, 1, 256),
}
# name: (hidden, heads, kv_heads, head_dim, intermediate)
GEMM_MODELS = {
    "smollm2-135m": (576, 9, 3, 64, 1536),
    "llama-3.2-1b": (2048, 32, 8, 64, 8192),
    "gemma-2b": (2048, 8, 1, 256, 16384),
}
ATTENTION_LENGTHS = (512, 2048)
GEMM_LENGTHS = (512,)
CHUNK = 256


def causal_flops(heads: int, head_dim: int, n: int, past: int = 0) -> float:
    pairs = n * past + n * (n + 1) / 2
    return 4.0 * heads * head_dim * pairs


def baseline_prefill_kernel(path: str):
    """``prefill_kernel`` of another version of ``schedules/gpu_attention_prefill.py`` (e.g.
    ``git show REV:schedules/gpu_attention_prefill.py > old.py``; see
    :func:`tvm_lite.bench.kernels.schedule_version`)."""
    from tvm_lite.bench.kernels import schedule_version

    return schedule_version(path).prefill_kernel


def attention_params_of(heads: int, kv: int, d: int) -> dict:
    """The fused attention's parameters of the benchmarked kernels (fp16, an additive fp16 mask
    over every row, the output in the merged-heads layout)."""
    from tvm_lite.relax_passes.fuse_attention import attention_params

    return attention_params(heads, kv, d, "float16", d ** -0.5, "float16", False, True, False,
                            True, kv == 1)


def attention_kernel(heads: int, kv: int, d: int, target, keys: int | None = None,
                     m_tiles: int | None = None, prefill_kernel=None):
    """tvm_lite's prefill attention for ``target`` (fp16, additive fp16 mask over every row),
    compiled; ``keys``, ``m_tiles``: the tensor-core kernel's key tile and 16-row m-tiles a warp
    (both None: the rule's kernel); ``prefill_kernel``: the rule's kernel builder to use instead
    of this tree's (:func:`baseline_prefill_kernel`)."""
    import tvm

    from tvm_lite.relax_passes.fuse_attention import reference_kernel
    from tvm_lite.schedules import gpu_attention
    from tvm_lite.schedules.gpu_attention_prefill import tensor_core_kernel

    p = attention_params_of(heads, kv, d)
    if keys is None and m_tiles is None:
        own = gpu_attention.prefill_kernel
        gpu_attention.prefill_kernel = prefill_kernel or own
        try:
            func = gpu_attention.Attention().apply(reference_kernel(p), target, False).mod["main"]
        finally:
            gpu_attention.prefill_kernel = own
    else:
        func = tensor_core_kernel(p, keys=keys, m_tiles=m_tiles)
    func = func.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def _torch_ms(fn, iters: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return float(np.median(times))


def _tvm_ms(ex, dev, args) -> float:
    from tvm_lite.bench.kernels import median_seconds

    return median_seconds(ex, dev, args) * 1e3


def _attention_inputs(heads, kv, d, n, past, seed=0):
    """fp16 torch tensors on the GPU: q (1, H, n, D), the cache rows k, v (past + n, KV, D) and
    the export's additive causal mask (1, 1, n, past + n)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    m = past + n
    q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(m, kv, d, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(m, kv, d, device="cuda", dtype=torch.float16, generator=g)
    pos = past + torch.arange(n, device="cuda")[:, None]
    allowed = torch.arange(m, device="cuda")[None, :] <= pos
    mask = torch.where(allowed, 0.0, float(torch.finfo(torch.float16).min)).half()[None, None]
    return q, k, v, mask


def _tvm_attention_call(ex, dev, q, k, v, mask, nvtx: str = "attention"):
    """(ms, output as a (1, H, n, D) torch tensor) of one tvm_lite attention call, timed inside
    the NVTX range ``nvtx`` (:func:`nvtx_name`, for ncu)."""
    import torch
    import tvm

    _, heads, n, d = q.shape
    kk, vv = (k[:, 0] if k.shape[1] == 1 else k), (v[:, 0] if v.shape[1] == 1 else v)
    out = torch.empty(1, n, heads * d, device="cuda", dtype=torch.float16)
    args = [tvm.runtime.from_dlpack(t.contiguous()) for t in (q, kk, vv, mask, out)]
    with torch.cuda.nvtx.range(nvtx):
        ms = _tvm_ms(ex, dev, args)
    return ms, out.view(1, n, heads, d).transpose(1, 2)


def bench_attention(lengths=ATTENTION_LENGTHS, shapes=tuple(ATTENTION_SHAPES), chunk=CHUNK,
                    variants=((None, None),), progress=print, baselines=(),
                    rows: list | None = None) -> list[dict]:
    """``variants``: (key tile, m-tiles a warp) pairs of the tensor-core kernel to time, (None,
    None) being the rule's kernel (the only one timed in chunks too, and against ``baselines``:
    paths of other versions of ``gpu_attention_prefill.py``, timed in the same run; a row's
    ``baselines`` maps each file's name to its time in ms). ``rows``: a list the rows are
    appended to as they are measured (a caller saving them after each one keeps what a run cut
    short measured); returned."""
    import torch
    import torch.nn.functional as F
    import tvm

    from tvm_lite import parse_target
    from tvm_lite.schedules.gpu_attention_prefill import m_tiles_for, split_value, \
        tensor_core_tiles
    from tvm_lite.target import local_cuda_target

    dev = tvm.cuda(0)
    target = parse_target(local_cuda_target())  # sm_90a on Hopper: a baseline may take wgmma
    rows = [] if rows is None else rows
    base_kernels = {Path(b).stem: baseline_prefill_kernel(b) for b in baselines}
    for name in shapes:
        heads, kv, d = ATTENTION_SHAPES[name]
        for keys, m_tiles in variants:
            t0 = time.perf_counter()
            ex = attention_kernel(heads, kv, d, target, keys, m_tiles)
            compile_s = time.perf_counter() - t0
            base = {}
            if keys is None and m_tiles is None:
                base = {b: attention_kernel(heads, kv, d, target, prefill_kernel=kernel)
                        for b, kernel in base_kernels.items()}
            variant = "tree" if keys is None and m_tiles is None else f"k{keys}m{m_tiles}"
            for n in lengths:
                def at(var, past=None, n=n):  # this call's NVTX range
                    return nvtx_name("attention", name, f"n{n}", var,
                                     *(() if past is None else (f"past{past}",)))
                q, k, v, mask = _attention_inputs(heads, kv, d, n, 0)
                kx = k.permute(1, 0, 2).repeat_interleave(heads // kv, 0)[None]
                vx = v.permute(1, 0, 2).repeat_interleave(heads // kv, 0)[None]
                def sdpa(q=q, kx=kx, vx=vx):
                    return F.scaled_dot_product_attention(q, kx, vx, is_causal=True)

                torch_ms = _torch_ms(sdpa)
                ours_ms, out = _tvm_attention_call(ex, dev, q, k, v, mask, at(variant))
                ref = sdpa().float()  # every kernel's output is checked against it
                err = float((out.float() - ref).abs().max())
                row = dict(shape=name, heads=heads, kv_heads=kv, head_dim=d, n=n, key_tile=keys,
                           m_tiles=m_tiles and m_tiles_for({"head_dim": d}, m_tiles),  # as built
                           tvm_lite_ms=ours_ms, sdpa_ms=torch_ms, err=err, compile_s=compile_s,
                           tflops=causal_flops(heads, d, n) / ours_ms / 1e9,
                           sdpa_tflops=causal_flops(heads, d, n) / torch_ms / 1e9)
                row["vs_sdpa"] = row["tflops"] / row["sdpa_tflops"]
                if base:  # the same inputs through each baseline's kernel (and its error)
                    row["baselines"], row["baselines_err"] = {}, {}
                    for b, bex in base.items():
                        ms, bout = _tvm_attention_call(bex, dev, q, k, v, mask, at(b))
                        row["baselines"][b] = ms
                        row["baselines_err"][b] = float((bout.float() - ref).abs().max())
                if chunk and n > chunk and keys is None and m_tiles is None:  # in chunks
                    times = [_tvm_attention_call(ex, dev, *_attention_inputs(
                        heads, kv, d, chunk, past), at(variant, past))[0]
                             for past in range(0, n, chunk)]
                    total = sum(times)
                    # each chunk's time and key splits: where the chunks' excess goes
                    p = attention_params_of(heads, kv, d)
                    rows_, keys_ = tensor_core_tiles(p)
                    row.update(chunk=chunk, chunked_ms=total, chunked_ratio=total / ours_ms,
                               chunks_ms=times,
                               chunk_splits=[split_value(p, rows_, keys_, chunk, past + chunk)
                                             for past in range(0, n, chunk)])
                    if base:  # the baselines in the same chunks
                        row["baselines_chunked"] = {
                            b: sum(_tvm_attention_call(bex, dev, *_attention_inputs(
                                heads, kv, d, chunk, past), at(b, past))[0]
                                   for past in range(0, n, chunk))
                            for b, bex in base.items()}
                rows.append(row)
                progress(f"attention {name} n={n} keys={keys} m_tiles={row['m_tiles']}: "
                         f"{ours_ms * 1e3:.1f} us "
                         f"({row['tflops']:.1f} TFLOP/s) vs SDPA {torch_ms * 1e3:.1f} us "
                         f"({row['sdpa_tflops']:.1f}); x{row['vs_sdpa']:.2f}; err {err:.2e}"
                         + (f"; chunked x{row['chunked_ratio']:.2f} (us a chunk: "
                            + ", ".join(f"{t * 1e3:.1f}/{s}" for t, s in zip(
                                row["chunks_ms"], row["chunk_splits"])) + " as time/splits)"
                            if "chunked_ms" in row else "")
                         + "".join(f"; {b} {ms * 1e3:.1f} us (err {row['baselines_err'][b]:.1e})"
                                   for b, ms in row.get("baselines", {}).items())
                         + "".join(f"; {b} chunked {ms * 1e3:.1f} us"
                                   for b, ms in row.get("baselines_chunked", {}).items()))
    return rows


# the GEMMs of a decoder layer: each projection as exported, and "q+k+v" / "gate+up" as the
# models run them (relax_passes/merge_shared_input_projections.py merges projections that share
# their input into one matmul)
GEMM_LAYER_NAMES = ("q", "k,v", "o", "gate,up", "down", "q+k+v", "gate+up")


def gemm_layers(models=tuple(GEMM_MODELS), layers=()) -> list[tuple[str, str, int, int]]:
    """``[(model, layer, K, N)]`` for :data:`GEMM_LAYER_NAMES` (only ``layers`` where given), a
    shape once a model: the first layer asked for that has it names it (``o`` has ``q``'s shape:
    "o" alone is timed as ``o``)."""
    out = []
    for m in models:
        hidden, heads, kv, hd, inter = GEMM_MODELS[m]
        seen = set()
        shapes = (("q", hidden, heads * hd), ("k,v", hidden, kv * hd), ("o", heads * hd, hidden),
                  ("gate,up", hidden, inter), ("down", inter, hidden),
                  ("q+k+v", hidden, (heads + 2 * kv) * hd), ("gate+up", hidden, 2 * inter))
        assert tuple(name for name, _, _ in shapes) == GEMM_LAYER_NAMES
        for name, k, n in shapes:
            if (k, n) not in seen and (not layers or name in layers):
                seen.add((k, n))
                out.append((m, name, k, n))
    return out


# variant -> (weight format, rule): "mma" tvm_lite's rules; "no split-K" the mma kernel never
# splitting K; "wmma" the rule without the mma kernel, i.e. DLight's WMMA kernel that ran before;
# "x async" the mma kernel with X copied by cp.async (gpu_gemm_mma.X_ASYNC); "wgmma" Hopper's
# warpgroup kernel (gpu_gemm_wgmma, built for sm_90a; skipped on other GPUs); "sm_90a" the
# default rules built for sm_90a (the warp-specialised wgmma kernel for deep GEMMs, a kernel for
# each prompt length of gpu_gemm_mma.PLAN_LENGTHS, picked by M); "sm_90a one plan" the same with
# one kernel, planned for gpu_gemm_mma.PLAN_M (the default before the twenty-second session)
GEMM_VARIANTS = {"e0m4": ("e0m4", "mma"), "int4": ("int4", "mma"), "fp16": ("fp16", "mma"),
                 "e0m4 (no split-K)": ("e0m4", "no split-K"), "e0m4 (wmma)": ("e0m4", "wmma"),
                 "e0m4 (x async)": ("e0m4", "x async"), "e0m4 (wgmma)": ("e0m4", "wgmma"),
                 "e0m4 (sm_90a)": ("e0m4", "sm_90a"),
                 "e0m4 (sm_90a one plan)": ("e0m4", "sm_90a one plan")}


class WgmmaStaging(NamedTuple):
    """A ``--wgmma`` staging, parsed (:func:`parse_wgmma_stages`)."""
    specialised: bool  # the warp-specialised kernel (gpu_gemm_wgmma_ws)
    stages: int  # its stages, the W-in-registers kernel's, or the wgmma kernel's X slices
    w_buffers: int | None  # fp16 W slices (ws)
    pairs: bool  # outputs stored in pairs (ws)
    ablate: tuple  # parts left out (ws, wr; a diagnostic)
    x_rows: bool  # X copied a row segment a warp quarter (ws, wr)
    staged: bool  # outputs staged through shared memory (ws)
    w_in_registers: bool = False  # the W-in-registers kernel (gpu_gemm_wgmma_wreg)
    cluster: bool = False  # a split K summed in a thread-block cluster (ws)
    consumer_units: int | None = None  # packed vectors a consumer thread dequantizes (ws)


def parse_wgmma_stages(spec: str) -> WgmmaStaging:
    """``--wgmma``'s staging part: ``S`` (the wgmma kernel, X in S cp.async slices, 0: in
    registers), ``wsS`` (the warp-specialised kernel, S stages), ``wsSwB`` (... with B fp16 W
    slices), ``wsS..p`` (... its outputs stored in pairs), ``wsS..r`` (... X copied a row
    segment a warp quarter), ``wsS..s`` (... its outputs staged through shared memory),
    ``wsS..c`` (... a split K's partials summed in a thread-block cluster), ``wsS..dU`` (...
    each consumer thread dequantizing U packed vectors of a slice), each
    ``wsS..`` optionally followed by ``-part`` for each part left out (a diagnostic:
    ``gpu_gemm_wgmma_ws.ABLATIONS``); ``wrS`` (the kernel with W dequantized in registers, S
    stages), ``wrSr`` (... X copied by rows), each optionally with ``-part``s as ``wsS``.
    Raises ValueError naming what is wrong."""
    from tvm_lite.schedules.gpu_gemm_wgmma_ws import ABLATIONS

    head, *ablate = str(spec).split("-")
    m = re.fullmatch(r"(ws|wr)?(\d+)(?:w(\d+))?(p)?(r)?(s)?(c)?(?:d(\d+))?", head)
    kind = m.group(1) if m else None
    if (not m or (any(m.group(i) for i in (3, 4, 5, 6, 7, 8)) and not kind)
            or (kind == "wr" and any(m.group(i) for i in (3, 4, 6, 7, 8)))):
        raise ValueError(f"{spec}: the staging is S, wsS, wsSwB, wsSp, wsSr, wsSs, wsSc, "
                         "wsSdU, wsSwBprscdU, wrS or wrSr")
    bad = [a for a in ablate if a not in ABLATIONS]
    if bad or (ablate and not kind):
        raise ValueError(f"{spec}: parts can be left out of a wsS or wrS kernel only, and only "
                         f"{', '.join(ABLATIONS)}")
    return WgmmaStaging(kind == "ws", int(m.group(2)), int(m.group(3)) if m.group(3) else None,
                        bool(m.group(4)), tuple(ablate), bool(m.group(5)), bool(m.group(6)),
                        kind == "wr", bool(m.group(7)),
                        int(m.group(8)) if m.group(8) else None)


def gemm_rules(target, tiles=(), wgmma=()) -> tuple[dict, dict]:
    """(rule name -> schedule rules, variant -> (weight format, rule name)): the rules of
    :data:`GEMM_VARIANTS`, and per forced tile ``(TM, TN, WM, WN, KS[, TK])`` two E0M4 variants,
    ``"e0m4 tile TMxTNxWMxWNxKS[xTK]"`` and the same with ``" x async"`` (X by cp.async)."""
    from tvm_lite import parse_target
    from tvm_lite.schedules import gpu_profile, rules_for
    from tvm_lite.schedules.gpu_gemm import GPUPrefillGEMM

    cuda = gpu_profile("cuda")
    rules = {"mma": rules_for(target),
             "no split-K": [GPUPrefillGEMM(cuda, split_k=False), *rules_for(target)],
             "wmma": [GPUPrefillGEMM(cuda, mma=False), *rules_for(target)],
             "x async": [GPUPrefillGEMM(cuda, x_async=True), *rules_for(target)],
             "wgmma": [GPUPrefillGEMM(cuda, wgmma=True), *rules_for(target)],
             "sm_90a": rules_for(parse_target("cuda -arch=sm_90a")),
             "sm_90a one plan": [GPUPrefillGEMM(cuda, plan_lengths=()),
                                 *rules_for(parse_target("cuda -arch=sm_90a"))]}
    variants = dict(GEMM_VARIANTS)
    for tm, tn, stages in wgmma:  # Hopper's kernels at forced tiles and X stagings
        name = f"e0m4 wgmma {tm}x{tn} x{stages}"
        st = parse_wgmma_stages(stages)
        plain = not (st.specialised or st.w_in_registers)
        rules[name] = [GPUPrefillGEMM(cuda, wgmma=True, wgmma_tile=(tm, tn),
                                      wgmma_x_stages=st.stages if plain else 0,
                                      wgmma_specialised=st.stages if st.specialised else 0,
                                      wgmma_ablate=st.ablate, wgmma_w_buffers=st.w_buffers,
                                      wgmma_pair_stores=st.pairs, wgmma_x_rows=st.x_rows,
                                      wgmma_staged_stores=st.staged,
                                      wgmma_cluster_sum=st.cluster,
                                      wgmma_consumer_units=st.consumer_units,
                                      wgmma_w_in_registers=st.stages if st.w_in_registers else 0)]
        variants[name] = ("e0m4", name)
    for tile in tiles:
        for x_async in (False, True):
            name = "e0m4 tile " + "x".join(map(str, tile)) + (" x async" if x_async else "")
            rules[name] = [GPUPrefillGEMM(cuda, mma_tile=tuple(tile), x_async=x_async)]
            variants[name] = ("e0m4", name)
    return rules, variants


def bench_gemm(lengths=GEMM_LENGTHS, models=tuple(GEMM_MODELS), fmts=tuple(GEMM_VARIANTS),
               progress=print, tiles=(), wgmma=(), layers=(), switches=()) -> list[dict]:
    """One row per (layer, length, variant). ``tiles``: tensor-core tiles ``(TM, TN, WM, WN, KS[,
    TK])`` also timed on every layer as E0M4 variants ``"e0m4 tile TMxTNxWMxWNxKS[xTK]"`` (a
    sweep for ``gpu_gemm_mma.choose_tile``), each also with X copied by ``cp.async`` (``"... x
    async"``); a tile that does not divide a layer is skipped. ``layers``: only these layer
    names of :func:`gemm_layers` (e.g. ``("gate,up",)``; empty: all). ``switches``: ``--switch``
    specs ``NAME:MODULE.CONSTANT=VALUE[,...]`` (:func:`tvm_lite.profile.model_switch`), each
    an E0M4 variant ``"e0m4 (sm_90a) NAME"``: the default sm_90a rules built with those
    constants set (a plan, a kernel or a store a constant chooses, next to the tree's)."""
    import torch
    import tvm
    from tvm import tirx

    from tvm_lite import parse_target
    from tvm_lite.bench.kernels import (build, kernel_func, kernel_plan, random_half, reference,
                                        weights)
    from tvm_lite.compiler import device_source
    from tvm_lite.profile import model_switch, switched
    from tvm_lite.schedules import gpu_profile
    from tvm_lite.schedules.gpu_gemm_mma import choose_tile

    dev = tvm.cuda(0)
    arch = "sm_" + str(dev.compute_version).replace(".", "")
    target = parse_target(f"cuda -arch={arch}")
    rules, variants = gemm_rules(target, tiles, wgmma)
    switch_of = {}  # variant -> the constants set while it is built
    for spec in switches:
        name, assignments = model_switch(spec)
        variants[f"e0m4 (sm_90a) {name}"] = ("e0m4", "sm_90a")
        switch_of[f"e0m4 (sm_90a) {name}"] = assignments
    fmts = (*fmts, *(v for v in variants if v not in GEMM_VARIANTS))
    rng = np.random.default_rng(0)
    rows = []
    for model, name, k, n in gemm_layers(models, layers):
        w16 = torch.from_numpy(random_half((k, n), rng)).cuda()
        for seq in lengths:
            x = torch.from_numpy(random_half((1, seq, k), rng)).cuda()
            torch_ms = _torch_ms(lambda: torch.matmul(x, w16))  # noqa: B023
            for variant in fmts:
                fmt, rule = variants[variant]
                if rule == "no split-K" and choose_tile(n, gpu_profile("cuda").compute_units,
                                                        k=k)[4] == 1:
                    continue  # the same kernel as "e0m4"
                if rule.startswith("e0m4 wgmma") and n % int(rule.split()[2].split("x")[1]):
                    continue  # the tile does not divide N
                if rule.startswith("e0m4 tile"):
                    tile = tuple(int(v) for v in rule.split()[2].split("x"))
                    if n % tile[1] or k % ((tile[5] if len(tile) > 5 else 32) * tile[4]):
                        continue
                built_for = target
                if "wgmma" in rule or rule.startswith("sm_90a"):  # Hopper only, sm_90a
                    if arch != "sm_90":
                        continue
                    built_for = parse_target("cuda -arch=sm_90a")
                arrays = {"w": w16.cpu().numpy()} if fmt == "fp16" else weights(fmt, k, n, rng)
                func = kernel_func(fmt, [1, tirx.Var("n", "int64")], k, n)
                t0 = time.perf_counter()
                try:
                    with switched(switch_of.get(variant, [])):
                        ex = build(func, built_for, rules[rule])
                        plan = kernel_plan(func, built_for, rules[rule])
                except Exception as err:  # a sweep's tile that does not build: a row saying so
                    progress(f"gemm {model} {name} {k}x{n} {variant}: does not build: {err}"[:300])
                    continue
                if "wgmma" in rule and "wgmma.mma_async" not in device_source(ex, "cuda"):
                    # the rule fell back to the mma kernel (e.g. a ring too big for shared
                    # memory): no row under the wgmma name
                    progress(f"gemm {model} {name} {k}x{n} {variant}: the wgmma kernel does not "
                             "take this shape")
                    continue
                compile_s = time.perf_counter() - t0
                out = tvm.runtime.empty((1, seq, n), "float16", dev)
                args = [tvm.runtime.from_dlpack(x), *[tvm.runtime.tensor(a, dev)
                                                      for a in arrays.values()], out]
                with torch.cuda.nvtx.range(nvtx_name("gemm", model, name, variant)):  # (for ncu)
                    ms = _tvm_ms(ex, dev, args)
                cols = min(n, 1024)
                ref = reference(fmt, x.cpu().numpy(), arrays, k, cols)
                got = out.numpy().reshape(-1, n)[:, :cols].astype(np.float32)
                err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
                flops = 2.0 * seq * k * n
                row = dict(model=model, layer=name, K=k, N=n, n=seq, fmt=variant, tvm_lite_ms=ms,
                           torch_ms=torch_ms, tflops=flops / ms / 1e9,
                           torch_tflops=flops / torch_ms / 1e9, err=err, compile_s=compile_s,
                           plan=plan)
                row["vs_torch"] = row["tflops"] / row["torch_tflops"]
                rows.append(row)
                progress(f"gemm {model} {name} {k}x{n} n={seq} {variant}: {ms * 1e3:.1f} us "
                         f"({row['tflops']:.1f} TFLOP/s) vs torch fp16 {torch_ms * 1e3:.1f} us "
                         f"({row['torch_tflops']:.1f}); x{row['vs_torch']:.2f}; err {err:.1e}; "
                         f"{row['plan']}")
    return rows


def _baseline_cell(row: dict, name: str) -> str:
    """A baseline kernel's cell of the attention table: its time (and over the tree's), its
    chunked time over its own one call, its max error against SDPA."""
    ms = row["baselines"][name]
    cell = f" {ms * 1e3:,.1f} ({ms / row['tvm_lite_ms']:.2f}x)"
    if name in row.get("baselines_chunked", {}):
        cell += f", {row['baselines_chunked'][name] / ms:.2f}x"
    if name in row.get("baselines_err", {}):
        cell += f", {row['baselines_err'][name]:.0e}"
    return cell + " |"


def format_tables(result: dict) -> str:
    lines = []
    if result.get("attention"):
        base = next((list(r["baselines"]) for r in result["attention"] if "baselines" in r), [])
        chunk = next((r["chunk"] for r in result["attention"] if "chunk" in r), CHUNK)
        lines += ["| shape (H/KV, head_dim) | n | tvm_lite us | TFLOP/s | SDPA us | SDPA TFLOP/s | "
                  f"vs SDPA | n in {chunk}-token chunks / one call |"
                  + "".join(f" {b}: us (/ tvm_lite's), chunks / one call, err |" for b in base),
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(base)]
        for r in result["attention"]:
            if r["key_tile"] is not None or r.get("m_tiles") is not None:
                continue
            lines.append(f"| {r['shape']} ({r['heads']}/{r['kv_heads']}, {r['head_dim']}) | "
                         f"{r['n']} | {r['tvm_lite_ms'] * 1e3:,.1f} | {r['tflops']:.1f} | "
                         f"{r['sdpa_ms'] * 1e3:,.1f} | {r['sdpa_tflops']:.1f} | "
                         f"{r['vs_sdpa']:.2f}x | "
                         + (f"{r['chunked_ratio']:.2f}x |" if "chunked_ratio" in r else "|")
                         + "".join(_baseline_cell(r, b) for b in r.get("baselines", {})))
    if result.get("gemm"):
        lines += ["", "| model | layer KxN | n | format | tvm_lite us | TFLOP/s | torch fp16 us | "
                  "torch TFLOP/s | vs torch |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["gemm"]:
            lines.append(f"| {r['model']} | {r['layer']} {r['K']}x{r['N']} | {r['n']} | "
                         f"{r['fmt']} | {r['tvm_lite_ms'] * 1e3:,.1f} | {r['tflops']:.1f} | "
                         f"{r['torch_ms'] * 1e3:,.1f} | {r['torch_tflops']:.1f} | "
                         f"{r['vs_torch']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tvm_lite.bench.prefill",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="attention,gemm")
    ap.add_argument("--key-tiles", default="", help="also time these tensor-core key tiles, "
                    "e.g. 32,64 (attention)")
    ap.add_argument("--m-tiles", default="", help="also time the tensor-core attention with "
                    "these 16-row m-tiles a warp, e.g. 1,2 (with each --key-tiles value, or the "
                    "kernel's own key tile)")
    ap.add_argument("--gemm-tiles", default="", help="also time these tensor-core GEMM tiles "
                    "TMxTNxWMxWNxKS[xTK], comma-separated (e.g. 128x256x2x4x1,128x128x2x4x1x64)")
    ap.add_argument("--gemm-models", default=",".join(GEMM_MODELS))
    ap.add_argument("--wgmma", default="", help="also time the wgmma GEMM at these tiles and X "
                    "stagings TMxTNxS (S: 0 registers, 2-5 cp.async slices, wsN the "
                    "warp-specialised kernel with N stages, wsNwB the same with B fp16 W slices, "
                    "wsN..p with its outputs stored in pairs, wsN..r with X copied a row a "
                    "warp quarter, wsN..s with its outputs staged through shared memory, "
                    "wsN..c with a split K summed in a cluster, wsN..dU with each consumer "
                    "thread dequantizing U packed vectors of a slice, "
                    "wsN..-part[-part..] without those "
                    "parts, a diagnostic: copy, dequant, mma, store; wrN the kernel with W "
                    "dequantized in registers, TM tokens x TN features, N stages, wrNr with X "
                    "copied by rows, wrN..-part as wsN), e.g. 128x256x3,128x256xws3,128x256xws5w2,128x256xws3p,"
                    "128x256xws5w2pr,128x256xws4w2rd1,128x256xws3-dequant,256x128xwr4")
    ap.add_argument("--gemm-lengths", default=",".join(map(str, GEMM_LENGTHS)),
                    help="prompt lengths M the GEMMs are timed at, e.g. 256,512,2048")
    ap.add_argument("--gemm-layers", default="", help="only these layers, separated by ';' "
                    "(names: q;k,v;o;gate,up;down, and q+k+v;gate+up merged as the models "
                    "run them; default: all)")
    ap.add_argument("--gemm-variants", default="", help="GEMM variants to time, comma-separated "
                    f"(default: all of {', '.join(GEMM_VARIANTS)}; e0m4 and fp16 with --gemm-tiles)")
    ap.add_argument("--gemm-switch", action="append", default=[],
                    metavar="NAME:MODULE.CONSTANT=VALUE[,...]",
                    help="also time the sm_90a GEMMs built with these constants (modules under "
                         "tvm_lite) set, as variant 'e0m4 (sm_90a) NAME' (repeatable), e.g. "
                         "p16:schedules.gpu_gemm_mma.PARTIALS_FP16=True")
    add_baseline_arguments(ap, "gpu_attention_prefill",
                           "before:LONGEST_FIRST_ACROSS_HEADS=False,PROMPT_SPLITS=1")
    ap.add_argument("--shapes", default=",".join(ATTENTION_SHAPES),
                    help="attention shapes to time (names of ATTENTION_SHAPES)")
    ap.add_argument("--lengths", type=int_list, default=",".join(map(str, ATTENTION_LENGTHS)),
                    help="prompt lengths n (attention)")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="also time n as chunks of this "
                    "many tokens (attention; 0: no chunks)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    baselines = baseline_kernels(ap, args, "gpu_attention_prefill")
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in ATTENTION_SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(ATTENTION_SHAPES)})")
    lengths = tuple(args.lengths)
    parts = args.parts.split(",")
    gemm_variants = tuple(v for v in args.gemm_variants.split(",") if v)
    unknown = [v for v in gemm_variants if v not in GEMM_VARIANTS]
    if unknown:
        ap.error(f"--gemm-variants: unknown {', '.join(unknown)} "
                 f"(known: {', '.join(GEMM_VARIANTS)})")
    for spec in (t for t in args.wgmma.split(",") if t):
        parts_ = spec.split("x")
        if len(parts_) != 3 or not (parts_[0].isdigit() and parts_[1].isdigit()):
            ap.error(f"--wgmma {spec}: not TMxTNxS")
        try:
            parse_wgmma_stages(parts_[2])
        except ValueError as err:
            ap.error(f"--wgmma {spec}: staging {err}")
    from tvm_lite.profile import check_switches

    check_switches(ap, args.gemm_switch)
    known_layers = set(GEMM_LAYER_NAMES)
    bad = [v for v in args.gemm_layers.split(";") if v and v not in known_layers]
    if bad:
        ap.error(f"--gemm-layers: unknown {', '.join(bad)} "
                 f"(known: {';'.join(sorted(known_layers))})")
    require_cuda_gpu("bench.prefill")  # (after the arguments are checked: they need no GPU)
    import torch

    result = {"device": torch.cuda.get_device_name()}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if "attention" in parts:
        keys = [int(t) for t in args.key_tiles.split(",") if t]
        m_tiles = [int(t) for t in args.m_tiles.split(",") if t]
        variants = [(None, None)] + [(k, None) for k in keys] + [
            (k, m) for m in m_tiles for k in (keys or [None])]
        result["attention"] = []

        def saved(line: str) -> None:  # each row on disk as soon as it is measured
            print(line, flush=True)
            save()

        bench_attention(lengths, tuple(shapes), args.chunk, variants=variants,
                        baselines=baselines,
                        rows=result["attention"], progress=saved)
        save()
    if "gemm" in parts:
        tiles = [tuple(int(v) for v in t.split("x")) for t in args.gemm_tiles.split(",") if t]
        fmts = ("e0m4", "fp16") if tiles else tuple(GEMM_VARIANTS)
        if args.gemm_variants:
            fmts = gemm_variants
        wgmma = [(int(t.split("x")[0]), int(t.split("x")[1]), t.split("x")[2])
                 for t in args.wgmma.split(",") if t]
        layers = tuple(v for v in args.gemm_layers.split(";") if v)
        result["gemm"] = bench_gemm(tuple(int(v) for v in args.gemm_lengths.split(",") if v),
                                    models=args.gemm_models.split(","), fmts=fmts, tiles=tiles,
                                    wgmma=wgmma, layers=layers, switches=args.gemm_switch)
        save()
    print(format_tables(result))


if __name__ == "__main__":
    main()
