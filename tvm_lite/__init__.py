"""tvm_lite: Transformer-Lite as a TVM 0.27 compiler extension."""

__version__ = "0.1.0"
