"""Evaluation: task models with real weights and the measurements made on them."""
