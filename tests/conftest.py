"""Shared, session-scoped fixtures: one export and one compile per exporter flavour per session.

Exports and artifacts are cached under $TVM_LITE_CACHE (default ~/.cache/tvm_lite), so a second
session reuses them.
"""

import pytest

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
]


@pytest.fixture(scope="session")
def export_dir():
    from tvm_lite.export import export_onnx

    cache = {}

    def get(exporter="dynamo"):
        if exporter not in cache:
            cache[exporter] = export_onnx(exporter=exporter)
        return cache[exporter]

    return get


@pytest.fixture(scope="session")
def artifact(export_dir):
    from tvm_lite.artifact import compile_model

    cache = {}

    def get(exporter="dynamo"):
        if exporter not in cache:
            cache[exporter] = compile_model(export_dir(exporter), "llvm")
        return cache[exporter]

    return get


@pytest.fixture(scope="session")
def engine(artifact):
    from tvm_lite.engine import Engine

    cache = {}

    def get(exporter="dynamo"):
        if exporter not in cache:
            cache[exporter] = Engine(artifact(exporter))
        return cache[exporter]

    return get


@pytest.fixture(scope="session")
def hf_model():
    from tvm_lite.export import default_model_source, load_hf_model

    return load_hf_model(default_model_source(), "float32")
