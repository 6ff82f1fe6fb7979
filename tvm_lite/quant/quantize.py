"""QuantConfig and the pre-pass ``compile_model`` runs: imported module + weights -> quantized
weights (cached) -> :class:`~tvm_lite.relax_passes.QuantizeWeightMatmuls`.

Quantized weights are cached under ``$TVM_LITE_CACHE/quant/`` by a hash of the weights, the
config and this package's code, so a second compile (or a test session) does not quantize again.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from .corpora import CALIBRATION_DOMAINS
from .format import (DEFAULT_GROUP_SIZE, FORMATS, QuantFormatError, QuantizedWeight, bytes_per_weight,
                     check_group_size)

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
_SHARED_STATS: dict | None = None  # calibration statistics kept while shared_calibration() is open


@contextmanager
def shared_calibration():
    """Within this block, quantizations of the same weights with the same calibration settings
    (e.g. GPTQ and AWQ at two group sizes) share one calibration run (held in memory)."""
    global _SHARED_STATS
    outer = _SHARED_STATS
    _SHARED_STATS = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED_STATS = outer


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    format          "e0m4" (Transformer-Lite) or "int4" (MLC-style ablation, symmetric)
    method          "rtn" (clipping search), "gptq", "awq" or "awq+gptq" (AWQ's scale search, then
                    GPTQ on the scaled weights; all three calibrate on real text)
    group_size      weights per scale along K (a multiple of 8; default 32)
    include_lm_head also quantize the lm_head matmul (off by default)
    include_embedding  also quantize the embedding table (RTN; shared with a tied lm_head)
    act_order       GPTQ: visit channels by decreasing Hessian diagonal
    gptq_damp       GPTQ: dampening, a fraction of mean(diag H) added to the diagonal. 0.1, not the
                    paper's 0.01: with a few thousand calibration tokens, 0.01 overfit the K=1536
                    down_proj of the layer we examined (its output error on held-out activations
                    was above RTN's; 0.1 was below). End to end the evidence is mixed: SmolLM2
                    E0M4-GPTQ g32 scored 19.11 perplexity with 0.01 / 2048 tokens and 19.70 with
                    0.1 / 4096 tokens on the held-out text (fp16: 17.54, int4-RTN: 22.92)
    clip_search     RTN/GPTQ/AWQ: search a clipping ratio per group (off = plain min/max)
    rtn_bias_weight RTN: weight of the group's summed error in the clipping search (0 = weight
                    MSE alone; see :func:`.rtn.rtn`)
    clip_weighted   GPTQ: weight the clipping search's error per input channel by the Hessian's
                    diagonal (the layer's output error, as AWQ's clip search does)
    scale_refit     GPTQ/AWQ/AWQ+GPTQ: afterwards refit the group scales to the layer's output error
                    with codes and zeros fixed (:mod:`.refit`); the value is the pull towards the
                    quantizer's scales (0 = none); None = off
    calib_tokens    calibration tokens in all, an equal share per domain
    calib_domains   calibration domains (:mod:`.corpora`); "self" = the model's own samples
    """

    format: str = "e0m4"
    method: str = "rtn"
    group_size: int = DEFAULT_GROUP_SIZE
    include_lm_head: bool = False
    include_embedding: bool = False
    act_order: bool = False
    clip_search: bool = True
    gptq_damp: float = 0.1
    clip_weighted: bool = False
    rtn_bias_weight: float = 0.0
    scale_refit: float | None = None
    calib_tokens: int = 10240
    calib_domains: tuple = CALIBRATION_DOMAINS

    def __post_init__(self):
        if self.format not in FORMATS:
            raise QuantFormatError(f"--quant {self.format!r}: choose one of {('none', *FORMATS)}")
        if self.method not in METHODS:
            raise QuantFormatError(f"--quant-method {self.method!r}: choose one of {METHODS}")
        check_group_size(self.group_size)
        if self.scale_refit is not None and (self.method == "rtn" or self.scale_refit < 0):
            raise QuantFormatError(f"scale_refit={self.scale_refit!r}: a damping >= 0, for a method "
                                   f"that calibrates (gptq, awq, awq+gptq), not {self.method!r}")
        unknown = set(self.calib_domains) - set(CALIBRATION_DOMAINS)
        if unknown or not self.calib_domains:
            raise QuantFormatError(f"calibration domains {sorted(unknown) or '()'}: choose from "
                                   f"{CALIBRATION_DOMAINS}")
        if self.calib_tokens < 128 * len(self.calib_domains):
            raise QuantFormatError(f"calib_tokens={self.calib_tokens}: at least 128 per domain")
        object.__setattr__(self, "calib_domains", tuple(self.calib_domains))

    @classmethod
    def parse(cls, fmt: str | None, **kwargs) -> "QuantConfig | None":
        """``None``/"none" -> None (no quantization); otherwise a validated config."""
        if fmt in (None, "none", ""):
            return None
        return cls(format=fmt, **{k: v for k, v in kwargs.items() if v is not None})

    @property
    def label(self) -> str:
        gptq = "gptq" in self.method
        extra = "+ao" if self.act_order and gptq else ""
        extra += "+wclip" if self.clip_weighted and gptq else ""
        extra += f"+d{self.gptq_damp:g}" if gptq and self.gptq_damp != 0.1 else ""
        extra += "" if self.clip_search else "-noclip"
        extra += f"+refit{self.scale_refit:g}" if self.scale_refit is not None else ""
        extra += f"+bias{self.rtn_bias_weight:g}" if self.rtn_bias_weight and self.method == "rtn" else ""
        extra += "+lm_head" if self.include_lm_head else ""
        extra += "+emb" if self.include_embedding else ""
        return f"{self.format}-{self.method}{extra}-g{self.group_size}"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("format.py", "rtn.py", "gptq.py", "awq.py", "refit.py", "calibration.py", "corpora.py",
                 "reference.py", "quantize.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _weights_digest(names: list[str], arrays: list[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, a in zip(names, arrays):
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def _save(path: Path, weights: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {}
    for i, (name, qw) in enumerate(weights.items()):
        arrays[f"w{i}_codes"], arrays[f"w{i}_scale"] = qw.codes, qw.scale
        if qw.zero is not None:
            arrays[f"w{i}_zero"] = qw.zero
        if qw.act_scale is not None:
            arrays[f"w{i}_act_scale"] = qw.act_scale
        meta[name] = {"i": i, "fmt": qw.fmt, "group_size": qw.group_size, "k": qw.k, "n": qw.n,
                      "info": qw.info, "shared_with": None}
    # tied weights (one object under two names) are stored once
    seen: dict = {}
    for name, qw in weights.items():
        if id(qw) in seen:
            meta[name]["shared_with"] = seen[id(qw)]
        else:
            seen[id(qw)] = name
    with atomic_path(path) as tmp:  # a killed run leaves no half-written cache entry
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _load(path: Path) -> dict:
    out: dict = {}
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        for name, m in meta.items():
            if m["shared_with"]:
                continue
            i = m["i"]
            out[name] = QuantizedWeight(m["fmt"], m["group_size"], m["k"], m["n"], data[f"w{i}_codes"],
                                        data[f"w{i}_scale"],
                                        data[f"w{i}_zero"] if f"w{i}_zero" in data.files else None,
                                        data[f"w{i}_act_scale"] if f"w{i}_act_scale" in data.files else None,
                                        m["info"])
        for name, m in meta.items():
            if m["shared_with"]:
                out[name] = out[m["shared_with"]]
    return {name: out[name] for name in meta}


def tokenizer_of(folder):
    """The export folder's tokenizer, or None (then only RTN can quantize)."""
    from tvm_lite.tokenizer import Tokenizer

    try:
        tok = Tokenizer(folder)
    except FileNotFoundError:
        return None
    meta = Path(folder) / "tvm_lite_model.json"
    if meta.exists():  # the chat domains render through the model's template
        tok.chat_template = json.loads(meta.read_text()).get("chat_template")
    tok.folder = Path(folder)  # calibration runs the folder's PyTorch source when it can
    return tok


def _selected(uses, config: QuantConfig) -> list:
    keep = []
    for u in uses:
        if u.role == "proj" or (u.role == "lm_head" and config.include_lm_head) or \
                (u.role == "embedding" and config.include_embedding):
            keep.append(u)
    return keep


_POOL_JOB: tuple | None = None  # (arrays, config, stats) for the worker processes (forked)


def _quantize_one(name: str):
    from . import awq, gptq, rtn

    arrays, config, stats = _POOL_JOB
    w = arrays[name]
    clip = rtn.DEFAULT_CLIP_RATIOS if config.clip_search else (1.0,)
    t0 = time.perf_counter()
    if config.method == "rtn":
        qw = rtn.rtn(w, config.format, config.group_size, clip_ratios=clip,
                     bias_weight=config.rtn_bias_weight)
    elif config.method == "gptq":
        qw = gptq.gptq(w, stats[name].hessian, config.format, config.group_size,
                       percdamp=config.gptq_damp, act_order=config.act_order, clip_ratios=clip,
                       clip_weighted=config.clip_weighted, refit_damp=config.scale_refit)
    elif config.method == "awq":
        st = stats[name]
        qw = awq.awq(w, st.hessian, st.mean_abs, config.format, config.group_size, clip_ratios=clip,
                     refit_damp=config.scale_refit)
    else:
        st = stats[name]
        qw = awq.awq_gptq(w, st.hessian, st.mean_abs, config.format, config.group_size,
                          percdamp=config.gptq_damp, act_order=config.act_order,
                          clip_ratios=clip, clip_weighted=config.clip_weighted,
                          refit_damp=config.scale_refit)
    qw.info["seconds"] = round(time.perf_counter() - t0, 3)
    return name, qw


def quantize_matrices(arrays: dict, config: QuantConfig, stats: dict, progress=print,
                      workers: int | None = None) -> dict:
    """``{name: QuantizedWeight}`` for ``arrays`` (``{name: [K, N]}``) by ``config``'s method;
    ``stats`` ``{name: InputStats}`` for GPTQ/AWQ. The matrices are independent, so they are
    quantized by ``workers`` forked processes (default ``$TVM_LITE_QUANT_WORKERS`` or 1)."""
    import multiprocessing
    import os

    from tqdm import tqdm

    global _POOL_JOB
    workers = workers or int(os.environ.get("TVM_LITE_QUANT_WORKERS", "1"))
    names = list(arrays)
    _POOL_JOB = (arrays, config, stats)
    bar = dict(total=len(names), desc=f"quantizing ({config.label})", unit="matrix",
               disable=progress is None)
    try:
        if workers > 1 and len(names) > 1:
            with multiprocessing.get_context("fork").Pool(min(workers, len(names))) as pool:
                done = dict(tqdm(pool.imap_unordered(_quantize_one, names), **bar))
        else:
            done = dict(tqdm(map(_quantize_one, names), **bar))
    finally:
        _POOL_JOB = None
    return {name: done[name] for name in names}


def _calibrate(mod, uses, arrays: dict, config: QuantConfig, tokenizer, digest: str, reference,
               progress) -> dict:
    """Calibration statistics per matmul weight: through the export's PyTorch source when it
    can be loaded (``reference``, or made from ``tokenizer.folder``), else through TVM (then
    without the ``self`` domain, which needs sampling)."""
    from . import calibration
    from .reference import Reference, ReferenceUnavailable

    matmuls = [u for u in uses if u.kind == "matmul"]
    if reference is None and getattr(tokenizer, "folder", None) is not None:
        try:
            reference = Reference(tokenizer.folder, {u.name: arrays[u.name] for u in matmuls})
        except (ReferenceUnavailable, ImportError, OSError) as e:
            if progress is not None:
                progress(f"calibration through TVM ({e})")
    domains = config.calib_domains
    samples = None
    if "self" in domains:
        if reference is None:
            domains = tuple(d for d in domains if d != "self") or ("docs",)
            if progress is not None:
                progress("calibration: no PyTorch source to sample from; the 'self' domain is left out")
        else:
            samples = calibration.self_samples(reference, tokenizer, config.calib_tokens // len(domains),
                                               digest, progress)
    chunks = calibration.mixed_chunks(tokenizer, config.calib_tokens, domains, samples)
    if progress is not None:
        progress(f"calibration: {sum(map(len, chunks))} tokens in {len(chunks)} sequences from "
                 f"{', '.join(domains)}")
    if reference is None:
        return calibration.collect(mod, uses, chunks, progress=progress)
    return reference.collect(calibration.input_groups(matmuls), chunks, progress)


def quantize_weights(mod, config: QuantConfig, tokenizer=None, progress=print,
                     cache: bool = True, stats_cache: dict | None = None, reference=None) -> dict:
    """``{parameter name: QuantizedWeight}`` for the weights ``config`` selects in ``mod`` (an
    imported module with its ``params`` attached). ``tokenizer`` is needed for GPTQ/AWQ.
    ``stats_cache`` (a dict) keeps calibration statistics between calls in one process;
    ``reference`` (a :class:`~.reference.Reference`) calibrates through PyTorch."""
    from tqdm import tqdm

    from tvm_lite.export import cache_dir
    from tvm_lite.relax_passes.quantize_weight_matmuls import find_weight_uses

    from . import awq, calibration, gptq, rtn

    func = mod["main"]
    if func.attrs is None or "params" not in func.attrs:
        raise QuantFormatError("quantization needs the imported module with its weights attached "
                               "(the 'params' attribute that tvm_lite.from_onnx sets)")
    names = [str(n) for n in func.attrs["tvm_lite.param_names"]]
    values = list(func.attrs["params"])
    uses = _selected(find_weight_uses(mod), config)
    if not uses:
        raise QuantFormatError("the model has no matmul by a 2-D weight parameter to quantize")
    arrays = {}
    by_name = dict(zip(names, values))
    for u in uses:
        if u.name not in arrays:
            arrays[u.name] = by_name[u.name].numpy()
    all_arrays = [v.numpy() for v in values] if config.needs_calibration else list(arrays.values())
    digest = _weights_digest(names if config.needs_calibration else list(arrays), all_arrays)
    key_src = json.dumps({"config": config.to_dict(), "code": _code_fingerprint(), "weights": digest,
                          "uses": [(u.name, u.kind) for u in uses]}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = cache_dir() / "quant" / f"{config.label}-{key}.npz"
    if cache and path.exists():
        try:
            loaded = _load(path)
            if progress is not None:
                progress(f"quantized weights from cache: {path}")
            return loaded
        except Exception as err:  # noqa: BLE001 - an unreadable entry is quantized again
            if progress is not None:
                progress(f"unreadable cache entry {path} ({type(err).__name__}): quantizing again")

    stats, t_cal = {}, time.perf_counter()
    stats_cache = stats_cache if stats_cache is not None else _SHARED_STATS
    if config.needs_calibration:
        if tokenizer is None:
            raise QuantFormatError(f"--quant-method {config.method} calibrates on text: the model "
                                   "folder needs its tokenizer (tokenizer.json)")
        skey = (digest, config.calib_tokens, config.calib_domains,
                tuple(u.name for u in uses if u.kind == "matmul"))
        if stats_cache is not None and skey in stats_cache:
            stats = stats_cache[skey]
        else:
            stats = _calibrate(mod, uses, arrays, config, tokenizer, digest, reference, progress)
            if stats_cache is not None:
                stats_cache[skey] = stats
    t_cal = time.perf_counter() - t_cal
    clip = rtn.DEFAULT_CLIP_RATIOS if config.clip_search else (1.0,)
    out: dict = {}
    todo = [u for u in uses if u.kind == "matmul"]
    done = quantize_matrices({u.name: arrays[u.name] for u in todo}, config, stats, progress)
    for u in todo:
        done[u.name].info["role"] = u.role
    if stats:
        done[todo[0].name].info["calibration_seconds"] = round(t_cal, 2)
    for u in uses:
        if u.kind == "matmul":
            out[u.name] = done[u.name]
            continue
        table = arrays[u.name]  # [V, D]
        tied = next((qw for name, qw in done.items() if qw.act_scale is None and (qw.k, qw.n) ==
                     (table.shape[1], table.shape[0]) and np.array_equal(arrays[name], table.T)), None)
        if tied is not None:
            out[u.name] = tied
            tied.info["tied_embedding"] = u.name
        else:
            qw = rtn.rtn(np.ascontiguousarray(table.T), config.format, config.group_size, clip_ratios=clip)
            qw.info.update(role="embedding", method="rtn")
            out[u.name] = qw
    if cache:
        _save(path, out)
    return out


def quantize_module(mod, config: QuantConfig, tokenizer=None, progress=print, **kwargs):
    """The imported ``mod`` (weights attached) with its weight matmuls on 4-bit weights, and a
    summary for the manifest."""
    from tvm_lite.relax_passes import QuantizeWeightMatmuls

    weights = quantize_weights(mod, config, tokenizer, progress, **kwargs)
    qpass = QuantizeWeightMatmuls(weights)
    out = qpass(mod)
    distinct = {id(qw): qw for qw in weights.values()}.values()
    n_weights = sum(qw.k * qw.n for qw in distinct)
    n_bytes = sum(qw.nbytes for qw in distinct)
    summary = {**config.to_dict(), "label": config.label, **qpass.stats,
               "quantized_weights": n_weights, "quantized_bytes": n_bytes,
               "bytes_per_weight": round(n_bytes / max(n_weights, 1), 5),
               "format_bytes_per_weight": bytes_per_weight(config.format, config.group_size)}
    return out, summary
