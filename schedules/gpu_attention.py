"""GPU kernels for tvm_lite's fused attention (``relax_passes/fuse_attention.py``), per profile.

``FuseAttention`` emits a target-independent PrimFunc (a loop nest, parallel over head × query
row) tagged ``tvm_lite.kernel = attention_prefill | attention_decode`` with its parameters in
``tvm_lite.attention``. On a GPU the rule :class:`Attention` replaces it by a kernel written for
the target's profile (both keep the same signature: ``q (1, H, n, D)``, the cache views
``k, v (m, KV, D)``, the additive mask ``(1, 1|H, 1|n, m)`` and ``out (1, H, n, D)``; query head
``h`` reads kv head ``h // (H / KV)``):

* prefill — :mod:`.gpu_attention_prefill`: query-row tiles x key tiles (head_dim split across
  threads), causal tile skipping, GQA heads sharing K/V tiles; tensor cores on CUDA.
* decode — one workgroup per query head, ``threads`` threads split over the keys: per chunk of
  ``threads`` keys each thread computes one score (into local memory), the chunk max is read by
  all, then thread ``t`` accumulates output dim ``t % D`` over keys ``≡ t // D`` (mod
  ``threads / D``) with the online-softmax rescale; the ``threads / D`` partial accumulators and
  sums are merged through local memory at the end (cross-thread reduction).

A sliding-window layer's ring kernel (``attention_ring_*``: ``window`` in the parameters; the
ring ``k, v (W, KV, D)``, the new rows and the position ``past``, no mask) goes to the same two
builders, which then read a ring: prefill walks the keys "the ring's last ``min(past, W - 1)``
positions, then the new rows", skipping key tiles below the window as well as above the
diagonal, and writes the last ``min(n, W)`` new rows into the ring after the attention kernels;
decode writes its new row first and splits over the live window only.

Parameters come from the profile (workgroup size, local-memory budget); ``TILES`` lists them.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.script import from_source
from tvm.target import Target

from .gpu_attention_decode import decode_kernel as split_decode_kernel
from .profiles import fit_to_target, gpu_profile
from ..relax_passes.fuse_attention import KERNEL_ATTR, PARAMS_ATTR, kernel_source, mask_index, \
    kv_index, out_index, score, signature
from .gpu_attention_prefill import prefill_kernel

# threads: decode workgroup size, and the SIMT prefill kernel's; local_bytes: local (shared)
# memory a SIMT prefill workgroup may use for its Q, K, V and score tiles.
TILES = {
    "adreno": dict(threads=128, local_bytes=16384),  # 16 KiB local memory
    "mali": dict(threads=64, local_bytes=8192),  # local memory is ordinary memory
    "cuda": dict(threads=256, local_bytes=32768),
    "gpu": dict(threads=128, local_bytes=16384),
}


def _params(func) -> dict:
    raw = func.attrs[PARAMS_ATTR]
    return {k: (v if isinstance(v, (bool, int, float, str)) else
                (bool(v) if k in ("mask_heads", "mask_rows", "decode", "merged_heads",
                                  "kv_squeezed") else
                 float(v) if k in ("scale", "softcap") else
                 int(v) if k in ("heads", "kv_heads", "head_dim", "window") else str(v)))
            for k, v in raw.items()}


def _unroll(d: int) -> str:
    return "T.unroll" if d <= 128 else "T.serial"


def decode_kernel(p: dict, tile: dict, max_threads: int) -> tirx.PrimFunc:
    decl, _ = signature(p)
    H, D, G = p["heads"], p["head_dim"], p["heads"] // p["kv_heads"]
    threads = max(tile["threads"], D)
    threads -= threads % D
    if threads > max_threads:
        raise ValueError(f"decode attention needs head_dim={D} threads; the target allows "
                         f"{max_threads}")
    groups = threads // D  # key groups: thread t accumulates dim t % D over keys ≡ t // D
    f32, dt, u = "T.float32", p["dtype"], _unroll(D)
    mask = mask_index(p, "h", "0", f"c * {threads} + tx")
    key = f"c * {threads} + jj * {groups} + tx // {D}"  # the key thread tx accumulates
    k_src = kv_index(p, "k", f"c * {threads} + tx", f"h // {G}", "d")
    v_src = kv_index(p, "v", key, f"h // {G}", f"tx % {D}")
    src = kernel_source(p, decl, f'''    for h in T.thread_binding({H}, thread="blockIdx.x"):
        for tx in T.thread_binding({threads}, thread="threadIdx.x"):
            qs = T.alloc_buffer(({D},), "float32", scope="shared")
            ps = T.alloc_buffer(({threads},), "float32", scope="shared")
            red = T.alloc_buffer(({threads},), "float32", scope="shared")
            reds = T.alloc_buffer(({threads},), "float32", scope="shared")
            st = T.alloc_buffer((5,), "float32", scope="local")  # max, sum, score, acc, new max
            if tx < {D}:
                qs[tx] = {f32}(q[0, h, 0, tx])
            st[0] = T.min_value("float32")
            st[1] = {f32}(0)
            st[3] = {f32}(0)
            T.tvm_storage_sync("shared")
            for c in range((m + {threads - 1}) // {threads}):
                st[2] = T.min_value("float32")
                if c * {threads} + tx < m:
                    st[2] = {f32}(0)
                    for d in {u}({D}):
                        st[2] = st[2] + qs[d] * {f32}({k_src})
                    st[2] = {score(p, "st[2]", mask)}
                ps[tx] = st[2]
                T.tvm_storage_sync("shared")
                st[4] = st[0]
                for jj in range({threads}):
                    if c * {threads} + jj < m:
                        st[4] = T.max(st[4], ps[jj])
                st[3] = st[3] * T.exp(st[0] - st[4])
                st[1] = st[1] * T.exp(st[0] - st[4])
                st[0] = st[4]
                for jj in range({threads // groups}):
                    if {key} < m:
                        st[3] = st[3] + T.exp(ps[jj * {groups} + tx // {D}] - st[0]) * {f32}({v_src})
                        st[1] = st[1] + T.exp(ps[jj * {groups} + tx // {D}] - st[0])
                T.tvm_storage_sync("shared")
            red[tx] = st[3]
            reds[tx] = st[1]
            T.tvm_storage_sync("shared")
            if tx < {D}:
                st[3] = {f32}(0)
                st[1] = {f32}(0)
                for g in range({groups}):
                    st[3] = st[3] + red[g * {D} + tx]
                    st[1] = st[1] + reds[g * {D} + tx]
                {out_index(p, "h", "0", "tx")} = T.Cast("{dt}", st[3] / st[1])
''')
    return from_source(src)


class Attention(dl.ScheduleRule):
    """Schedules tvm_lite's fused attention PrimFuncs for a GPU profile; None elsewhere (on the
    CPU the target-independent kernel runs as emitted)."""

    def apply(self, func, target: Target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None \
                or KERNEL_ATTR not in func.attrs:
            return None
        from . import gpu_profile, profile_of

        profile = profile_of(target)
        if profile == "cpu":
            return None
        p = _params(func)
        tile = TILES[profile]
        max_threads = int(target.attrs.get("max_num_threads", 256))
        if p["decode"]:  # flash-decoding: schedules/gpu_attention_decode.py
            kernel = split_decode_kernel(p, fit_to_target(gpu_profile(profile), target),
                                         max_threads)
        else:
            kernel = prefill_kernel(p, profile, target, tile["threads"], tile["local_bytes"],
                                    gpu_profile(profile).vector_bytes)
        return s_tir.Schedule(kernel)
