"""prism-onnx: PRISM (arXiv 2507.12145) partitioned Transformer inference, exported to ONNX for edge devices.

The package root imports no torch: `prism_onnx.runtime` runs on boards with onnxruntime and numpy only.
`simulate` (PyTorch) is imported on first use.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "simulate":
        from .reference import simulate

        return simulate
    raise AttributeError(f"module 'prism_onnx' has no attribute {name!r}")


__all__ = ["__version__", "simulate"]
