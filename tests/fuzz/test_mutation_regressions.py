"""Wrong answers a mutation fuzzer found (one run from source programs), one test per bug, each the
smallest program that shows it (as the fuzzer printed it, hand-minimised). Each checks outputs and
the inputs and buffers the model writes against eager (tests/fuzz/differential.py).
"""
from __future__ import annotations

import pytest

from tests.fuzz.differential import check_source

QKV = [(1, 1, 3, 4)] * 3


def test_cat_with_zeros_sees_a_copy_into_the_zeros():
    """cat([zeros, x]) is canonicalised to pad(x) although the zeros were written (copy_) first:
    the issue's example, and HF Mamba's conv-state update."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, state, x):
                buf = torch.zeros(state.shape, dtype=state.dtype)
                buf.copy_(state)
                return (torch.cat([buf, x], dim=-1) * 2,)
    """, [(2, 3), (2, 4)])


def test_binary_out_form_is_not_dropped():
    """torch.add(a, b, out=buf) reads as a functional add; nothing reads its result, so dead-code
    elimination drops the call and buf keeps its zeros."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x0, x1):
                buf = torch.zeros(x0.shape)
                torch.add(x0, x1, out=buf)
                return (buf * 2.0,)
    """, [(2, 3), (2, 3)])


def test_binary_out_form_into_an_input_is_not_dropped():
    """torch.mul(x1, 2.0, out=x0): the caller's x0 is never written (the call is dropped as dead)."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x0, x1):
                torch.mul(x1, 2.0, out=x0)
                return (x1 + 1.0,)
    """, [(3,), (3,)])


def test_matmul_out_form_is_not_dropped():
    """torch.matmul(a, b, out=buf) reads as a functional matmul and is dropped as dead."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x0, x1):
                buf = torch.zeros(2, 3)
                torch.matmul(x0, x1, out=buf)
                return (buf + 1.0,)
    """, [(2, 3), (3, 3)])


def test_relu_in_place_on_a_fresh_result_is_not_dropped():
    """torch.relu_(y) written as a statement: the relu normaliser makes it a canonical op, which
    dead-code elimination treats as pure and drops, so y is returned unrectified."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x0):
                y = x0 * 2.0
                torch.relu_(y)
                return (y,)
    """, [(2, 3)])


def test_relu_in_place_on_an_input_is_not_dropped():
    """x.relu_() on an input nobody reads again: dropped as dead, the caller's x is not rectified."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x0, x1):
                v1 = x1 * 2.0
                x1.relu_()
                return (v1,)
    """, [(3,), (3,)])


def test_augmented_assignment_into_an_input_is_not_dropped():
    """x += y (operator.iadd) on an input nobody reads again: its name has no trailing underscore,
    so dead-code elimination treats it as pure and the caller's x is not written."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x0):
                v1 = x0 * 2.0
                x0 += v1
                return (v1,)
    """, [(3,)])


def test_softmax_written_out_sees_a_write_into_exp():
    """e = exp(x - max); e[..., 0] = 0; e / e.sum(): rewritten to softmax(x), losing the write."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x):
                m = x.amax(-1, keepdim=True)
                e = torch.exp(x - m)
                e[..., 0] = 0.0
                return (e / e.sum(-1, keepdim=True),)
    """, [(2, 3)])


def test_softmax_written_out_sees_a_write_into_its_input():
    """x written after exp(x - max) was taken: the softmax(x) that replaces the division reads x
    where the division is, after the write."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x):
                m = x.amax(-1, keepdim=True)
                e = torch.exp(x - m)
                x.mul_(2.0)
                return (e / e.sum(-1, keepdim=True),)
    """, [(2, 3)])


def test_softmax_written_out_sees_a_write_into_the_row_max():
    """The row max overwritten before the subtraction: eager's exp overflows to inf (NaN out),
    the softmax(x) the rewrite trusts it for does not."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x):
                m = x.amax(-1, keepdim=True)
                m.fill_(-100.0)
                e = torch.exp(x - m)
                return (e / e.sum(-1, keepdim=True),)
    """, [(2, 3)])


def test_filled_buffer_sees_a_write_between_its_slices():
    """out[0] = x[0]; x.add_(y); out[1] = x[1]: canonicalised to stack([x[0], x[1]]) at the last
    write, so the first slice is read after x changed."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x, y):
                buf = torch.empty(2)
                buf[0] = x[0]
                x.add_(y)
                buf[1] = x[1]
                return (buf,)
    """, [(2,), (2,)])


def test_attention_sees_a_write_into_q_after_the_scores():
    """softmax(q @ k^T * s) @ v with q.mul_ between the scores and the output: the fused kernel
    reads q where the output is, after the write."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, q, k, v):
                s = q @ k.transpose(-2, -1)
                q.mul_(2.0)
                p = torch.softmax(s * 0.5, dim=-1)
                return (p @ v,)
    """, QKV)


def test_attention_sees_a_write_into_k_through_its_transpose():
    """k written through the view k.transpose(-2, -1) after the scores: the fused kernel reads k
    after the write."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, q, k, v):
                kt = k.transpose(-2, -1)
                s = q @ kt
                kt[..., 0] = 1.0
                p = torch.softmax(s * 0.5, dim=-1)
                return (p @ v,)
    """, QKV)


SCALE_BUFFER_WRITES = {
    # written in place before the scores read it: the output and the buffer both differ from eager
    "before_use": ("self.scale.mul_(3.0)\n", ""),
    # written after the probabilities were computed: the fused kernel must not read the new scale
    "after_use": ("", "self.scale.mul_(3.0)\n"),
}


@pytest.mark.parametrize("before,after", SCALE_BUFFER_WRITES.values(), ids=SCALE_BUFFER_WRITES.keys())
def test_attention_scale_buffer_written_in_the_forward(before, after):
    """A 0-d buffer scale (module state, folded in at compile time) written in place in the forward."""
    indent = " " * 16
    check_source(f"""
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("scale", torch.tensor(0.5))

            def forward(self, q, k, v):
                {before and before + indent}s = (q @ k.transpose(-2, -1)) * self.scale
                p = torch.softmax(s, dim=-1)
                {after and after + indent}return (p @ v,)
    """, QKV)


def test_short_conv_sees_a_write_into_x_after_the_conv():
    """conv1d(x, w, padding=K-1, groups=C); x.mul_(2); [..., :L]: the fused short convolution is
    anchored at the cut and reads x after the write."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x, w):
                y = F.conv1d(x, w, padding=2, groups=3)
                x.mul_(2.0)
                return (F.silu(y[..., :5]),)
    """, [(1, 3, 5), (3, 1, 3)])


def test_sparse_mlp_sees_a_write_into_w1_after_the_gather():
    """w1[idx] is a copy in eager; the fused sparse MLP reads w1 itself at the down projection,
    after w1 was written."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x, w1, b1, w2):
                idx = torch.tensor([0, 2, 5])
                w1s = w1[idx]
                w1.mul_(3.0)
                h = F.relu(F.linear(x, w1s, b1[idx]))
                return (F.linear(h, w2[:, idx]),)
    """, [(2, 4), (6, 4), (6,), (4, 6)])


def test_sparse_mlp_sees_a_write_into_idx_after_the_gather():
    """idx written after w1[idx] was gathered: the fused op gathers every weight with the new idx."""
    check_source("""
        class Model(torch.nn.Module):
            def forward(self, x, w1, b1, w2):
                idx = torch.tensor([0, 2, 5])
                w1s = w1[idx]
                idx[0] = 1
                h = F.relu(F.linear(x, w1s, b1[idx]))
                return (F.linear(h, w2[:, idx]),)
    """, [(2, 4), (6, 4), (6,), (4, 6)])
