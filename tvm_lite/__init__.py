"""tvm_lite: Transformer-Lite as a TVM 0.27 compiler extension.

    mod = tvm_lite.from_onnx("model.onnx")                  # symbolic dims, shapes on the host
    ex = tvm_lite.build(mod, target="opencl -device=adreno")  # tvm_lite's pipeline -> Executable
    engine = tvm_lite.Engine(tvm_lite.compile_model("model.onnx"))
    print(engine.generate("What is the capital of France?").text)

Attributes load lazily, so ``import tvm_lite`` works in a runtime-only TVM process
(``TVM_USE_RUNTIME_LIB=1``), where only the engine is usable.
"""

__version__ = "0.1.0"

from . import cpu_threads as _cpu_threads
from . import inspect_cache as _inspect_cache

_cpu_threads.configure()  # TVM's CPU pool: one thread per physical core (see cpu_threads.py)
_inspect_cache.seed_frozen_modules()  # TVMScript parses without scanning sys.modules per frame

_EXPORTS = {
    "from_onnx": "tvm_lite.frontend",
    "OnnxImportError": "tvm_lite.frontend",
    "build": "tvm_lite.compiler",
    "detach_params": "tvm_lite.compiler",
    "device_source": "tvm_lite.compiler",
    "parse_target": "tvm_lite.target",
    "TargetError": "tvm_lite.target",
    "compile_model": "tvm_lite.artifact",
    "export_onnx": "tvm_lite.export",
    "Engine": "tvm_lite.engine",
    "GenerationConfig": "tvm_lite.engine",
    "ContextLengthError": "tvm_lite.engine",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tvm_lite' has no attribute {name!r}")


__all__ = list(_EXPORTS)
