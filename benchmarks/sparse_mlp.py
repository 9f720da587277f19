"""Contextual-sparsity MLPs (DejaVu) and an OPT-6.7B-like decoder layer, ours against the peers.

    mlp     d {4096, 8192, 12288}, ffn 4d, batch {1, 4, 16, 64}, density {5, 10, 25}% of the ffn
            neurons (k random, sorted), bf16, ReLU, biases, as models.dejavu.gathered_mlp writes it:
            y = relu(x W1[idx]^T + b1[idx]) W2[:, idx]^T + b2
    layer   models.dejavu.DejaVuBlock at DejaVuConfig.opt_6_7b() (d 4096, ffn 16384, 10% density),
            one decode step (one token per sequence, batch 1 and 16), bf16, the predictor and its
            top-k selection included

    ours            compiler.compile of the module (the user's path). In the mlp rows idx arrives
                    as an input, so the op range-checks it on each call (a device sync); in the
                    layer it comes from top-k and is proven in range
    dense           F.linear over all ffn neurons for both layers (cuBLAS)
    index_select    W1.index_select(0, idx) and W2.index_select(1, idx), then the same F.linear calls
    dense-eager, dense-compile, sparse-eager
                    the layer with its MLP dense (form "dense") in PyTorch and under torch.compile
                    (Inductor, default), and the sparse layer (gathered form) in PyTorch

Rate (mlp rows): the bytes a fused kernel must move at least, per second; every column divides
the same bytes, so a peer's rate is an effective one (dense reads 1/density times as many):
    bytes = 2 * (k·d W1 rows + d·k W2 columns + k + d biases + batch·d for x + batch·d for y)
The layer rows compare times.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import compiler
from benchmarks.common import Row, bench_ms, first_call_s, run_configs
from models.dejavu import DejaVuBlock, DejaVuConfig


class GatheredMLP(nn.Module):
    """DejaVu's gathered form with the neurons given: relu(F.linear(x, W1[idx], b1[idx])) W2[:, idx]^T + b2."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x, idx):
        h = F.relu(F.linear(x, self.fc1.weight[idx], self.fc1.bias[idx]))
        return F.linear(h, self.fc2.weight[:, idx], self.fc2.bias)


def dense_mlp(mlp: GatheredMLP, x, idx):
    return F.linear(F.relu(mlp.fc1(x)), mlp.fc2.weight, mlp.fc2.bias)


def index_select_mlp(mlp: GatheredMLP, x, idx):
    w1 = mlp.fc1.weight.index_select(0, idx)
    w2 = mlp.fc2.weight.index_select(1, idx)
    return F.linear(F.relu(F.linear(x, w1, mlp.fc1.bias.index_select(0, idx))), w2, mlp.fc2.bias)


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """MLP rows grouped by width (one set of weights each), then the layer rows. headline
    (benchmarks/gpu_check.py): the anchors' d 4096 rows at 10%, batch 1 and 16 (quick: d 64, 1 and 4)."""
    if quick:
        mlps = [dict(op="mlp", d=64, ffn=256, batch=batch, density=density)
                for batch in (1, 4) for density in (0.1, 0.25)]
        layers = [dict(op="layer", model="dejavu-tiny", batch=1)]
    else:
        mlps = [dict(op="mlp", d=d, ffn=4 * d, batch=batch, density=density)
                for d in (4096, 8192, 12288) for batch in (1, 4, 16, 64) for density in (0.05, 0.1, 0.25)]
        layers = [dict(op="layer", model="opt-6.7b", batch=batch) for batch in (1, 16)]
    if headline:
        batches = (1, 4) if quick else (1, 16)
        return [mlp for mlp in mlps if mlp["d"] == mlps[0]["d"] and mlp["batch"] in batches and mlp["density"] == 0.1]
    return mlps + layers


@functools.lru_cache(maxsize=1)
def _weights(d: int, ffn: int, device, dtype) -> GatheredMLP:
    """One MLP per width, kept while the rows of that width run (d 12288: 2.4 GB of weights)."""
    torch.manual_seed(0)
    with torch.device(device):
        return GatheredMLP(d, ffn).to(dtype).eval()


def bytes_moved(config: dict, k: int, itemsize: int) -> int:
    d, batch = config["d"], config["batch"]
    return itemsize * (2 * k * d + k + d + 2 * batch * d)


def measure_mlp(config: dict, device, dtype) -> Row:
    mlp = _weights(config["d"], config["ffn"], device, dtype)
    k = max(1, round(config["density"] * config["ffn"]))
    idx = torch.randperm(config["ffn"], device=device)[:k].sort().values
    x = torch.randn(config["batch"], config["d"], device=device, dtype=dtype)
    compiled = compiler.compile(mlp)
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(x, idx))
        peers = {name: bench_ms(lambda fn=fn: fn(mlp, x, idx))
                 for name, fn in (("dense", dense_mlp), ("index_select", index_select_mlp))}
    fired = "sparse_mlp" in [kernel.pattern for kernel in compiled.kernels]
    notes = ("" if fired else "sparse_mlp kernels did not run; ") + "ours range-checks the given idx (a sync)"
    return Row("sparse_mlp", config, ours, peers, work={"bytes": bytes_moved(config, k, x.element_size())},
               notes=notes)


def _layers(config: dict, device, dtype) -> tuple[nn.Module, nn.Module, int]:
    """(sparse layer, the same layer with its MLP dense, width), on device in dtype."""
    sizes = DejaVuConfig.tiny() if config["model"] == "dejavu-tiny" else DejaVuConfig.opt_6_7b()
    torch.manual_seed(0)
    with torch.device(device):
        sparse = DejaVuBlock(sizes).to(dtype).eval()
    dense = copy.deepcopy(sparse)
    dense.mlp.form = "dense"
    return sparse, dense, sizes.d_model


def measure_layer(config: dict, device, dtype) -> Row:
    sparse, dense, width = _layers(config, device, dtype)
    x = torch.randn(config["batch"], 1, width, device=device, dtype=dtype)
    compiled = compiler.compile(sparse)
    peers = {"dense-eager": dense, "sparse-eager": sparse}
    if device.type == "cuda":
        peers["dense-compile"] = torch.compile(dense)
    with torch.no_grad():
        first_s = {"ours": first_call_s(lambda: compiled(x))}
        if "dense-compile" in peers:
            first_s["dense-compile"] = first_call_s(lambda: peers["dense-compile"](x))
        ours = bench_ms(lambda: compiled(x))
        peer_ms = {name: bench_ms(lambda fn=fn: fn(x)) for name, fn in peers.items()}
    firsts = ", ".join(f"{name} {'failed' if s is None else f'{s:.1f} s'}" for name, s in first_s.items())
    fired = "" if "sparse_mlp" in compiled.patterns else "sparse_mlp pass did not fire; "
    return Row("sparse_mlp", config, ours, peer_ms, notes=f"{fired}first calls: {firsts}")


def run(quick: bool, device: torch.device, headline: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measure = {"mlp": measure_mlp, "layer": measure_layer}
    rows = run_configs("sparse_mlp", grid(quick, headline),
                       lambda config: measure[config["op"]](config, device, dtype))
    _weights.cache_clear()
    return rows
