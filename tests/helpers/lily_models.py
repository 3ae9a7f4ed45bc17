"""Lily-wrapped models and their inputs, shared by the export and serving tests."""

import warnings

import torch
from torch import nn

from lily_ext import LilyConfig, NonCausalRoutingWarning, get_lily_model

from .models import tiny_bert, tiny_llama, tiny_qwen2, token_batch

# dynamic_shapes of a BERT export
DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)


class TinyNet(nn.Module):
    """A plain module with q/v projections: traceable by every exporter."""

    def __init__(self, width=16, depth=3, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x, attention_mask=None):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def lily_net(routing="static", **config):
    """TinyNet with Lily on q_proj / v_proj (6 layers), every trainable tensor nudged off its init."""
    model = get_lily_model(
        TinyNet(),
        LilyConfig(r=4, num_B=3, target_modules=["q_proj", "v_proj"], routing=routing, init_weights=False, **config),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def bert_model(routing):
    """tiny_bert with Lily on query / value (6 layers) and random B banks, in eval mode."""
    model = get_lily_model(
        tiny_bert(), LilyConfig(r=4, num_B=3, target_modules=["query", "value"], routing=routing, init_weights=False)
    )
    with torch.no_grad():
        for _, layer in model.lily_layers():
            layer.lily_B["default"].weight.normal_(std=0.2)
    return model.eval()


def example_and_other_inputs():
    """(export example, other inputs of another batch size and length with padding) for bert_model."""
    ids = token_batch(2, 7)
    other = token_batch(3, 11, seed=4)
    other_mask = torch.ones_like(other)
    other_mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {
        "input_ids": other,
        "attention_mask": other_mask,
    }


DECODERS = {"llama": lambda: tiny_llama(layers=2, hidden=32), "qwen2": lambda: tiny_qwen2(layers=2, hidden=32)}


def lily_lm(arch="llama", routing="causal", seed=0, **config):
    """A tiny decoder with Lily on q_proj / v_proj, adapters away from their init, eval mode, no eos
    (fixed lengths): the causal-LM generation and decoder-export tests (``config``: more LilyConfig
    fields, e.g. ``num_A``)."""
    base = DECODERS[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        model = get_lily_model(
            base,
            LilyConfig(
                r=4, num_B=3, target_modules=["q_proj", "v_proj"], routing=routing, init_weights=False, **config
            ),
        )
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # routers away from uniform, so routing matters
                p.add_(torch.randn_like(p) * 0.5)
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    return model.eval()


def left_padded(lengths, seed):
    """Prompts of the given lengths (tokens 1..96), left-padded with 0: (ids, mask) [batch, max length]."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = token_batch(1, n, vocab=96, seed=seed + i)[0] + 1
        mask[i, width - n :] = 1
    return ids, mask
