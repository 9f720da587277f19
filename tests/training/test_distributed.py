"""Data-parallel training of a compiled model: DDP and FSDP2 (fully_shard) over two CPU processes (gloo)
agree with one process training on the whole batch.

Each rank compiles the same tiny GPT and trains it on its half of every batch; DDP averages the
gradients (FSDP2 reduce-scatters them) with torch.distributed's own collectives, so after each
AdamW step every rank holds the parameters that one process computes from the whole batch. The
fused attention must run (and train) inside both wrappers.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import compiler
from models import gpt

WORLD = 2
STEPS = 3
BATCH, LENGTH = 4, 32


def _model_and_batches():
    model, _ = gpt.tiny_naive(batch=BATCH, length=LENGTH, seed=0)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (BATCH, LENGTH + 1), generator=generator)
               for _ in range(STEPS)]
    return model.train(), batches


def _train(model, batches, rank: int = 0, world: int = 1) -> list[float]:
    """Losses of STEPS SGD steps, each on this rank's share of the batch (all of it for one process).
    (Not Adam: it divides by the gradient's size, so a gradient that is zero but for rounding, like the
    key bias's, would move by the learning rate in a direction set by rounding noise.)"""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for ids in batches:
        ids = ids.chunk(world)[rank]
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter whole, gathered from FSDP2's shards where it sharded them."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def _worker(rank: int, wrapper: str, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model, batches = _model_and_batches()
        if wrapper == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        compiled = compiler.compile(model)
        losses = _train(compiled, batches, rank, WORLD)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, [loss.item() for loss in losses])
        parameters = _full_parameters(model.module if wrapper == "ddp" else model)
        if rank == 0:
            torch.save((gathered, parameters, compiled.patterns), results)
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_training_matches_one_process(wrapper, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not built into this torch")
    results = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(wrapper, _free_port(), str(results)), nprocs=WORLD, start_method="spawn")
    gathered, parameters, patterns = torch.load(results)

    torch.manual_seed(0)
    model, batches = _model_and_batches()
    expected = _train(model, batches)
    assert "attention" in patterns
    for step, loss in enumerate(expected):  # the mean over ranks' halves is the whole batch's loss
        torch.testing.assert_close(sum(ranks[step] for ranks in gathered) / WORLD, loss.item(),
                                   rtol=1e-4, atol=1e-5)
    reference = _full_parameters(model)
    assert parameters.keys() == reference.keys()
    for name, value in parameters.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)
