"""Bytes one GPT-2-style layer saves for its backward, at L 1k..16k: eager, torch.compile, flashfx.

    PYTHONPATH=. python benchmarks/training_memory.py            # the table (Markdown), on a CPU in ~1 min
    PYTHONPATH=. python benchmarks/training_memory.py --device cuda   # adds each one's peak memory

The layer is models.gpt's Block at GPT-2 small's sizes (12 heads of 64, width 768, a 3072 GELU MLP,
pre-norm, no dropout), batch 1, bf16. Saved bytes are those of the distinct storages autograd keeps
for the backward, less the layer's parameters and buffers (which exist anyway):

    eager naive       nanoGPT's spelled-out attention in PyTorch: the L x L scores, mask and
                      weights are saved. Measured with torch.autograd.graph.saved_tensors_hooks
                      on meta tensors (shapes only, nothing is computed), so any L fits a CPU.
    flashfx           compiler.compile(layer) with F.scaled_dot_product_attention(is_causal=True),
                      the same fused op as the naive spelling gets on a real tensor (a meta
                      tensor's causal mask cannot be read at compile time): q, k, v, O and the
                      row log-sum-exp. Measured the same way, on meta tensors.
    torch.compile     the activations Inductor's partitioner (min-cut rematerialisation) keeps
                      in the forward graph, for the naive and the SDPA spelling: the graph is
                      traced once at L 256 with the length dynamic, each saved tensor's size is
                      a formula in L (views counted once, by their base), evaluated at each L.
                      On the CPU, SDPA lowers to the CPU flash kernel, which saves its
                      log-sum-exp as flash/cuDNN do on CUDA; whether Inductor's attention
                      rewrite turns the naive spelling into SDPA differs by device.

--device cuda also runs one forward and backward of each on the GPU at each L and gives the peak
memory allocated (GiB), parameters included.
"""
from __future__ import annotations

import argparse
import copy
import math

import sympy
import torch

import compiler
from benchmarks import common
from models import gpt

LENGTHS = (1024, 2048, 4096, 8192, 16384)
TRACED_LENGTH = 256
DTYPE = torch.bfloat16
VIEWS = {"view", "_unsafe_view", "permute", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
         "alias", "as_strided", "reshape", "split", "split_with_sizes", "getitem", "unbind"}


def layer(attention: str, max_length: int, device="meta") -> torch.nn.Module:
    config = gpt.GPTConfig.gpt2_small(attention=attention, block_size=max_length)
    return gpt.Block(config).to(device, DTYPE).train()


def saved_bytes(module: torch.nn.Module, run, length: int) -> int:
    """Bytes of the distinct storages autograd saves while run(x) builds the graph, less module state."""
    x = torch.empty(1, length, module.ln_1.normalized_shape[0], device="meta", dtype=DTYPE, requires_grad=True)
    return common.saved_bytes(lambda: run(x), exclude=(*module.parameters(), *module.buffers()))


def eager_bytes(length: int) -> int:
    block = layer("naive", length)
    return saved_bytes(block, block, length)


def flashfx_bytes(length: int) -> int:
    block = layer("sdpa", length)
    compiled = compiler.compile(block)
    saved = saved_bytes(block, compiled, length)
    if compiled.patterns != ["attention"]:
        raise RuntimeError(f"the attention pass did not fire:\n{compiled.report()}")
    return saved


# -- torch.compile: the partitioner's saved activations as a formula in L -------------------------------
def inductor_formula(attention: str) -> sympy.Expr:
    """Bytes the forward graph Inductor would compile saves for the backward, a sympy expression in L."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def record(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    block = layer(attention, 4 * TRACED_LENGTH, device="cpu")  # the mask buffer outgrows the traced length
    x = torch.randn(1, TRACED_LENGTH, 768, dtype=DTYPE, requires_grad=True)
    torch._dynamo.maybe_mark_dynamic(x, 1)
    compiled = torch.compile(block, backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=record))
    compiled(x)
    torch._dynamo.reset()
    return _saved_formula(graphs[0])


def _saved_formula(forward: torch.fx.GraphModule) -> sympy.Expr:
    """The bytes of the distinct bases of the forward graph's saved outputs whose size depends on L."""
    output = next(node for node in forward.graph.nodes if node.op == "output")
    bases = {}
    for node in output.args[0]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(value, torch.Tensor):
            base = _base(node)
            bases[base.name] = _bytes(base.meta["val"])
    return sum((size for size in bases.values() if size.free_symbols), sympy.Integer(0))


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage `node` views (itself if it is no view); getitem is a view only of a split."""
    while _name(node) in VIEWS and not (_name(node) == "getitem" and _name(node.args[0]) not in VIEWS):
        node = node.args[0]
    return node


def _name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", "").split(".")[0] if node.op == "call_function" else ""


def _bytes(value: torch.Tensor) -> sympy.Expr:
    sizes = [sympy.sympify(size.node.expr if isinstance(size, torch.SymInt) else size) for size in value.shape]
    return math.prod(sizes, start=sympy.Integer(1)) * value.element_size()


def at_length(formula: sympy.Expr, length: int) -> int:
    return int(formula.subs({symbol: length for symbol in formula.free_symbols}))


# -- peak memory on the GPU ------------------------------------------------------------------------------
def peak_gib(make_run, length: int) -> float | None:
    """Peak GiB allocated by one forward and backward of make_run() on a (1, L, 768) input; None on failure."""
    try:
        torch.cuda.empty_cache()
        run = make_run()
        x = torch.randn(1, length, 768, device="cuda", dtype=DTYPE, requires_grad=True)
        run(x).float().sum().backward()  # compile, warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run(x).float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    except Exception:
        return None
    finally:
        torch._dynamo.reset()


def gpu_runs(length: int) -> dict:
    return {
        "eager naive": lambda: layer("naive", length, "cuda"),
        "torch.compile naive": lambda: torch.compile(layer("naive", length, "cuda")),
        "torch.compile sdpa": lambda: torch.compile(layer("sdpa", length, "cuda")),
        "flashfx": lambda: compiler.compile(layer("naive", length, "cuda")),
    }


# -- the table -------------------------------------------------------------------------------------------
def table(device: str) -> str:
    formulas = {name: inductor_formula(attention) for name, attention in
                (("torch.compile naive", "naive"), ("torch.compile sdpa", "sdpa"))}
    columns = ["eager naive", *formulas, "flashfx", "flashfx / eager"]
    header = ["L", *[f"{name} MiB" if "/" not in name else name for name in columns]]
    if device == "cuda":
        header += [f"peak GiB {name}" for name in gpu_runs(0)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length in LENGTHS:
        eager, ours = eager_bytes(length), flashfx_bytes(length)
        cells = [f"{eager / 2**20:.0f}", *[f"{at_length(f, length) / 2**20:.0f}" for f in formulas.values()],
                 f"{ours / 2**20:.0f}", f"{ours / eager:.3f}"]
        if device == "cuda":
            cells += [_fmt_gib(peak_gib(make, length)) for make in gpu_runs(length).values()]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_gib(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    options = parser.parse_args()
    print("Saved for backward by one GPT-2-small layer (batch 1, bf16), module state excluded\n")
    print(table(options.device))


if __name__ == "__main__":
    main()
