"""prism-onnx: PRISM (arXiv 2507.12145) partitioned Transformer inference, exported to ONNX for edge devices.

The package root imports no torch: `prism_onnx.runtime` runs on boards with onnxruntime and numpy only.
Its names are imported on first use:

    Client      the Python client of a running cluster (`prism infer` without a shell):
                Client("HOST:PORT[,HOST:PORT...]", keys="EXPORT_DIR/client").infer(texts=[...])
    simulate    P simulated devices in PyTorch (needs the `export` extra)
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "simulate":
        from .reference import simulate

        return simulate
    if name == "Client":
        from .runtime.client import Client

        return Client
    raise AttributeError(f"module 'prism_onnx' has no attribute {name!r}")


__all__ = ["__version__", "Client", "simulate"]
