"""Tokenizer and chat template for a compiled model (``tokenizers`` + ``jinja2``; no torch)."""

from __future__ import annotations

from pathlib import Path

import jinja2
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, folder: Path, chat_template: str | None = None, bos_token_id=None):
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self._tok = _HFTokenizer.from_file(str(path))
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render ``messages`` with the model's own template, ready for the assistant's turn."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass chat=False")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                                 extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        bos = self._tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos or "", eos_token="")
