"""benchmarks/training_memory.py: saved bytes of a GPT-2-small layer, counted on meta tensors."""
from __future__ import annotations

from benchmarks.training_memory import eager_bytes, flashfx_bytes

MIB = 2**20


def test_flashfx_saves_linear_bytes_where_eager_saves_quadratic():
    eager = {length: eager_bytes(length) for length in (512, 1024)}
    ours = {length: flashfx_bytes(length) for length in (512, 1024)}
    assert ours[1024] == 2 * ours[512]  # O(L): q, k, v, O, the lse and the layer's other activations
    assert eager[1024] - 2 * eager[512] > 2 * 12 * 512**2  # O(L^2): the L x L weights and mask
    assert 20 * MIB < ours[1024] < 30 * MIB < eager[1024]
