"""ONNX Runtime GenAI (PyPI onnxruntime-genai, installed beside onnxruntime-gpu with --no-deps by the test
command) runs folders written by lily_ext.export_causal_lm and gives transformers' greedy tokens."""

import importlib.util

import numpy as np
import pytest
import torch
from helpers.lily_models import left_padded, lily_lm

import lily_ext

NEW_TOKENS = 4


def slow(*values):
    return pytest.param(*values, marks=pytest.mark.slow)


GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


@pytest.mark.ort
@pytest.mark.skipif(
    not GENAI,
    reason="needs onnxruntime_genai: the README's test command installs it beside onnxruntime-gpu "
    "(pip install --no-deps onnxruntime-genai==0.18.0)",
)
@pytest.mark.parametrize(
    "form,routing", [("merged", "static"), ("custom", "token"), ("decomposed", "static"), slow("custom", "static")]
)
def test_onnxruntime_genai_generates_the_same_tokens(tmp_path, form, routing):
    import onnxruntime_genai as og

    model = lily_lm("llama", routing)
    folder = lily_ext.export_causal_lm(model, tmp_path / "out", form=form)
    model_og = og.Model(str(folder))
    # GenAI 0.18's append_tokens takes no mask and treats left padding as prompt tokens (attention_mask 1,
    # position_ids 0..T-1), so the padded batch (6, 3) is compared with model.generate given an all-ones
    # mask; lily_ext.ort.generate takes the real mask (test above).
    for lengths, seed in [((6,), 21), ((9,), 23), ((6, 6), 25), ((6, 3), 27)]:
        ids, _ = left_padded(lengths, seed)
        with torch.no_grad():
            expected = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
            ).numpy()
        params = og.GeneratorParams(model_og)
        params.set_search_options(max_length=ids.shape[1] + NEW_TOKENS, do_sample=False, batch_size=len(lengths))
        generator = og.Generator(model_og, params)
        generator.append_tokens(ids.numpy().astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        for i in range(len(lengths)):
            np.testing.assert_array_equal(
                np.asarray(generator.get_sequence(i))[-NEW_TOKENS:], expected[i, -NEW_TOKENS:]
            )
