"""An ONNX Runtime session with the lily custom-op library serving from many threads at once."""

import concurrent.futures

import numpy as np
import pytest
import torch
from helpers.lily_models import DYNAMIC, bert_model
from helpers.models import token_batch

import lily_ext
from lily_ext.export import export_onnx

pytestmark = pytest.mark.ort


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_eight_threads_two_hundred_runs_each(tmp_path):
    model = bert_model("sequence")
    example = {"input_ids": token_batch(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    session = lily_ext.ort_session(str(tmp_path / "m.onnx"))
    requests = []
    for i in range(16):  # different batch sizes, lengths and padding
        ids = token_batch(1 + i % 4, 5 + i % 9, seed=i)
        mask = np.ones(ids.shape, np.int64)
        mask[0, -(i % 3) :] = 0 if i % 3 else 1
        requests.append({"input_ids": ids.numpy(), "attention_mask": mask})
    expected = [session.run(None, r)[0] for r in requests]

    def worker(thread):
        mismatches = 0
        for run in range(200):
            i = (thread * 7 + run) % len(requests)
            mismatches += not np.array_equal(session.run(None, requests[i])[0], expected[i])
        return mismatches

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # warm-up round
        assert sum(pool.map(worker, range(8))) == 0
    before = rss_bytes()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 0
    growth = rss_bytes() - before
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1600 runs"
