"""Offline text domains for calibration and evaluation -- nothing is downloaded.

A chat model is fed prose, code and conversations, so calibration mixes several domains, and the
evaluation measures on *other* domains, from sources calibration never reads:

calibration (:data:`CALIBRATION_DOMAINS`)
    ``docs``   CPython's reference-manual topics (``pydoc_data.topics``): technical English prose
    ``code``   CPython's standard-library Python sources
    ``chat``   conversations rendered through the model's chat template: a user asks what a
               standard-library module is for, the assistant answers with the module's docstring
    ``legal``  long-form English prose, which the domains above lack: Python's own ``LICENSE.txt``
               (the history of Python, then its licenses) and the system's license texts in
               ``/usr/share/common-licenses`` (Debian's base-files: GPL, Apache, MPL, ...), each
               distinct text once
    ``self``   the model's own sampled generations (data-free self-calibration): temperature-1
               samples from the chat template's opening, so the model writes both the question
               and the answer (:func:`self_generated`, made by the caller, cached on disk)

evaluation (:data:`EVAL_DOMAINS`), none of them read by calibration
    ``prose``  Isaac Newton's *Opticks* (the copy that ships in ``tvm_ffi``'s libbacktrace):
               English prose of another century, far from any software text
    ``news``   IDLE's release notes (``idlelib/NEWS.txt``): terse changelog English
    ``c``      CPython's C headers (``Include/``): code in another language
    ``qa``     conversations through the chat template about numpy functions, answered with their
               docstrings (questions and answers from another library than calibration's)

Every function returns plain text; :mod:`.calibration` and :mod:`.evaluate` tokenize it.
"""

from __future__ import annotations

import importlib
import json
import os
import sysconfig
from pathlib import Path

CALIBRATION_DOMAINS = ("docs", "code", "chat", "legal", "self")
EVAL_DOMAINS = ("prose", "news", "c", "qa")

# standard-library modules whose sources are the ``code`` domain, and whose docstrings the ``chat``
# domain's answers (a fixed list: the same text on every CPython 3.10+)
_CODE_MODULES = ("json", "argparse", "collections", "dataclasses", "functools", "textwrap", "csv",
                 "pathlib", "difflib", "heapq", "bisect", "shlex", "string", "fractions", "statistics",
                 "calendar", "configparser", "enum", "glob", "fnmatch", "contextlib", "copy", "pprint")
_CHAT_MODULES = ("os", "sys", "re", "json", "math", "random", "itertools", "functools", "collections",
                 "pathlib", "shutil", "subprocess", "threading", "socket", "sqlite3", "csv", "zipfile",
                 "tarfile", "datetime", "time", "logging", "argparse", "unittest", "typing", "decimal",
                 "fractions", "statistics", "hashlib", "hmac", "secrets", "base64", "struct", "array",
                 "heapq", "bisect", "queue", "sched", "string", "textwrap", "difflib", "pickle", "copy",
                 "pprint", "enum", "dataclasses", "contextlib", "abc", "inspect", "tempfile", "glob")
_QA_FUNCTIONS = ("linspace", "arange", "reshape", "concatenate", "stack", "where", "argsort",
                 "unique", "cumsum", "clip", "einsum", "histogram", "interp", "polyfit", "meshgrid",
                 "tile", "repeat", "searchsorted", "percentile", "convolve", "diff", "gradient",
                 "allclose", "isclose", "nonzero", "pad", "roll", "squeeze", "transpose", "dot")
_CHAT_QUESTIONS = ("What is the Python module `{}` for?", "Can you explain what `{}` does?",
                   "I keep seeing `{}` in code. What is it?", "How would I use `{}`?")


class CorpusError(RuntimeError):
    """A domain's offline source is missing on this machine."""


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docs() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def code() -> str:
    parts = []
    for name in _CODE_MODULES:
        spec = importlib.util.find_spec(name)
        path = Path(spec.origin)
        if path.name == "__init__.py":  # a package: its own modules, in name order
            files = sorted(path.parent.glob("*.py"))
        else:
            files = [path]
        parts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return "\n\n".join(parts)


def _conversations(pairs, render, turns: int = 3) -> str:
    """``pairs`` of (question, answer) -> conversations of ``turns`` exchanges, each rendered by
    ``render(messages)`` (the chat template), separated by blank lines."""
    out = []
    for i in range(0, len(pairs), turns):
        messages = []
        for q, a in pairs[i:i + turns]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(render(messages))
    return "\n".join(out)


def _doc(obj) -> str:
    import inspect

    return (inspect.getdoc(obj) or "").strip()


def chat(render) -> str:
    pairs = []
    for i, name in enumerate(_CHAT_MODULES):
        try:
            doc = _doc(importlib.import_module(name))
        except ImportError:
            continue
        if doc:
            pairs.append((_CHAT_QUESTIONS[i % len(_CHAT_QUESTIONS)].format(name), doc[:1500]))
    return _conversations(pairs, render)


SYSTEM_LICENSES = Path("/usr/share/common-licenses")


def legal() -> str:
    files = [_stdlib() / "LICENSE.txt"]
    if SYSTEM_LICENSES.is_dir():
        files += sorted(SYSTEM_LICENSES.iterdir())
    texts: dict = {}
    for f in files:
        if f.is_file():
            texts.setdefault(f.read_text(encoding="utf-8", errors="replace"), f)
    if not texts:
        raise CorpusError(f"the 'legal' domain reads Python's LICENSE.txt and {SYSTEM_LICENSES}; "
                          "neither is on this machine")
    return "\n\n".join(texts)


def prose() -> str:
    import tvm_ffi

    path = Path(tvm_ffi.__file__).parent / "3rdparty" / "libbacktrace" / "Isaac.Newton-Opticks.txt"
    if not path.exists():
        raise CorpusError(f"the 'prose' domain reads {path}, which this tvm_ffi does not ship")
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.find("THE FIRST BOOK")  # past Project Gutenberg's header and the contents
    return text[start if start > 0 else 0:]


def news() -> str:
    path = _stdlib() / "idlelib" / "NEWS.txt"
    if not path.exists():
        raise CorpusError(f"the 'news' domain reads {path}, missing from this Python")
    return path.read_text(encoding="utf-8", errors="replace")


def c() -> str:
    folder = Path(sysconfig.get_paths()["include"])
    files = sorted(folder.glob("*.h"))
    if not files:
        raise CorpusError(f"the 'c' domain reads CPython's C headers, none in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def qa(render) -> str:
    import numpy as np

    pairs = []
    for i, name in enumerate(_QA_FUNCTIONS):
        doc = _doc(getattr(np, name))
        if doc:
            question = ("What does numpy's `{}` do?", "How do I use `np.{}`?",
                        "Explain `numpy.{}` to me, please.")[i % 3].format(name)
            pairs.append((question, doc[:1500]))
    return _conversations(pairs, render)


def chat_renderer(tokenizer):
    """``render(messages)`` with the model's chat template (whole conversations: no generation
    prompt at the end), or None when the model has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tokenizer.chat_template)
    return lambda messages: template.render(messages=messages, add_generation_prompt=False,
                                            bos_token="", eos_token="")


def _dumped(name: str):
    """Domain ``name``'s text from ``$TVM_LITE_CORPORA`` (a JSON file :func:`dump` wrote), or None."""
    path = os.environ.get("TVM_LITE_CORPORA")
    if not path:
        return None
    return json.loads(Path(path).read_text()).get(name)


def dump(path, render) -> None:
    """Write every domain's text (chat domains rendered by ``render``) to ``path`` as JSON, so a
    machine with another Python (or without tvm_ffi) reads the same text through
    ``$TVM_LITE_CORPORA``."""
    names = ("docs", *[d for d in CALIBRATION_DOMAINS if d not in ("docs", "self")], *EVAL_DOMAINS)
    Path(path).write_text(json.dumps({d: domain_text(d, render) for d in names}))


def domain_text(name: str, render=None) -> str:
    """The text of domain ``name``; ``render(messages)`` (the chat template) for chat domains."""
    dumped = _dumped(name)
    if dumped is not None:
        return dumped
    plain = {"docs": docs, "code": code, "legal": legal, "prose": prose, "news": news, "c": c}
    if name in plain:
        return plain[name]()
    if name in ("chat", "qa"):
        if render is None:
            raise CorpusError(f"the {name!r} domain needs the model's chat template")
        return (chat if name == "chat" else qa)(render)
    raise CorpusError(f"unknown text domain {name!r}; calibration domains {CALIBRATION_DOMAINS}, "
                      f"evaluation domains {EVAL_DOMAINS}")


__all__ = ["CALIBRATION_DOMAINS", "EVAL_DOMAINS", "CorpusError", "chat_renderer", "domain_text", "dump"]
