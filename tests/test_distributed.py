"""Distributed training on torch.distributed (gloo, 2 CPU processes): DDP and FSDP2.

With per-sample routing (sequence, token, static) a step on 2 ranks x 2 samples equals a step on
the 4 samples in one process: each rank's loss is its mean, DDP averages the gradients, and the
shared A / B Parameters are reduced once (they are one Parameter each). batch routing mixes with
the mean over the call, which differs per rank, so it is only consistent across ranks.
"""

import tempfile

import distributed_worker as w
import pytest
import torch
import torch.multiprocessing as mp


def run(routing, wrapper, tmp_path):
    out = tmp_path / "params"
    rendezvous = tempfile.mktemp(dir=tmp_path)
    mp.spawn(w.worker, args=(2, rendezvous, routing, wrapper, str(out)), nprocs=2)
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


@pytest.mark.parametrize("routing", ["sequence", "token", "static"])
def test_ddp_equals_single_process_on_the_concatenated_batch(routing, tmp_path):
    rank0, rank1 = run(routing, "ddp", tmp_path)
    assert_same(rank0, rank1, rtol=0, atol=0)
    reference = w.single_process(routing)
    assert_same(rank0, reference, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(rank0[n], w.trained_params(w.make_model(routing))[n]) for n in rank0)  # it trained


def test_ddp_batch_routing_is_consistent_across_ranks(tmp_path):
    rank0, rank1 = run("batch", "ddp", tmp_path)
    assert_same(rank0, rank1, rtol=0, atol=0)
    reference = w.single_process("batch")
    assert any(not torch.allclose(rank0[n], reference[n], atol=1e-6) for n in rank0)  # per-rank routing means differ


def test_fsdp2_whole_model_equals_single_process(tmp_path):
    rank0, rank1 = run("token", "fsdp2", tmp_path)
    assert_same(rank0, rank1, rtol=0, atol=0)
    assert_same(rank0, w.single_process("token"), rtol=1e-5, atol=1e-6)
