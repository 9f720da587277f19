"""Bytes the long and short convolutions save for backward, ours against eager; runs on the CPU.

    PYTHONPATH=. python -m benchmarks.training_memory_conv        # prints a Markdown table

Each row runs one forward with grad enabled and counts the distinct storages autograd saves
(saved_tensors_hooks), for compiler.compile of the module and for eager, also per element of the
convolution's input u (B * H * L), which does not depend on the sizes:

    long    H3's fftconv (D skip): eager saves u's and k's spectra (L + 1 complex bins each, per row
            and per channel) besides u; ours saves its operands u, k and D, and no spectrum
    gated   the same with Hyena's gates, post * fftconv(x * pre, k, D): eager adds the gates' products
    short   Mamba's silu(conv1d(x)): eager saves x and the pre-activation; ours x, the weight and bias
"""
from __future__ import annotations

import torch

import compiler
from benchmarks.common import saved_bytes
from benchmarks.long_conv import FFTConv, ShortConv
from models.h3 import fftconv_ref

CONFIGS = [
    dict(op="long", batch=2, channels=64, seqlen=1024),
    dict(op="gated", batch=2, channels=64, seqlen=1024),
    dict(op="short", batch=2, channels=192, seqlen=1024),
]


class GatedFFTConv(FFTConv):
    """Hyena's order-2 core: post * (fftconv(x * pre, k) + (x * pre) * D)."""

    def forward(self, x, pre, post):
        return post * fftconv_ref(x * pre, self.k.float(), self.D)


MODULES = {"long": FFTConv, "gated": GatedFFTConv, "short": lambda channels, seqlen: ShortConv(channels)}
OPERANDS = {"long": 1, "gated": 3, "short": 1}  # activations the module takes, each (B, H, L)



def measure(config: dict) -> dict:
    """Saved bytes, ours and eager's, for one config (fp32 on the CPU)."""
    shape = (config["batch"], config["channels"], config["seqlen"])
    torch.manual_seed(0)
    module = MODULES[config["op"]](*shape[1:])
    inputs = [torch.randn(shape, requires_grad=True) for _ in range(OPERANDS[config["op"]])]
    compiled = compiler.compile(module, strict=True)
    ours, eager = saved_bytes(lambda: compiled(*inputs)), saved_bytes(lambda: module(*inputs))
    elements = inputs[0].numel()
    return {**config, "patterns": compiled.patterns, "ours_bytes": ours, "eager_bytes": eager,
            "ours_per_element": ours / elements, "eager_per_element": eager / elements}


def markdown(rows: list[dict]) -> str:
    lines = ["| op | B x H x L | ours MiB | eager MiB | ours B/elem | eager B/elem | eager / ours |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['op']} | {row['batch']} x {row['channels']} x {row['seqlen']} "
                     f"| {row['ours_bytes'] / 2**20:.2f} | {row['eager_bytes'] / 2**20:.2f} "
                     f"| {row['ours_per_element']:.1f} | {row['eager_per_element']:.1f} "
                     f"| {row['eager_bytes'] / row['ours_bytes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown([measure(config) for config in CONFIGS]))
