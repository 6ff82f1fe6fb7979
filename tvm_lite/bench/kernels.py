"""Per-kernel GPU benchmark: decode GEMV bandwidth and prefill GEMM throughput of the linear layers.

For the linear layers of SmolLM2-135M and of a Gemma-2B-shaped model (random weights: speed does
not depend on the values), on one GPU, in one run:

* **decode GEMV** (``x[1, 1, K] @ W[K, N]``): time, GB/s of weight bytes (codes + scales + zeros
  for 4-bit weights) and the percentage of the device's copy bandwidth measured in the same run
  (a large device-to-device copy, counted as bytes read + bytes written), for tvm_lite E0M4,
  tvm_lite int4 (the ablation), tvm_lite fp16, ``tvm_lite e0m4 (generic)`` (the per-weight
  dequant schedule, without the packed-half2 kernel the cuda profile uses: the A/B of
  :mod:`tvm_lite.schedules.gpu_gemv_half2`), stock DLight fp16 with ``M = 1`` static (DLight's
  GEMV), and stock DLight fp16 with the sequence dim dynamic run at ``n = 1`` -- what stock
  TVM's one-kernel-for-every-length pipeline runs in decode;
* **prefill GEMM** (``x[1, n, K] @ W[K, N]``, ``n`` dynamic, run at 128/512/2048): TFLOP/s for
  tvm_lite E0M4 and int4 against stock DLight on the same dequant kernel and stock DLight fp16;
  ``tvm_lite e0m4 (simt)`` is the tiled schedule without tensor cores (what Adreno/Mali run).

Each kernel's output is checked against numpy on a column slice (``err``: max abs error over the
largest reference value). Times are medians of ``time_evaluator`` repeats. Matrices smaller than
the GPU's L2 cache stay resident between repeats, so their GB/s can exceed DRAM bandwidth: the
``L2`` column marks them.

``tvm-lite bench-kernels --target cuda [--json FILE]``
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

MODELS = {
    # name: (hidden, heads, kv_heads, head_dim, intermediate, vocab)
    "smollm2-135m": (576, 9, 3, 64, 1536, 49152),
    "gemma-2b": (2048, 8, 1, 256, 16384, 256000),
}
PREFILL_LENGTHS = (128, 512, 2048)
GROUP_SIZE = 32


@dataclass(frozen=True)
class Layer:
    model: str
    name: str
    k: int
    n: int


def linear_layers(models=tuple(MODELS)) -> list[Layer]:
    """The distinct linear-layer shapes of each model (q/o, k/v and gate/up share a shape)."""
    out = []
    for m in models:
        hidden, heads, kv, hd, inter, vocab = MODELS[m]
        shapes = [("q", hidden, heads * hd), ("k,v", hidden, kv * hd), ("o", heads * hd, hidden),
                  ("gate,up", hidden, inter), ("down", inter, hidden), ("lm_head", hidden, vocab)]
        seen = set()
        for name, k, n in shapes:
            if (k, n) in seen:
                continue
            seen.add((k, n))
            out.append(Layer(m, name, k, n))
    return out


# ---------------------------------------------------------------------------------------------
# kernels


def fp16_matmul_func(lead, k: int, n: int):
    """``x[*lead, K] @ W[K, N]`` in fp16, as Relax's LegalizeOps writes ``R.matmul``."""
    from tvm import te, tirx

    i64 = lambda d: tirx.IntImm("int64", d) if isinstance(d, int) else d  # noqa: E731
    x = te.placeholder((*[i64(d) for d in lead], i64(k)), "float16", name="x")
    w = te.placeholder((i64(k), i64(n)), "float16", name="w")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((*[i64(d) for d in lead], i64(n)),
                   lambda *idx: te.sum(x[(*idx[:-1], r)] * w[r, idx[-1]], axis=r), name="T_matmul")
    return te.create_prim_func([x, w, y])


def schedule_version(path: str):
    """Another version of one of ``schedules/``' modules (e.g. ``git show
    REV:schedules/gpu_attention_prefill.py > old.py``, or a copy with a constant changed),
    loaded as a module of ``tvm_lite.schedules`` so that its relative imports resolve to this
    tree's helpers: the benchmarks time it next to the tree's own in the same run."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        f"tvm_lite.schedules._baseline_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def switch_items(spec: str, key=r"[A-Za-z_][\w.]*") -> tuple[str, list[tuple[str, str]]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` (a ``--switch``) as ``(NAME, [(KEY, VALUE text)])``; a
    value is Python text and may hold commas (a comma starts a new item only before ``KEY=``).
    Raises ValueError naming what is malformed."""
    name, sep, body = spec.partition(":")
    if not sep or not name.isidentifier() or not body:
        raise ValueError(f"--switch {spec!r}: expected NAME:CONSTANT=VALUE[,CONSTANT=VALUE...]")
    items = []
    for item in re.split(rf",(?=\s*{key}\s*=)", body):
        const, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not re.fullmatch(key, const) or not value:
            raise ValueError(f"--switch {spec!r}: {item!r} is not CONSTANT=VALUE")
        items.append((const, value))
    return name, items


def switched_schedule(module_file, spec: str, out_dir) -> Path:
    """A copy of the schedule module ``module_file`` with top-level constants changed, for
    ``--switch`` (the benches time it as a ``--baseline-kernel``): ``spec`` is
    ``NAME:CONSTANT=VALUE[,CONSTANT=VALUE...]`` (``before:LONGEST_FIRST_ACROSS_HEADS=False``,
    ``k32:TC_KEY_TILES=(32,),TC_M_TILES=2``: a value is Python text and may hold commas);
    the copy is ``out_dir/NAME.py``. A constant that is not assigned once at the top level of
    the module is an error naming it (a ``sed`` that matches nothing would time the tree's own
    kernel under another name)."""
    name, items = switch_items(spec)
    text = Path(module_file).read_text()
    for const, value in items:
        if not const.isidentifier():
            raise ValueError(f"--switch {spec!r}: {const!r} is not a constant's name")
        pattern = re.compile(rf"^{const} = [^\n]*$", re.M)
        found = len(pattern.findall(text))
        if found != 1:
            raise ValueError(f"--switch {spec!r}: {const} is assigned {found} times at the top "
                             f"level of {Path(module_file).name} (expected once)")
        text = pattern.sub(f"{const} = {value}", text)
    out = Path(out_dir) / f"{name}.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def switched_baselines(module: str, specs) -> list[str]:
    """The files of ``--switch`` ``specs`` for the tree's ``schedules/<module>.py``, written to a
    fresh temporary folder (:func:`switched_schedule`)."""
    import importlib
    import tempfile

    if not specs:
        return []
    source = importlib.import_module(f"tvm_lite.schedules.{module}").__file__
    out = tempfile.mkdtemp(prefix="tvm_lite_switch_")
    return [str(switched_schedule(source, spec, out)) for spec in specs]


def add_baseline_arguments(ap, module: str, example: str) -> None:
    """``--baseline-kernel FILE[,FILE]`` and ``--switch NAME:CONST=VALUE[,...]``: other versions
    of the tree's ``schedules/<module>.py`` to time next to it (:func:`baseline_kernels`)."""
    ap.add_argument("--baseline-kernel", default="", help=f"other versions of schedules/{module}"
                    ".py to time next to this one, comma-separated, e.g. from git show "
                    f"REV:schedules/{module}.py > old.py")
    ap.add_argument("--switch", action="append", default=[], metavar="NAME:CONST=VALUE[,...]",
                    help=f"time a copy of schedules/{module}.py with these constants changed as "
                    f"the baseline kernel NAME (repeatable), e.g. {example}")


def baseline_kernels(ap, args, module: str) -> list[str]:
    """The files :func:`add_baseline_arguments`' options name; a malformed or unknown switch, or
    a file that is not there, stops the bench (``ap.error``) before any GPU work, naming it."""
    baselines = [b for b in args.baseline_kernel.split(",") if b]
    try:
        baselines += switched_baselines(module, args.switch)
    except ValueError as err:
        ap.error(str(err))
    missing = [b for b in baselines if not Path(b).is_file()]
    if missing:
        ap.error(f"--baseline-kernel: no file {', '.join(missing)}")
    return baselines


def require_cuda_gpu(tool: str) -> None:
    """Stop ``tool`` with a message saying so where this machine has no CUDA GPU that both TVM
    and torch reach (the GPU benches time CUDA kernels with torch.profiler, next to torch's)."""
    import tvm

    try:
        ok = bool(tvm.cuda(0).exist)
    except Exception:  # pylint: disable=broad-except  (a TVM built without the CUDA runtime)
        ok = False
    if ok:
        try:
            import torch

            ok = torch.cuda.is_available()
        except ImportError:
            ok = False
    if not ok:
        raise SystemExit(f"{tool}: no CUDA GPU here (it times CUDA kernels through TVM and "
                         "torch; run it on the GPU machine)")


def nvtx_name(kind: str, *parts: str) -> str:
    """The NVTX range around one timed variant, e.g. ``gemm:llama-3.2-1b:gate+up:e0m4_wgmma_128x256
    _xws3`` or ``attention:llama-3-8b_hd_128:n2048:tree`` (commas as ``+``, other characters
    than letters, digits and ``.:+-`` as ``_``: ncu's filter reads ``/``, ``@`` and spaces):
    ``ncu --nvtx --nvtx-include "<name>/" --launch-count 1`` profiles one of its launches."""
    name = ":".join((kind,) + parts).replace(",", "+")
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.:+-]", "_", name)).replace("_:", ":")


def kernel_func(fmt: str, lead, k: int, n: int):
    from tvm_lite.quant import kernels

    if fmt == "fp16":
        func = fp16_matmul_func(lead, k, n)
    else:
        func = kernels.matmul_func(fmt, lead, k, n, GROUP_SIZE, "float16", "float16")
    return func.with_attr("global_symbol", "main")


def int_list(text: str) -> list[int]:
    """An argparse ``type``: ``"256,512"`` -> ``[256, 512]``; anything else is a usage error
    that names the option and the value (not a traceback)."""
    import argparse

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers")


def markdown_table(head: str, lines: list[str]) -> str:
    """A benchmark's table: ``head`` (a markdown header row), its rule, then ``lines``."""
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *lines])


def gated_gemm_func(fmt: str, lead, k: int, n: int, act: str = "silu", fused: bool = True):
    """A gated MLP's gate+up prefill GEMM fused with its activation, as the pipeline makes it:
    ``act(gate) * up`` (``act``: "silu" or "gelu") over the GEMM's ``2n`` output columns
    interleaved in blocks of ``GATE_BLOCK`` (``relax_passes/merge_shared_input_projections.py``),
    fused by ``FuseGatedEpilogue`` -- the PrimFunc ``(x, weights.., out [.., n])``, fp16.
    ``fused=False``: the two kernels the pipeline makes without that pass, ``(GEMM (x,
    weights.., y [.., 2n]), activation (y, out [.., n]))``."""
    import tvm
    from tvm import relax

    from tvm_lite.convention import GATE_BLOCK
    from tvm_lite.relax_passes import FuseGatedEpilogue, FuseSiluMul, LegalizeGroupedReshape

    gemm = kernel_func(fmt, lead, k, 2 * n).without_attr("global_symbol")
    shapes = [list(p.shape) for p in gemm.params]
    params = [relax.Var(f"a{i}", relax.TensorType(s, str(p.dtype)))
              for i, (s, p) in enumerate(zip(shapes[:-1], gemm.params))]
    lead_dims = shapes[-1][:-1]
    bb = relax.BlockBuilder()
    gv = bb.add_func(gemm, "gate_up")
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, params, relax.TensorType(shapes[-1], "float16")))
            blocks = bb.emit(relax.op.reshape(y, lead_dims + [n // GATE_BLOCK, 2, GATE_BLOCK]))
            gate, up = (bb.emit(relax.op.reshape(relax.op.strided_slice(
                blocks, axes=[len(lead_dims) + 1], begin=[h], end=[h + 1]), lead_dims + [n]))
                for h in (0, 1))
            a = relax.op.nn.silu(gate) if act == "silu" else relax.op.nn.gelu_tanh(gate)
            out = bb.emit_output(relax.op.multiply(a, up))
        bb.emit_func_output(out)
    fuse = FuseGatedEpilogue()
    with tvm.transform.PassContext(opt_level=3):  # (FuseOps fuses from opt_level 3 on)
        mod = tvm.transform.Sequential([
            FuseSiluMul(), LegalizeGroupedReshape(), relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
            relax.transform.FuseTIR(), *([fuse] if fused else [])])(bb.get())
    prims = {gv.name_hint: f.with_attr("global_symbol", "main")
             for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    if not fused:
        return prims["gate_up"], next(f for name, f in prims.items() if name != "gate_up")
    if fuse.count != 1 or len(prims) != 1:
        raise RuntimeError("FuseGatedEpilogue did not fuse the gated GEMM")
    return next(iter(prims.values()))


def build(func, target, rules):
    """Schedule ``func`` with ``rules`` (DLight's ApplyDefaultSchedule) and compile it."""
    import tvm
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": func})
    with target:
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
        return tvm.compile(mod, target=target)


def kernel_plan(func, target, rules) -> str:
    """The plan the first of ``rules`` that takes ``func`` gives it: the kernel's
    ``tvm_lite.gemm`` label (tile, K split, stages; per prompt length where planned so), else
    the rule's class name; "" if none takes it."""
    with target:
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is None:
                continue
            sch = sch[0] if isinstance(sch, list) else sch
            attrs = sch.mod["main"].attrs
            if attrs is not None and "tvm_lite.gemm" in attrs:
                return str(attrs["tvm_lite.gemm"])
            return type(rule).__name__
    return ""


def applies(rule, func, target) -> bool:
    with target:
        return rule.apply(func, target, False) is not None


def gemv_kind(rules, func, target) -> str | None:
    """Which decode GEMV schedule ``rules`` give ``func``: ``half2`` (the packed kernel of
    :mod:`tvm_lite.schedules.gpu_gemv_half2`), ``generic`` (:class:`GPUDecodeGEMV`'s per-weight
    schedule), or None (another rule)."""
    from tvm_lite.schedules.gpu_gemv import GPUDecodeGEMV

    rule = next((r for r in rules if isinstance(r, GPUDecodeGEMV)), None)
    if rule is None:
        return None
    with target:
        sch = rule.apply(func, target, False)
    if sch is None:
        return None
    return "half2" if "gemv_half2" in str(sch.mod["main"].attrs.get("tvm_lite.gemv", "")) else "generic"


# ---------------------------------------------------------------------------------------------
# data


def _rng(seed=0):
    return np.random.default_rng(seed)


def random_half(shape, rng, bound_mask=0xBBFF) -> np.ndarray:
    """Random fp16 values with |v| < 1 (made from random bits: fast for the 1 GB lm_head)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & np.uint16(bound_mask)
    return bits.view(np.float16)


def weights(fmt: str, k: int, n: int, rng) -> dict:
    """The weight tensors of one layer (kernel argument order), random."""
    if fmt == "fp16":
        return {"w": random_half((k, n), rng)}
    ng = -(-k // GROUP_SIZE)
    codes = rng.integers(0, 1 << 16, size=(k // 4, n), dtype=np.uint16)
    scale = (rng.random((ng, n), dtype=np.float32) * 0.02 + 0.01).astype(np.float16)
    out = {"codes": codes, "scale": scale}
    if fmt == "e0m4":
        out["zero"] = np.full((ng, n), 1024 + 8, np.float16)
    return out


def weight_bytes(arrays: dict) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def reference(fmt: str, x: np.ndarray, arrays: dict, k: int, cols: int) -> np.ndarray:
    """fp32 numpy ``x @ W[:, :cols]``."""
    from tvm_lite.quant.format import dequantize

    if fmt == "fp16":
        w = arrays["w"][:, :cols].astype(np.float32)
    else:
        zero = arrays.get("zero")
        w = dequantize(fmt, np.ascontiguousarray(arrays["codes"][:, :cols]),
                       np.ascontiguousarray(arrays["scale"][:, :cols]),
                       None if zero is None else np.ascontiguousarray(zero[:, :cols]),
                       k, GROUP_SIZE).astype(np.float32)
    return x.astype(np.float32).reshape(-1, k) @ w


# ---------------------------------------------------------------------------------------------
# timing


def median_seconds(ex, dev, args, min_ms: int = 25, repeat: int = 7) -> float:
    f = ex.mod.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_ms)
    return float(np.median(f(*args).results))


def copy_bandwidth(dev, nbytes: int = 1 << 30, repeats: int = 20) -> dict:
    """Device-to-device copy of ``nbytes``: GB/s counted as bytes read + bytes written."""
    import tvm

    n = nbytes // 4
    a = tvm.runtime.empty((n,), "float32", dev)
    b = tvm.runtime.empty((n,), "float32", dev)
    a.copyto(b)
    dev.sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.copyto(b)
        dev.sync()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return {"bytes": nbytes, "seconds": t, "gb_s": 2 * nbytes / t / 1e9}


# ---------------------------------------------------------------------------------------------
# the benchmark


def run(target_str: str = "cuda", models=tuple(MODELS), lengths=PREFILL_LENGTHS,
        decode: bool = True, prefill: bool = True, check_cols: int = 2048, progress=True,
        checkpoint=None) -> dict:
    """Benchmark every layer; ``checkpoint(result)`` is called after each kernel (partial saves)."""
    import tvm
    from tvm import tirx
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        def tqdm(it, **_kw):
            class _Bar(list):
                def set_postfix_str(self, *_a): pass
                def close(self): pass
            return _Bar(it)

    from tvm_lite import parse_target
    from tvm_lite.schedules import rules_for, stock_gpu_rules
    from tvm_lite.schedules.gpu_gemm import GPUPrefillGEMM, simt_only
    from tvm_lite.schedules.gpu_gemv import GPUDecodeGEMV
    from tvm_lite.schedules import profile_of, gpu_profile

    target = parse_target(target_str)
    if target.kind.name != "cuda":
        raise ValueError(f"bench-kernels runs kernels, so it needs a CUDA target; got '{target_str}'")
    dev = tvm.cuda(0)
    if not dev.exist:
        raise RuntimeError("bench-kernels needs a CUDA device; none found")
    if not target.attrs.get("arch"):  # the device's own arch (DLight's tensor cores key on it)
        arch = "sm_" + str(dev.compute_version).replace(".", "")
        target = parse_target(f"{target_str} -arch={arch}")
        target_str = f"{target_str} -arch={arch}"
    profile = gpu_profile(profile_of(target))
    ours, stock = rules_for(target), stock_gpu_rules()
    l2 = getattr(dev, "l2_cache_size_bytes", None)
    copy = copy_bandwidth(dev)
    result = {"device": str(dev.device_name), "target": str(target_str), "profile": profile.name,
              "copy": copy, "l2_bytes": l2, "decode": [], "prefill": [], "errors": []}
    layers = linear_layers(models)
    rng = _rng()
    jobs = []
    for layer in layers:
        if decode:
            jobs += [("decode", layer, v) for v in
                     ("tvm_lite e0m4", "tvm_lite e0m4 (generic)", "tvm_lite int4", "tvm_lite fp16",
                      "stock fp16 (M=1)", "stock fp16 (dyn n=1)")]
        if prefill:
            jobs += [("prefill", layer, v) for v in
                     ("tvm_lite e0m4", "tvm_lite int4", "tvm_lite e0m4 (simt)", "stock e0m4",
                      "stock fp16")]
    fmt_of = lambda v: v.split()[1]  # noqa: E731
    order = {layer: i for i, layer in enumerate(layers)}
    jobs.sort(key=lambda j: (order[j[1]], fmt_of(j[2])))  # stable: one weight set per shape/format
    bar = tqdm(jobs, desc="kernels", disable=not progress)
    cache: dict = {}
    for phase, layer, variant in bar:
        bar.set_postfix_str(f"{phase} {layer.model} {layer.name} {variant}")
        fmt = fmt_of(variant)
        key = (layer.k, layer.n, fmt)
        if key not in cache:  # one set of weights per shape and format, on the device
            cache.clear()
            arrays = weights(fmt, layer.k, layer.n, rng)
            cache[key] = (arrays, [tvm.runtime.tensor(a, dev) for a in arrays.values()])
        arrays, dev_arrays = cache[key]
        rules = ours if variant.startswith("tvm_lite") else stock
        if variant.endswith("(simt)"):  # the Adreno/Mali-style schedule, without tensor cores
            rules = [simt_only(profile), *ours]
        if variant.endswith("(x2 lanes)"):  # the dequant arithmetic on 2-lane vectors
            rules = [GPUDecodeGEMV(replace(profile, gemv_lanes=2)), *ours]
        if variant.endswith("(generic)"):  # the per-weight schedule, without the packed kernel
            rules = [GPUDecodeGEMV(replace(profile, gemv_half2_rows=0)), *ours]
        if phase == "decode":
            static = "M=1" in variant or variant.startswith("tvm_lite")
            lead = [1, 1] if static else [1, tirx.Var("n", "int64")]
            func = kernel_func(fmt, lead, layer.k, layer.n)
            rule_used = gemv_kind(rules, func, target) if variant.startswith("tvm_lite") else None
            seqs = [1]
        else:
            func = kernel_func(fmt, [1, tirx.Var("n", "int64")], layer.k, layer.n)
            gemm = simt_only(profile) if variant.endswith("(simt)") else GPUPrefillGEMM(profile)
            rule_used = applies(gemm, func, target) if variant.startswith("tvm_lite") else None
            seqs = list(lengths)
        t0 = time.perf_counter()
        try:
            ex = build(func, target, rules)
        except Exception as err:  # pylint: disable=broad-except
            result["errors"].append(f"{phase} {layer} {variant}: {str(err)[-300:]}")
            continue
        compile_s = time.perf_counter() - t0
        for seq in seqs:
            x = random_half((1, seq, layer.k), rng)
            out = tvm.runtime.empty((1, seq, layer.n), "float16", dev)
            args = [tvm.runtime.tensor(x, dev), *dev_arrays, out]
            secs = median_seconds(ex, dev, args)
            cols = min(layer.n, check_cols)
            ref = reference(fmt, x, arrays, layer.k, cols)
            got = out.numpy().reshape(-1, layer.n)[:, :cols].astype(np.float32)
            err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
            row = {"model": layer.model, "layer": layer.name, "K": layer.k, "N": layer.n,
                   "variant": variant, "seq": seq, "us": secs * 1e6, "err": err,
                   "rule": rule_used, "compile_s": compile_s}
            if phase == "decode":
                nbytes = weight_bytes(arrays)
                row.update(weight_bytes=nbytes, gb_s=nbytes / secs / 1e9,
                           pct_copy=100 * nbytes / secs / 1e9 / copy["gb_s"],
                           l2=bool(l2 and nbytes <= l2))
                result["decode"].append(row)
            else:
                row["tflops"] = 2 * seq * layer.k * layer.n / secs / 1e12
                result["prefill"].append(row)
        if checkpoint is not None:
            checkpoint(result)
    bar.close()
    return result


def format_tables(result: dict) -> str:
    from .generation import format_table

    lines = [f"device: {result['device']}  target: {result['target']}  profile: {result['profile']}",
             f"copy bandwidth (1 GiB device-to-device, read+write): {result['copy']['gb_s']:.0f} GB/s"]
    if result["decode"]:
        rows = [{**r, "us": round(r["us"], 1), "gb_s": round(r["gb_s"], 1),
                 "pct_copy": round(r["pct_copy"], 1), "err": f"{r['err']:.1e}",
                 "MB": round(r["weight_bytes"] / 1e6, 2), "L2": "yes" if r["l2"] else ""}
                for r in result["decode"]]
        lines += ["", "decode GEMV (x[1,K] @ W[K,N]): weight bytes / time",
                  format_table(rows, ["model", "layer", "K", "N", "variant", "MB", "us", "gb_s",
                                      "pct_copy", "err", "L2", "rule"])]
    if result["prefill"]:
        rows = [{**r, "us": round(r["us"], 1), "tflops": round(r["tflops"], 2),
                 "err": f"{r['err']:.1e}"} for r in result["prefill"]]
        lines += ["", "prefill GEMM (x[n,K] @ W[K,N], n dynamic)",
                  format_table(rows, ["model", "layer", "K", "N", "seq", "variant", "us", "tflops",
                                      "err", "rule"])]
        lines += ["", "prefill speedup, tvm_lite e0m4 over stock (same n):"]
        by = {(r["model"], r["layer"], r["seq"], r["variant"]): r for r in result["prefill"]}
        rows = []
        for (m, layer, seq, v), r in by.items():
            if v != "tvm_lite e0m4":
                continue
            s_q, s_f = by.get((m, layer, seq, "stock e0m4")), by.get((m, layer, seq, "stock fp16"))
            rows.append({"model": m, "layer": layer, "seq": seq,
                         "vs stock e0m4": round(s_q["us"] / r["us"], 2) if s_q else "",
                         "vs stock fp16": round(s_f["us"] / r["us"], 2) if s_f else ""})
        lines.append(format_table(rows, ["model", "layer", "seq", "vs stock e0m4", "vs stock fp16"]))
    if result.get("errors"):
        lines += ["", "errors:", *result["errors"]]
    return "\n".join(lines)


def save_json(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


__all__ = ["run", "format_tables", "require_cuda_gpu", "linear_layers", "MODELS", "kernel_func",
           "build", "weights", "reference", "copy_bandwidth"]
