"""Pointwise activations the generated kernels fuse, by name, with their PyTorch references.

Templates render the Triton side from codegen/templates/activation.jinja (`_activation(v)`, in
fp32); REFERENCES is what the kernels are checked against and fall back to.
"""
from __future__ import annotations

import torch.nn.functional as F

REFERENCES = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact, with erf
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
}
