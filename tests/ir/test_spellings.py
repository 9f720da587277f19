"""Spellings of the convolution families' building blocks fold into one canonical op each
(ir/spellings.py): slices, FFTs, .real, conv1d, pad, sigmoid."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ir.from_fx import from_fx
from tests.ir.test_canonicalize import capture


def canonical(function, *args) -> list[tuple[str, dict]]:
    """(op, attrs) of every call in the captured graph of `function`, in order."""
    class Wrapped(nn.Module):
        def forward(self, *inputs):
            return function(*inputs)

    graph = from_fx(capture(Wrapped(), *args))
    return [(node.op, node.attrs) for node in graph if node.op not in ("placeholder", "output")]


def test_slices_along_one_dim():
    x = torch.randn(2, 3, 10)
    ops = canonical(lambda x: (x[..., :4], x[:, :, 2:8:2], x[:, 1:], x[..., :-3], x.narrow(-1, 1, 5),
                               torch.narrow(x, 1, -2, 2)), x)
    assert ops == [
        ("slice", {"dim": 2, "start": 0, "stop": 4, "step": 1}),
        ("slice", {"dim": 2, "start": 2, "stop": 8, "step": 2}),
        ("slice", {"dim": 1, "start": 1, "stop": 3, "step": 1}),
        ("slice", {"dim": 2, "start": 0, "stop": 7, "step": 1}),
        ("slice", {"dim": 2, "start": 1, "stop": 6, "step": 1}),
        ("slice", {"dim": 1, "start": 1, "stop": 3, "step": 1}),
    ]


def test_slices_of_two_dims_stay_opaque():
    (op,) = canonical(lambda x: x[:, :2, :4], torch.randn(2, 3, 10))
    assert op[0] == "torch"


def test_transforms_fill_in_their_defaults():
    x = torch.randn(2, 3, 10)
    ops = canonical(lambda x: (torch.fft.irfft(torch.fft.rfft(x, n=20), norm="forward"),
                               torch.fft.ifft(torch.fft.fft(x, dim=1), n=4, dim=1, norm="ortho").real,
                               torch.real(torch.fft.fft(x))), x)
    assert ops == [
        ("rfft", {"n": 20, "dim": 2, "norm": "backward"}),
        ("irfft", {"n": 20, "dim": 2, "norm": "forward"}),
        ("fft", {"n": 3, "dim": 1, "norm": "backward"}),
        ("ifft", {"n": 4, "dim": 1, "norm": "ortho"}),
        ("real", {}),
        ("fft", {"n": 10, "dim": 2, "norm": "backward"}),
        ("real", {}),
    ]


def test_n_dim_transforms_over_one_dim_are_the_one_dim_transforms():
    x = torch.randn(2, 3, 10)
    ops = canonical(lambda x: (torch.fft.irfftn(torch.fft.rfftn(x, s=(20,), dim=(-1,)), s=[20], dim=-1),
                               torch.fft.ifftn(torch.fft.fftn(x, dim=[1]), s=(4,), dim=(1,), norm="ortho"),
                               torch.fft.rfftn(x[0, 0], norm="forward"), torch.fft.rfftn(x, s=(12,)),
                               torch.fft.rfftn(x, dim=(1, 2)), torch.fft.fftn(x)), x)
    assert ops[:4] + ops[5:9] == [
        ("rfft", {"n": 20, "dim": 2, "norm": "backward"}),
        ("irfft", {"n": 20, "dim": 2, "norm": "backward"}),
        ("fft", {"n": 3, "dim": 1, "norm": "backward"}),
        ("ifft", {"n": 4, "dim": 1, "norm": "ortho"}),
        ("rfft", {"n": 10, "dim": 0, "norm": "forward"}),
        ("rfft", {"n": 12, "dim": 2, "norm": "backward"}),
        ("torch", ops[7][1]),
        ("torch", ops[8][1]),
    ]


def test_conv1d_pad_and_sigmoid():
    x, w, b = torch.randn(2, 4, 10), torch.randn(4, 1, 3), torch.randn(4)
    conv = nn.Conv1d(4, 4, 3, padding=2, groups=4)
    ops = canonical(lambda x, w, b: (conv(x), F.conv1d(F.pad(x, (2, 0)), w, b, groups=4, dilation=(1,)),
                                     F.conv1d(x, w, padding="same", groups=4), torch.constant_pad_nd(x, (1, 1), 2.0),
                                     torch.sigmoid(x) + F.sigmoid(x) + x.sigmoid()), x, w, b)
    depthwise = {"stride": 1, "dilation": 1, "groups": 4}
    assert [op for op in ops if op[0] in ("conv1d", "pad", "sigmoid")] == [
        ("conv1d", {**depthwise, "padding": 2, "has_bias": True}),
        ("pad", {"pad": (2, 0), "mode": "constant", "value": 0.0}),
        ("conv1d", {**depthwise, "padding": 0, "has_bias": True}),
        ("conv1d", {**depthwise, "padding": "same", "has_bias": False}),
        ("pad", {"pad": (1, 1), "mode": "constant", "value": 2.0}),
        ("sigmoid", {}), ("sigmoid", {}), ("sigmoid", {}),
    ]


def in_place_scaled(a, b):
    scores = a @ b
    scores /= 4.0
    scores = scores.mul_(2.0)
    return scores


def in_place_read_through_the_old_name(a, b):
    scores = a @ b
    scores.mul_(2.0)
    return scores


def in_place_with_a_second_reader(a, b):
    scores = a @ b
    before = scores.sum()
    scores /= 4.0
    return scores, before


def test_in_place_arithmetic_on_a_private_result_is_functional():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    ops = [op for op, _ in canonical(in_place_scaled, a, b)]
    assert ops == ["matmul", "div", "mul"]
    # a statement, scores read again through the old name: that read goes through the call
    assert [op for op, _ in canonical(in_place_read_through_the_old_name, a, b)] == ["matmul", "mul"]


@pytest.mark.parametrize("function", [in_place_with_a_second_reader])
def test_in_place_arithmetic_observed_elsewhere_stays_opaque(function):
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    ops = [op for op, _ in canonical(function, a, b)]
    assert ops[0] == "matmul" and not {"div", "mul"} & set(ops) and "torch" in ops
