"""Helpers for tests and benchmarks: tiny random checkpoints of every family."""

from moelens.testing.tiny import TinySpec, build_tiny_checkpoint, tiny_specs

__all__ = ["TinySpec", "build_tiny_checkpoint", "tiny_specs"]
