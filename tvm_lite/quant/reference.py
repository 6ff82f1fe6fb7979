"""The exported model's own PyTorch source, as the fast path for calibration and evaluation.

An export folder records the model it came from (``tvm_lite_model.json``'s ``source``: the GGUF
file or Hugging Face folder). Loaded with transformers, it is the same network as the ONNX file
tvm_lite compiles, and on this CPU a PyTorch forward pass is ~10x faster than the LLVM build's
prefill, so calibration (thousands of tokens) and perplexity over several domains run here:

* every quantized matmul of the Relax module is matched to its ``nn.Linear`` by value (the
  export's weight ``[K, N]`` is the Linear's ``weight.T`` bit for bit; names differ, e.g. the
  dynamo exporter names transposed weights ``val_104``);
* :meth:`Reference.collect` hooks one Linear per distinct input (q/k/v and gate/up read the same
  activations) and sums ``X^T X`` and ``|X|`` over the calibration chunks;
* :meth:`Reference.use` loads a quantization's *effective* weights into the Linears: the fp16
  values the 4-bit kernels dequantize (``QuantizedWeight.effective_weight``), with AWQ's input
  scale folded in -- the numbers the compiled 4-bit model multiplies by, in fp32 activations, as
  the CPU build computes them. :mod:`.evaluate` checks the compiled build against this on request.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .calibration import InputStats


class ReferenceUnavailable(RuntimeError):
    """The export folder names no source that transformers can load here."""


def _digest(a: np.ndarray) -> str:
    data = np.ascontiguousarray(a, np.float32).view(np.uint8).data
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def source_of(folder) -> Path:
    meta = Path(folder) / "tvm_lite_model.json"
    src = json.loads(meta.read_text()).get("source") if meta.exists() else None
    if not src or not Path(src).exists():
        raise ReferenceUnavailable(f"{folder} records no loadable source model ({meta})")
    return Path(src)


class Reference:
    """The source model in PyTorch with its Linears matched to the Relax module's weight names."""

    def __init__(self, folder, weights: dict[str, np.ndarray] | None = None, device: str = "cpu"):
        """``weights``: ``{parameter name: [K, N] array}`` of the Relax module's matmuls to match;
        None: every Linear but the output head, by its module name (no TVM needed)."""
        import torch

        from tvm_lite.export import load_hf_model

        self.torch = torch
        self.device = device
        self.model, self.hf_tokenizer = load_hf_model(source_of(folder))
        self.model.requires_grad_(False)
        self.model.to(device)
        vocab = self.model.config.vocab_size
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)]
        if weights is None:
            self.linear = {n: m for n, m in linears if m.out_features != vocab}
        else:
            by_digest = {}
            for _, m in linears:
                by_digest.setdefault(_digest(m.weight.detach().cpu().numpy().T), m)
            self.linear = {}
            for name, w in weights.items():
                m = by_digest.get(_digest(w))
                if m is None:
                    raise ReferenceUnavailable(f"weight {name} {w.shape} matches no nn.Linear of the source")
                self.linear[name] = m
        self.original = {name: m.weight.detach().clone() for name, m in self.linear.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """``{name: [K, N] float32}``: the matched Linears' weights as the export holds them."""
        return {name: np.ascontiguousarray(w.cpu().numpy().T) for name, w in self.original.items()}

    def input_groups(self, ids: list[int]) -> list[list[str]]:
        """Names of the Linears that read the same input tensor (q/k/v, gate/up), found by one
        forward pass over ``ids``."""
        seen: dict = {}

        def record(name):
            def hook(_module, inputs):  # returns None: the input goes on unchanged
                seen.setdefault(name, inputs[0])  # the tensor itself: ids of freed ones recur
            return hook

        hooks = [m.register_forward_pre_hook(record(name)) for name, m in self.linear.items()]
        try:
            with self.torch.inference_mode():
                self.model(self.torch.tensor([ids], device=self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        groups: list[tuple] = []
        for name in self.linear:
            for x, names in groups:
                if x is seen[name]:
                    names.append(name)
                    break
            else:
                groups.append((seen[name], [name]))
        return [names for _, names in groups]

    # -- calibration --------------------------------------------------------------------------
    def collect(self, groups: list[list[str]], chunks: list[list[int]], progress=None) -> dict:
        """``{name: InputStats}`` over ``chunks`` of token ids; ``groups``: names reading one
        input (one InputStats each)."""
        from tqdm import tqdm

        torch = self.torch
        dev = self.device
        acc = [[torch.zeros(self.linear[g[0]].in_features, self.linear[g[0]].in_features,
                            dtype=torch.float64, device=dev),
                torch.zeros(self.linear[g[0]].in_features, dtype=torch.float64, device=dev), 0]
               for g in groups]
        hooks = []

        def hook(i):
            def fn(_module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                acc[i][0] += (x.T @ x).double()  # a sequence's sum in fp32, the total in fp64
                acc[i][1] += x.abs().sum(0).double()
                acc[i][2] += x.shape[0]
            return fn

        for i, g in enumerate(groups):
            hooks.append(self.linear[g[0]].register_forward_pre_hook(hook(i)))
        try:
            with torch.inference_mode():
                for ids in tqdm(chunks, desc="calibration", unit="chunk", disable=progress is None):
                    self.model(torch.tensor([ids], device=self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for g, (h, a, n) in zip(groups, acc):
            st = InputStats(h.cpu().numpy(), a.cpu().numpy(), n)
            for name in g:
                out[name] = st
        return out

    def sample(self, prefix_ids: list[int], n: int, length: int, seed: int = 0) -> list[list[int]]:
        """``n`` sampled continuations (temperature 1) of ``prefix_ids``, ``length`` tokens each."""
        torch = self.torch
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prefix_ids] * n, device=self.device), do_sample=True,
                                      temperature=1.0,
                                      top_p=1.0, top_k=0, max_new_tokens=length, min_new_tokens=length,
                                      pad_token_id=0)
        return [row[len(prefix_ids):].tolist() for row in out.cpu()]

    # -- evaluation -----------------------------------------------------------------------------
    def use(self, weights: dict | None) -> None:
        """Load ``{name: QuantizedWeight}``'s effective weights (None: the original ones)."""
        torch = self.torch
        with torch.no_grad():
            for name, m in self.linear.items():
                qw = None if weights is None else weights.get(name)
                if qw is None:
                    m.weight.copy_(self.original[name])
                else:
                    w = torch.from_numpy(np.ascontiguousarray(qw.effective_weight().T))
                    m.weight.copy_(w.to(self.device))

    def round_to_fp16(self) -> None:
        """Every Linear's weight rounded to fp16 (kept fp32): the ``fp16`` row."""
        with self.torch.no_grad():
            for m in self.linear.values():
                m.weight.copy_(m.weight.half().float())

    def perplexity(self, ids: list[int]) -> float:
        """exp(mean negative log-likelihood) of ``ids[1:]`` given all tokens before each."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.tensor([ids], device=self.device), use_cache=False)
            logits = out.logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=self.device),
                                                    reduction="mean")
        return float(torch.exp(nll))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prompt_ids], device=self.device), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
        return out[0, len(prompt_ids):].cpu().tolist()


__all__ = ["Reference", "ReferenceUnavailable", "source_of"]
