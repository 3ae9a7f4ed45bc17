"""The Lily model API: PEFT-exact semantics, routing modes, adapters management."""

import copy

import peft
import pytest
import torch
from helpers.models import tiny_bert, tiny_llama, token_batch
from torch import nn

import lily_ext
from lily_ext import LilyConfig, get_lily_model
from lily_ext.layer import LilyLinear


def peft_and_ours(base, **config):
    """A PEFT Lily model and lily_ext.from_peft of it, on identical copies of ``base``."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(init_weights=False, **config))
    return peft_model, lily_ext.from_peft(peft_model)


def adapter_grads_match(peft_model, ours):
    tuner = peft_model.base_model
    checked = 0
    for path, layer in ours.lily_layers():
        theirs = tuner.model.get_submodule(path)
        for part in ("lily_A", "lily_B", "lily_router"):
            mine = getattr(layer, part)["default"].weight
            other = getattr(theirs, part)["default"].weight
            torch.testing.assert_close(mine.grad, other.grad, msg=f"{path}.{part}")
            checked += 1
    assert checked > 0


# ---- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, pattern",
    [
        ({"r": 0}, r"LilyConfig.r: expected an integer >= 1"),
        ({"r": -3}, r"LilyConfig.r"),
        ({"stride_A": 0}, r"LilyConfig.stride_A: expected an integer >= 1"),
        ({"num_B": 1}, r"LilyConfig.num_B: the router mixes B experts and needs num_B >= 2"),
        ({"routing": "tokens"}, r"LilyConfig.routing: expected one of"),
        ({"scaling": float("inf")}, r"LilyConfig.scaling"),
        ({"target_modules": []}, r"LilyConfig.target_modules: the list is empty"),
        ({"target_modules": [1, 2]}, r"LilyConfig.target_modules: expected a list of str"),
        ({"layers_to_transform": "0"}, r"LilyConfig.layers_to_transform"),
    ],
)
def test_config_validation(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        LilyConfig(**fields)


def test_target_list_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules: \['nope_proj'\] matches no module of this LlamaForCausalLM"):
        get_lily_model(tiny_llama(), LilyConfig(target_modules=["nope_proj"]))


def test_non_linear_target_is_named():
    with pytest.raises(ValueError, match=r"target module 'model.embed_tokens' is a torch.nn.modules.sparse.Embedding"):
        get_lily_model(tiny_llama(), LilyConfig(target_modules=["embed_tokens"]))


def test_wrapping_twice_is_an_error():
    model = get_lily_model(tiny_llama(), LilyConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a LilyModel"):
        get_lily_model(model, LilyConfig(r=4, target_modules=["q_proj"]))


# ---- structure: sharing, freezing --------------------------------------------------------------


def test_sharing_follows_stride_and_target():
    model = get_lily_model(
        tiny_llama(layers=5), LilyConfig(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj"])
    )
    q = [model.model.model.layers[i].self_attn.q_proj for i in range(5)]
    v = [model.model.model.layers[i].self_attn.v_proj for i in range(5)]
    assert all(isinstance(m, LilyLinear) for m in q + v)
    A = lambda m: m.lily_A["default"]  # noqa: E731
    B = lambda m: m.lily_B["default"]  # noqa: E731
    assert A(q[0]) is A(q[1]) and A(q[2]) is A(q[3]) and A(q[0]) is not A(q[2]) and A(q[4]) is not A(q[2])
    assert all(B(m) is B(q[0]) for m in q) and all(B(m) is B(v[0]) for m in v) and B(q[0]) is not B(v[0])
    assert A(q[0]) is not A(v[0])
    assert len({id(m.lily_router["default"]) for m in q + v}) == 10
    assert B(q[0]).weight.shape == (3 * 4, 64) and A(q[0]).weight.shape == (4, 64)


def test_base_frozen_adapters_and_modules_to_save_trainable():
    model = get_lily_model(
        tiny_bert(), LilyConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lily_" in n or ".modules_to_save." in n for n in trainable)
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    assert not model.model.classifier.original_module.weight.requires_grad
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


def test_print_trainable_parameters(capsys):
    get_lily_model(tiny_llama(), LilyConfig(r=4, target_modules=["q_proj"])).print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out


# ---- parity with PEFT ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"r": 8, "stride_A": 1, "num_B": 2, "target_modules": ["q_proj", "v_proj"]},
        {"r": 4, "stride_A": 2, "num_B": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"r": 6, "stride_A": 3, "num_B": 4, "target_modules": ["k_proj", "o_proj", "gate_proj"], "scaling": 0.5},
        {"r": 4, "stride_A": 2, "num_B": 2, "target_modules": r".*\.(q|v)_proj"},  # regex: one group per shape
        {"r": 4, "num_B": 2, "target_modules": ["q_proj"], "layers_to_transform": [1, 2]},
    ],
    ids=["qv", "stride2", "stride3-scaled", "regex", "layers"],
)
def test_llama_matches_peft(config):
    peft_model, ours = peft_and_ours(tiny_llama(), **config)
    ids = token_batch()
    theirs = peft_model(input_ids=ids).logits
    mine = ours(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs)
    theirs.square().mean().backward()
    mine.square().mean().backward()
    adapter_grads_match(peft_model, ours)


@pytest.mark.parametrize("stride_A, num_B", [(1, 2), (2, 3)])
def test_bert_matches_peft_with_classifier(stride_A, num_B):
    base = tiny_bert()
    peft_model, ours = peft_and_ours(
        base,
        r=4,
        stride_A=stride_A,
        num_B=num_B,
        target_modules=["query", "value", "dense"],
        modules_to_save=["classifier"],
    )
    ids, mask = token_batch(), torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    mine = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(mine, theirs)
    theirs.sum().backward()
    mine.sum().backward()
    adapter_grads_match(peft_model, ours)
    torch.testing.assert_close(
        ours.model.classifier.modules_to_save["default"].weight.grad,
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.grad,
    )


def test_from_peft_leaves_peft_model_untouched():
    peft_model, ours = peft_and_ours(tiny_llama(), r=4, target_modules=["q_proj"])
    ids = token_batch()
    before = peft_model(input_ids=ids).logits.detach()
    with torch.no_grad():
        for _, layer in ours.lily_layers():
            layer.lily_B["default"].weight.add_(1.0)
    torch.testing.assert_close(peft_model(input_ids=ids).logits, before)


# ---- routing modes on a real model ---------------------------------------------------------------


def padded_batch(samples, pad_left, vocab_pad=0):
    L = max(len(s) for s in samples)
    ids = torch.full((len(samples), L), vocab_pad, dtype=torch.long)
    mask = torch.zeros(len(samples), L, dtype=torch.long)
    for b, s in enumerate(samples):
        rows = slice(L - len(s), L) if pad_left else slice(0, len(s))
        ids[b, rows] = s
        mask[b, rows] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


@pytest.mark.parametrize("pad_left", [True, False], ids=["left-padding", "right-padding"])
def test_sequence_routing_is_batch_invariant_on_llama(pad_left):
    model = get_lily_model(
        tiny_llama(),
        LilyConfig(r=8, num_B=4, target_modules=["q_proj", "v_proj"], routing="sequence", init_weights=False),
    )
    with torch.no_grad():
        for _, layer in model.lily_layers():
            nn.init.normal_(layer.lily_B["default"].weight, std=0.5)
    g = torch.Generator().manual_seed(3)
    samples = [torch.randint(1, 97, (n,), generator=g) for n in (5, 9, 3, 7)]
    ids, mask, positions = padded_batch(samples, pad_left)
    together = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for b, s in enumerate(samples):
        alone = model(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits[0]
        torch.testing.assert_close(together[b][mask[b].bool()], alone, rtol=1e-4, atol=1e-5)


def test_batch_routing_is_not_batch_invariant():
    # what PEFT does, kept for parity: the reason sequence routing exists
    model = get_lily_model(
        tiny_llama(), LilyConfig(r=8, num_B=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    )
    ids = token_batch(batch=4)
    alone = model(input_ids=ids[:1]).logits
    together = model(input_ids=ids).logits[:1]
    assert (alone - together).abs().max() > 1e-3


@pytest.mark.parametrize("routing", ["token", "static", "sequence"])
def test_routing_modes_train_and_differ_from_base(routing):
    base = tiny_bert()
    ids = token_batch()
    with torch.no_grad():
        reference = base(input_ids=ids).logits.clone()
    model = get_lily_model(
        base, LilyConfig(r=4, num_B=3, target_modules=["query", "value"], routing=routing, init_weights=False)
    )
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(out, reference)
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference)


def test_sequence_mask_of_the_wrong_shape_is_explained():
    model = get_lily_model(tiny_bert(), LilyConfig(r=4, target_modules=["query"], routing="sequence"))
    layer = model.lily_layers()[0][1]
    model._context.mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"sequence routing: the attention_mask has shape \[2, 5\]"):
        layer(torch.randn(3, 7, 48))


# ---- adapters management -------------------------------------------------------------------------


def test_disable_adapter_and_unload_give_the_base_model():
    base = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        reference = base(input_ids=ids).logits.clone()
    model = get_lily_model(base, LilyConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    assert not torch.allclose(model(input_ids=ids).logits, reference)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference)
    assert not torch.allclose(model(input_ids=ids).logits, reference)
    unloaded = model.unload()
    assert unloaded is base
    assert not any(isinstance(m, LilyLinear) for m in unloaded.modules())
    torch.testing.assert_close(unloaded(input_ids=ids).logits, reference)


def test_multiple_adapters():
    base = tiny_llama()
    ids = token_batch()
    model = get_lily_model(base, LilyConfig(r=4, target_modules=["q_proj"], init_weights=False))
    first = model(input_ids=ids).logits.detach()
    model.add_adapter(
        "other", LilyConfig(r=6, num_B=3, target_modules=["v_proj", "q_proj"], routing="token", init_weights=False)
    )
    torch.testing.assert_close(model(input_ids=ids).logits, first)  # adding does not activate
    model.set_adapter("other")
    second = model(input_ids=ids).logits.detach()
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(model(input_ids=ids).logits, first)
    model.delete_adapter("default")
    assert model.active_adapter == "other"
    torch.testing.assert_close(model(input_ids=ids).logits, second)
    with pytest.raises(ValueError, match="adapter_name: no adapter 'default'"):
        model.set_adapter("default")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", LilyConfig(r=4, target_modules=["q_proj"]))


# ---- the PEFT bridge -------------------------------------------------------------------------------


def test_patch_peft_runs_peft_layers_on_lily_ops(monkeypatch):
    from lily_ext import peft_interop

    base = tiny_llama()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj"], init_weights=False),
    )
    ids = token_batch()
    reference = peft_model(input_ids=ids).logits
    reference.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    calls = []
    real = peft_interop.routed_mix
    monkeypatch.setattr(peft_interop, "routed_mix", lambda *a, **k: calls.append(1) or real(*a, **k))
    lily_ext.patch_peft()
    try:
        patched = peft_model(input_ids=ids).logits
        assert len(calls) == 8
        torch.testing.assert_close(patched, reference)
        patched.sum().backward()
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref_grads[n], msg=n)
    finally:
        lily_ext.unpatch_peft()
    calls.clear()
    peft_model(input_ids=ids)
    assert not calls
