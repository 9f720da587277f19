"""Contextual-sparsity MLPs (DejaVu) and an OPT-6.7B-like decoder layer, ours against the peers.

    mlp     d {4096, 8192, 12288}, ffn 4d, batch {1, 4, 16, 64}, density {5, 10, 25}% of the ffn
            neurons (k random, sorted), bf16, ReLU, biases, as models.dejavu.gathered_mlp writes it:
            y = relu(x W1[idx]^T + b1[idx]) W2[:, idx]^T + b2
    gated   ReLU-fied Llama-2-7B's MLP (PowerInfer's ReluLLaMA): d 4096, ffn 11008, no biases, batch
            {1, 4, 16, 64}, density {5, 10, 25}%, bf16, gathered as DejaVu-for-Llama code writes it:
            y = (relu(x Wg[idx]^T) * (x Wu[idx]^T)) Wd[:, idx]^T
    layer   models.dejavu.DejaVuBlock at DejaVuConfig.opt_6_7b() (d 4096, ffn 16384, 10% density),
            one decode step (one token per sequence, batch 1 and 16), bf16, the predictor and its
            top-k selection included

    ours            compiler.compile of the module (the user's path). In the mlp rows idx arrives
                    as an input, so the op range-checks it on each call (a device sync); in the
                    layer it comes from top-k and is proven in range
    dense           F.linear over all ffn neurons for every projection (cuBLAS)
    index_select    W1.index_select(0, idx) and W2.index_select(1, idx) (gated: Wg, Wu, Wd), then the
                    same F.linear calls
    dense-eager, dense-compile, sparse-eager
                    the layer with its MLP dense (form "dense") in PyTorch and under torch.compile
                    (Inductor, default), and the sparse layer (gathered form) in PyTorch

Rate (mlp rows): the bytes a fused kernel must move at least, per second; every column divides
the same bytes, so a peer's rate is an effective one (dense reads 1/density times as many):
    bytes = 2 * (k·d W1 rows + d·k W2 columns + k + d biases + batch·d for x + batch·d for y)
    gated:  2 * (k·d Wg rows + k·d Wu rows + d·k Wd columns + batch·d for x + batch·d for y)
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

    def dense(self, x, idx):
        return F.linear(F.relu(self.fc1(x)), self.fc2.weight, self.fc2.bias)

    def index_select(self, x, idx):
        w1 = self.fc1.weight.index_select(0, idx)
        w2 = self.fc2.weight.index_select(1, idx)
        return F.linear(F.relu(F.linear(x, w1, self.fc1.bias.index_select(0, idx))), w2, self.fc2.bias)


class GatedMLP(nn.Module):
    """ReLU-fied Llama's MLP with the neurons given, gathered as DejaVu-for-Llama code writes it:
    down_proj.weight[:, idx] applied to relu(x gate_proj.weight[idx]^T) * (x up_proj.weight[idx]^T)."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x, idx):
        h = F.relu(F.linear(x, self.gate_proj.weight[idx])) * F.linear(x, self.up_proj.weight[idx])
        return F.linear(h, self.down_proj.weight[:, idx])

    def dense(self, x, idx):
        return self.down_proj(F.relu(self.gate_proj(x)) * self.up_proj(x))

    def index_select(self, x, idx):
        gate, up = (proj.weight.index_select(0, idx) for proj in (self.gate_proj, self.up_proj))
        return F.linear(F.relu(F.linear(x, gate)) * F.linear(x, up), self.down_proj.weight.index_select(1, idx))


MLPS = {"mlp": GatheredMLP, "gated": GatedMLP}


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """MLP rows grouped by width (one set of weights each), the gated rows, then the layer rows.
    headline (benchmarks/gpu_check.py): the anchors' d 4096 rows at 10%, batch 1 and 16, and the
    gated batch-1 row (quick: d 64, batch 1 and 4, gated batch 1)."""
    if quick:
        mlps = [dict(op="mlp", d=64, ffn=256, batch=batch, density=density)
                for batch in (1, 4) for density in (0.1, 0.25)]
        gated = [dict(op="gated", d=64, ffn=176, batch=batch, density=0.1) for batch in (1, 4)]
        layers = [dict(op="layer", model="dejavu-tiny", batch=1)]
    else:
        mlps = [dict(op="mlp", d=d, ffn=4 * d, batch=batch, density=density)
                for d in (4096, 8192, 12288) for batch in (1, 4, 16, 64) for density in (0.05, 0.1, 0.25)]
        gated = [dict(op="gated", d=4096, ffn=11008, batch=batch, density=density)
                 for batch in (1, 4, 16, 64) for density in (0.05, 0.1, 0.25)]
        layers = [dict(op="layer", model="opt-6.7b", batch=batch) for batch in (1, 16)]
    if headline:
        batches = (1, 4) if quick else (1, 16)
        return [mlp for mlp in mlps if mlp["d"] == mlps[0]["d"] and mlp["batch"] in batches and mlp["density"] == 0.1] \
            + [row for row in gated if row["batch"] == 1 and row["density"] == 0.1]
    return mlps + gated + layers


@functools.lru_cache(maxsize=1)
def _weights(op: str, d: int, ffn: int, device, dtype) -> nn.Module:
    """One MLP per kind and width, kept while its rows run (d 12288: 2.4 GB of weights)."""
    torch.manual_seed(0)
    with torch.device(device):
        return MLPS[op](d, ffn).to(dtype).eval()


def bytes_moved(config: dict, k: int, itemsize: int) -> int:
    d, batch = config["d"], config["batch"]
    if config["op"] == "gated":
        return itemsize * (3 * k * d + 2 * batch * d)
    return itemsize * (2 * k * d + k + d + 2 * batch * d)


def measure_mlp(config: dict, device, dtype) -> Row:
    mlp = _weights(config["op"], config["d"], config["ffn"], device, dtype)
    k = max(1, round(config["density"] * config["ffn"]))
    idx = torch.randperm(config["ffn"], device=device)[:k].sort().values
    x = torch.randn(config["batch"], config["d"], device=device, dtype=dtype)
    compiled = compiler.compile(mlp)
    with torch.no_grad():
        ours = bench_ms(lambda: compiled(x, idx))
        peers = {name: bench_ms(lambda fn=fn: fn(x, idx)) for name, fn in (("dense", mlp.dense),
                                                                         ("index_select", mlp.index_select))}
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
    measure = {"mlp": measure_mlp, "gated": measure_mlp, "layer": measure_layer}
    rows = run_configs("sparse_mlp", grid(quick, headline),
                       lambda config: measure[config["op"]](config, device, dtype))
    _weights.cache_clear()
    return rows
