"""compressq: make ONNX models smaller and faster without breaking them."""

__version__ = "0.1.0"
