"""PyTorch -> per-device ONNX bundles."""
