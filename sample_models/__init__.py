"""Sample ONNX models for compressq: trained digit classifiers and random-weight generators."""
