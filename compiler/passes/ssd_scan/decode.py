"""The SSD decode step (placeholder)."""
from __future__ import annotations


def is_step_candidate(node) -> bool:
    return False


def fuse_decode_step(graph, node, context) -> None:
    return None
