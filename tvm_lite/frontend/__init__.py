"""ONNX frontend: TVM's op converters plus host-side shape computing."""

from .onnx_importer import OnnxImportError, from_onnx, load_onnx

__all__ = ["OnnxImportError", "from_onnx", "load_onnx"]
