"""Run the generated CUDA C of tvm_lite's kernels on the CPU (for tests): the split-K decode
attention, and any kernel of pointer arguments on a 2-D thread block (:func:`run_kernel`).

No GPU is needed: the kernel source TVM generates for ``cuda`` (fp32, so no ``half``) is compiled
with g++ after a small shim -- each thread of a block is a ``std::thread``, ``__syncthreads()`` a
``std::barrier``, ``__shared__`` arrays are ``static`` (blocks run one after another), ``float4``
a 16-byte struct. The kernels' scalar arguments (bounds TVM's host code computes from ``m``) are
recognised by how the kernel uses them, from the split plan; an argument that cannot be recognised
fails the test instead of guessing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

SHIM = r'''
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <functional>
#include <thread>
#include <barrier>
#include <vector>
struct d3 { int x, y, z; };
thread_local d3 threadIdx, blockIdx;
std::barrier<>* bar;
#define __syncthreads() bar->arrive_and_wait()
#define __global__
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define CUDART_INF_F INFINITY
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <class A, class B> static inline auto max(A a, B b) { return a > b ? a : b; }
template <class A, class B> static inline auto min(A a, B b) { return a < b ? a : b; }
static void launch(int gx, int gy, int th, std::function<void()> fn) {
  for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {
    std::barrier<> b(th); bar = &b;
    std::vector<std::thread> ts;
    for (int t = 0; t < th; ++t)
      ts.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {bx, by, 0}; fn(); });
    for (auto& x : ts) x.join();
  }
}
static void launch2(int gx, int tx, int ty, std::function<void()> fn) {  // 2-D thread blocks
  for (int bx = 0; bx < gx; ++bx) {
    std::barrier<> b(tx * ty); bar = &b;
    std::vector<std::thread> ts;
    for (int t = 0; t < tx * ty; ++t)
      ts.emplace_back([=] { threadIdx = {t % tx, t / tx, 0}; blockIdx = {bx, 0, 0}; fn(); });
    for (auto& x : ts) x.join();
  }
}
static float* load(const char* f, size_t n) {
  float* p = new float[n]; FILE* h = fopen(f, "rb"); fread(p, 4, n, h); fclose(h); return p;
}
'''


def _kernel_body(src: str) -> str:
    body = src[src.index('extern "C"'):]
    lines = [ln for ln in body.splitlines()
             if not (ln.startswith('extern "C"') and ln.rstrip().endswith(";"))]  # declarations
    return ("\n".join(lines).replace('extern "C" ', "")
            .replace("__shared__ alignas(64)", "alignas(64) static"))


def _scalar_args(signature: str, kernel: str, values: dict) -> list[str]:
    """The call arguments of a kernel: pointers by name, scalars by their use in the kernel."""
    out = []
    for arg in signature.split(", "):
        name = arg.split()[-1]
        if "*" in arg:
            out.append(name)
            continue
        uses = [(r"\* {n}\) \* \(int64_t\)\d+\)", "chunk_tiles"), (r"min\(\({n} \+ start", "chunk"),
                (r"i < {n};", "splits"), (r"<= {n}\)", "splits-1"),
                (r"< \({n} \+ \(int64_t\)1\)", "lane_iters-1"), (r", {n}\)", "m-1")]
        role = "m" if name == "m" else next(
            (r for pat, r in uses if re.search(pat.format(n=name), kernel)), None)
        if role is None and re.search(rf"\b{name}\b", kernel.split("{", 1)[1]):
            raise AssertionError(f"cannot tell what kernel argument {name} is")
        out.append(str(values.get(role, 0)))  # (an argument the kernel never reads: 0)
    return out


def run_decode_attention(src: str, plan: dict, q, k, v, mask, work: Path) -> np.ndarray:
    """The (1, 1, H * D) output of the two kernels in ``src`` on fp32 ``q (1, H, 1, D)``,
    ``k, v (m, KV, D)``, ``mask (1, 1, 1, m)`` or ``(1, H, 1, m)``."""
    _, heads, _, d = q.shape
    m, kv = k.shape[0], k.shape[1]
    tile, sm, p = plan["tile"], plan["max_splits"], plan["P"]
    chunk_tiles = max(plan["min_tiles"], -(-m // (sm * tile)))
    splits = -(-m // (chunk_tiles * tile))
    values = {"m": m, "m-1": m - 1, "chunk_tiles": chunk_tiles, "chunk": chunk_tiles * tile,
              "splits": splits, "splits-1": splits - 1, "lane_iters-1": -(-splits // p) - 1}
    body = _kernel_body(src)
    k2 = body.index("void __launch_bounds__", body.index("attn_kernel(") + 1)
    sig1 = re.search(r"attn_kernel\((.*?)\) \{", body).group(1)
    sig2 = re.search(r"attn_kernel_1\((.*?)\) \{", body).group(1)
    a1 = ", ".join(_scalar_args(sig1, body[:k2], values))
    a2 = ", ".join(_scalar_args(sig2, body[k2:], values))
    g = plan["G"]
    files = {n: work / f"{n}.bin" for n in ("q", "k", "v", "mask", "o")}
    for name, arr in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        np.ascontiguousarray(arr, "float32").tofile(files[name])
    main = f'''
int main() {{
  float* q_ptr = load("{files["q"]}", {q.size}); float* k_ptr = load("{files["k"]}", {k.size});
  float* v_ptr = load("{files["v"]}", {v.size}); float* mask_ptr = load("{files["mask"]}", {mask.size});
  float* part_o_ptr = new float[{kv * sm * g * d}]; float* part_ml_ptr = new float[{kv * sm * g * 2}];
  float* o_ptr = new float[{heads * d}];
  launch({splits}, {kv}, {plan["threads"]}, [=] {{ attn_kernel({a1}); }});
  launch({heads}, {d // plan["DM"]}, {plan["DM"] * p}, [=] {{ attn_kernel_1({a2}); }});
  FILE* h = fopen("{files["o"]}", "wb"); fwrite(o_ptr, 4, {heads * d}, h); fclose(h);
}}
'''
    _build_and_run(body + main, work)
    return np.fromfile(files["o"], "float32").reshape(1, 1, heads * d)


def _build_and_run(code: str, work: Path) -> None:
    """Compile the shim + ``code`` with g++ (C++20, threads) in ``work`` and run it."""
    cc, exe = work / "kernel.cc", work / "kernel"
    cc.write_text(SHIM + code)
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", str(cc), "-o", str(exe)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    subprocess.run([str(exe)], check=True)


def run_kernel(src: str, grid: int, threads: tuple[int, int], arrays: dict, out: str,
               out_size: int, work: Path) -> np.ndarray:
    """Run the one fp32 kernel of ``src`` (pointer arguments only, named ``<name>_ptr`` after
    the buffers: ``arrays`` gives the inputs by buffer name, ``out`` names the output) on
    ``grid`` workgroups of ``threads = (x, y)`` threads; the output as a flat array. Built for a
    target with ``thread_warp_size = 1`` its cross-thread sums go through shared memory (no warp
    shuffles for the shim to emulate)."""
    body = _kernel_body(src)
    name, sig = re.search(r"void(?: __launch_bounds__\(\d+\))? (\w+)\((.*?)\) \{", body).groups()
    params = [a.split()[-1] for a in sig.split(", ")]
    assert all("*" in a for a in sig.split(", ")), f"scalar arguments in {sig}"
    files = {n: work / f"{n}.bin" for n in [*arrays, out]}
    loads = []
    for n, arr in arrays.items():
        np.ascontiguousarray(arr, "float32").tofile(files[n])
        loads.append(f'float* {n}_ptr = load("{files[n]}", {arr.size});')
    loads.append(f"float* {out}_ptr = new float[{out_size}];")
    assert sorted(params) == sorted(f"{n}_ptr" for n in [*arrays, out]), (params, list(arrays))
    main = f'''
int main() {{
  {chr(10).join(loads)}
  launch2({grid}, {threads[0]}, {threads[1]}, [=] {{ {name}({", ".join(params)}); }});
  FILE* h = fopen("{files[out]}", "wb"); fwrite({out}_ptr, 4, {out_size}, h); fclose(h);
}}
'''
    _build_and_run(body + main, work)
    return np.fromfile(files[out], "float32")
