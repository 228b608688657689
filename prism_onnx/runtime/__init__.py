"""The on-board runtime: onnxruntime, numpy, pyzmq, click (and tokenizers/Pillow for inputs). No torch here."""
