"""ir.contraction reads products spelled as einsums (any arity), matmuls (on merged (b * h) views
too), broadcast muls with sums, alike: the same factors, each dim lined up with the same result
dim or summed; a product by a number stays a factor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ir.canonicalize import canonicalize
from ir.contraction import active, contraction
from ir.from_fx import from_fx
from tests.ir.test_canonicalize import capture

B, H, P, N = 2, 3, 4, 5


class Readout(nn.Module):
    """y[b, h, p] = Σ_n S[b, h, p, n] C[b, h, n], spelled five ways."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, S, C):
        if self.spelling == "einsum":
            y = torch.einsum("bhpn,bhn->bhp", S, C)
        elif self.spelling == "matmul":
            y = (S @ C[..., None])[..., 0]
        elif self.spelling == "bmm":  # Hugging Face's decode step: (b * h, p, n) views
            y = torch.bmm(S.reshape(B * H, P, N), C.reshape(B * H, N, 1)).view(B, H, P)
        elif self.spelling == "sum":
            y = (S * C[:, :, None, :]).sum(-1)
        else:  # a scale inside the product
            y = torch.einsum("bhpn,bhn->bhp", S, C * 2.0)
        return y.exp()  # a reader, so y is a node of its own


def readout_of(spelling: str):
    graph = canonicalize(from_fx(capture(Readout(spelling), torch.randn(B, H, P, N), torch.randn(B, H, N))))
    (exp,) = [node for node in graph if node.op == "exp"]
    return contraction(graph, graph.node(exp.inputs[0]))


@pytest.mark.parametrize("spelling", ["einsum", "matmul", "bmm", "sum"])
def test_spellings_read_as_one_contraction(spelling):
    product = readout_of(spelling)
    factors = {factor.node.type.static_shape(): factor for factor in product.factors}
    assert sorted(factors) == [(B, H, P, N), (B, H, N)]
    state, c = factors[(B, H, P, N)], factors[(B, H, N)]
    assert state.labels[:3] == product.out and set(active(c)) == {*product.out[:2], state.labels[3]}
    assert product.summed == {state.labels[3]}


def test_a_product_by_a_number_is_a_factor():
    product = readout_of("scaled")
    assert [factor.node.op for factor in product.factors].count("mul") == 1
