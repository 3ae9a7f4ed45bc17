"""Adapter checkpoints: compact, atomic, validated; PEFT's format both ways."""

import copy
import hashlib
import json
import os

import peft
import pytest
import safetensors.torch
import torch
from helpers.models import tiny_bert, tiny_llama, token_batch
from torch import nn

import lily_ext
from lily_ext import AdapterLoadError, LilyConfig, get_lily_model, load_adapter
from lily_ext.layer import LilyLinear


def trained_model(base, **config):
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_lily_model(base, LilyConfig(init_weights=False, **config))
    with torch.no_grad():  # make every tensor distinct, so a mix-up on load would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def adapter_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("routing", ["batch", "static"])
def test_round_trip_restores_values_and_sharing(tmp_path, routing):
    base = tiny_llama(layers=6)
    model = trained_model(copy.deepcopy(base), r=8, stride_A=3, num_B=3, routing=routing)
    ids = token_batch()
    expected = model(input_ids=ids).logits
    model.save_adapter(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter.safetensors", "lily_config.json"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    q = [loaded.model.model.layers[i].self_attn.q_proj for i in range(6)]
    assert q[0].lily_A["default"].weight is q[2].lily_A["default"].weight  # one Parameter, as saved
    assert q[0].lily_A["default"].weight is not q[3].lily_A["default"].weight
    assert all(m.lily_B["default"].weight is q[0].lily_B["default"].weight for m in q)
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's default: inference
    trainable = load_adapter(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    assert adapter_bytes(trainable) == adapter_bytes(model)


def test_file_holds_each_shared_tensor_once(tmp_path):
    # the benchmark shape: 8 layers, hidden 512, q/v targets
    base = tiny_llama(layers=8, hidden=512)
    model = get_lily_model(base, LilyConfig(r=32, stride_A=2, num_B=4, target_modules=["q_proj", "v_proj"]))
    model.save_adapter(tmp_path / "ours")
    ours = (tmp_path / "ours" / "adapter.safetensors").stat().st_size / adapter_bytes(model)
    assert ours <= 1.01, ours
    model.save_peft_adapter(tmp_path / "peft")
    theirs = (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size / adapter_bytes(model)
    assert theirs > 2.5 * ours  # PEFT's layout repeats every shared A and B per layer


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    base = tiny_llama()
    first = trained_model(copy.deepcopy(base), r=4)
    first.save_adapter(tmp_path / "adapter")
    before = {p: (tmp_path / "adapter" / p).read_bytes() for p in os.listdir(tmp_path / "adapter")}

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    second = trained_model(copy.deepcopy(base), r=4)
    with pytest.raises(KeyboardInterrupt):
        second.save_adapter(tmp_path / "adapter")
    assert {p: (tmp_path / "adapter" / p).read_bytes() for p in os.listdir(tmp_path / "adapter")} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary left behind
    load_adapter(copy.deepcopy(base), tmp_path / "adapter")


def test_save_replaces_an_existing_adapter(tmp_path):
    base = tiny_llama()
    ids = token_batch()
    trained_model(copy.deepcopy(base), r=4).save_adapter(tmp_path / "adapter")
    second = trained_model(copy.deepcopy(base), r=6)
    second.save_adapter(tmp_path / "adapter")
    torch.testing.assert_close(
        load_adapter(copy.deepcopy(base), tmp_path / "adapter")(input_ids=ids).logits, second(input_ids=ids).logits
    )
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# ---- loading validates before it changes anything ----------------------------------------------


def _saved(tmp_path, **config):
    model = trained_model(tiny_llama(), r=4, **config)
    model.save_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


def _rewrite_config(path, change):
    record = json.loads((path / "lily_config.json").read_text())
    change(record)
    (path / "lily_config.json").write_text(json.dumps(record))


def _rewrite_tensors(path, change):
    tensors = safetensors.torch.load_file(str(path / "adapter.safetensors"))
    change(tensors)
    safetensors.torch.save_file(tensors, str(path / "adapter.safetensors"))
    digest = hashlib.sha256((path / "adapter.safetensors").read_bytes()).hexdigest()
    _rewrite_config(path, lambda r: r.update(weights_sha256=digest))


def _flip_byte(path):
    data = bytearray((path / "adapter.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "adapter.safetensors").write_bytes(bytes(data))


def _truncate(path):
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])


BAD_CHECKPOINTS = [
    (
        "other base model",
        None,
        lambda: tiny_llama(hidden=32),
        r"layer 'model.layers.0.self_attn.q_proj': weight shape \[32, 32\], the adapter expects \[64, 64\]",
    ),
    ("other architecture", None, lambda: tiny_bert(), r"does not fit this base model: LilyConfig.target_modules"),
    ("fewer layers", None, lambda: tiny_llama(layers=3), r"layer 'model.layers.3.self_attn.q_proj'"),
    (
        "newer format",
        lambda p: _rewrite_config(p, lambda r: r.update(format_version=99)),
        None,
        r"format_version 99 was written by a newer lily_ext",
    ),
    ("not json", lambda p: (p / "lily_config.json").write_text("{oops"), None, r"lily_config.json: not valid JSON"),
    (
        "bad config",
        lambda p: _rewrite_config(p, lambda r: r["config"].update(num_B=1)),
        None,
        r"bad config: LilyConfig.num_B",
    ),
    ("corrupted", _flip_byte, None, r"contents do not match the checksum .* \(truncated or corrupted file\)"),
    ("truncated", _truncate, None, r"truncated or corrupted"),
    ("missing file", lambda p: (p / "adapter.safetensors").unlink(), None, r"adapter.safetensors: missing"),
    (
        "missing tensor",
        lambda p: _rewrite_tensors(p, lambda t: t.pop("group.0.B")),
        None,
        r"missing tensor 'group.0.B'",
    ),
    (
        "extra tensor",
        lambda p: _rewrite_tensors(p, lambda t: t.update(extra=torch.zeros(2))),
        None,
        r"unexpected tensor 'extra'",
    ),
    (
        "wrong shape",
        lambda p: _rewrite_tensors(p, lambda t: t.update({"group.0.B": torch.zeros(3, 64)})),
        None,
        r"tensor 'group.0.B' has shape \[3, 64\], expected \[8, 64\]",
    ),
    (
        "wrong dtype",
        lambda p: _rewrite_tensors(p, lambda t: t.update({"group.0.B": t["group.0.B"].double()})),
        None,
        r"tensor 'group.0.B' has dtype torch.float64, expected torch.float32",
    ),
]


@pytest.mark.parametrize("case", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_with_nothing_loaded(tmp_path, case):
    _, damage, make_base, pattern = case
    path = _saved(tmp_path)
    if damage:
        damage(path)
    base = (make_base or tiny_llama)()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=pattern):
        load_adapter(base, path)
    assert not any(isinstance(m, LilyLinear) for m in base.modules())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_loading_a_peft_directory_with_load_adapter_points_to_the_right_function(tmp_path):
    get_lily_model(tiny_llama(), LilyConfig(r=4, target_modules=["q_proj"])).save_peft_adapter(tmp_path / "p")
    with pytest.raises(AdapterLoadError, match="use lily_ext.load_peft_adapter"):
        load_adapter(tiny_llama(), tmp_path / "p")


def test_second_adapter_from_disk(tmp_path):
    base = tiny_llama()
    ids = token_batch()
    other = trained_model(copy.deepcopy(base), r=6, routing="token")
    other.save_adapter(tmp_path / "other")
    model = trained_model(copy.deepcopy(base), r=4)
    model.load_adapter(tmp_path / "other", "other")
    model.set_adapter("other")
    torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_modules_to_save_round_trip(tmp_path):
    base = tiny_bert()
    model = trained_model(copy.deepcopy(base), r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    ids = token_batch()
    model.save_adapter(tmp_path / "a")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# ---- PEFT's format ------------------------------------------------------------------------------------


def test_peft_loads_what_we_save(tmp_path):
    base = tiny_bert()
    model = trained_model(
        copy.deepcopy(base), r=4, stride_A=2, num_B=3, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    model.save_peft_adapter(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    ids = token_batch()
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits)


def test_we_load_what_peft_saves(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj"], init_weights=False),
    )
    theirs.save_pretrained(tmp_path / "peft")
    ours = lily_ext.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    ids = token_batch()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    q0 = ours.model.model.layers[0].self_attn.q_proj
    q1 = ours.model.model.layers[1].self_attn.q_proj
    assert q0.lily_A["default"].weight is q1.lily_A["default"].weight


def test_peft_format_needs_batch_routing(tmp_path):
    model = get_lily_model(tiny_llama(), LilyConfig(r=4, target_modules=["q_proj"], routing="sequence"))
    with pytest.raises(ValueError, match="PEFT's Lily has batch routing only"):
        model.save_peft_adapter(tmp_path / "p")


def test_peft_adapter_for_another_model_is_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LilyConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterLoadError, match="does not fit this base model"):
        lily_ext.load_peft_adapter(tiny_bert(), tmp_path / "peft")
    with pytest.raises(AdapterLoadError, match=r"tensor .* has shape \[4, 64\], expected \[4, 32\]"):
        lily_ext.load_peft_adapter(tiny_llama(hidden=32), tmp_path / "peft")


def test_non_shared_peft_tensors_are_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LilyConfig(r=4, stride_A=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lily_A.weight"] += 1
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(
        AdapterLoadError, match=r"layers.1.self_attn.q_proj.lily_A.weight' differs from .*which it should share"
    ):
        lily_ext.load_peft_adapter(tiny_llama(), tmp_path / "peft")


def test_half_precision_base_keeps_float32_adapter(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    model = get_lily_model(base, LilyConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.lily_A["default"].weight.dtype == torch.float32
    out = model(input_ids=token_batch()).logits
    assert out.dtype == torch.bfloat16
    model.save_adapter(tmp_path / "a")
    assert (
        load_adapter(tiny_llama().to(torch.bfloat16), tmp_path / "a")
        .model.model.layers[0]
        .self_attn.q_proj.lily_A["default"]
        .weight.dtype
        == torch.float32
    )
    assert isinstance(layer, nn.Module)
