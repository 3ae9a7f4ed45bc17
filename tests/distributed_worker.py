"""Worker processes for tests/test_distributed.py (gloo on the CPU, a file rendezvous)."""

import os
import sys

import torch
import torch.distributed as dist
from helpers.models import tiny_bert

import lily_ext

STEPS, LR = 3, 0.5


def global_batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 97, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def make_model(routing, num_A=None):
    """``num_A``: Lily v2 (a routed A bank, A routing = ``routing``; stride_A 1)."""
    torch.manual_seed(5)
    return lily_ext.get_lily_model(
        tiny_bert(),
        lily_ext.LilyConfig(
            r=4,
            num_B=3,
            stride_A=2 if num_A is None else 1,
            target_modules=["query", "value"],
            routing=routing,
            init_weights=False,
            num_A=num_A,
        ),
    )


def train(model, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trained_params(model):
    return {
        n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def single_process(routing, num_A=None):
    model = make_model(routing, num_A)
    train(model, global_batch())
    return trained_params(model)


def worker(rank, world, rendezvous, routing, wrapper, out, num_A=None):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = make_model(routing, num_A)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:  # FSDP2 over the whole model: one unit holds every shared A and B (see README)
            from torch.distributed.fsdp import fully_shard

            wrapped = fully_shard(model)
        batch = {k: v[rank * 2 : (rank + 1) * 2] for k, v in global_batch().items()}
        train(wrapped, batch)
        params = trained_params(model)
        torch.save(params, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown. fully_shard's DTensor sharding propagation runs under
    # FakeTensorMode, whose fake CUDA device guard makes the first backward start the autograd
    # engine's per-device threads; when the interpreter finalizes while one of them still waits for
    # the GIL to set itself up, its std::thread is destroyed joinable and std::terminate aborts the
    # rank ("terminate called without an active exception", about one run in four). The results are
    # on disk and the process group is down, so nothing is left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
