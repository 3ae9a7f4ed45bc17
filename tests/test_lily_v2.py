"""Lily v2 (issue 13): a routed A bank per target and two routers per layer.

    h = routed_mix(x, R_A, A_bank [num_A, in, r], mode=routing_A, mask)
    delta = scaling * routed_mix(h, R_B, B_bank [num_B, r, out], mode=routing, mask)

Checked against the independent float64 reference (helpers/reference.py) composed twice, forward
and every gradient, for every mode pair; masks; opcheck on the op calls the model makes; KV-cache
decoding with causal routing on both sides; checkpoints (format 2, and a format-1 fixture written
by the previous lily_ext); merging and freeze_router; the ONNX forms in ONNX Runtime; the decoder
export; PEFT refusals; the CLI flags; DDP (slow).
"""

import copy
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from helpers import TESTS_DIR
from helpers.lily_models import TinyNet, lily_lm
from helpers.reference import routed_mix_reference
from torch import nn

import lily_ext
from lily_ext import AdapterLoadError, LilyConfig, get_lily_model, load_adapter
from lily_ext.export import export_onnx

MODES = ["batch", "sequence", "token", "static", "causal"]
MASKED = ("sequence", "causal")
FIXTURE = TESTS_DIR / "fixtures" / "adapter_format1"  # written by lily_ext at 9701cb8 (format 1)


class One(nn.Module):
    """One Linear layer, float64: the layer-level reference checks."""

    def __init__(self, width_in=10, width_out=7):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(width_in, width_out).double()

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def nudged(model, scale=0.5, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model


def v2_model(routing, routing_A, **config):
    cfg = dict(r=4, num_B=3, num_A=3, scaling=0.7, target_modules=["proj"], init_weights=False)
    cfg.update(config)
    return nudged(get_lily_model(One(), LilyConfig(routing=routing, routing_A=routing_A, **cfg)))


def v2_reference(x, layer, mask, name="default"):
    """base(x) + the v2 delta from the float64 reference, on leaf copies of the layer's tensors."""
    leaves = {
        "A_bank": layer.a_bank(name).detach().clone().requires_grad_(True),
        "R_A": layer.a_router(name).detach().clone().requires_grad_(True),
        "B": layer.lily_B[name].weight.detach().clone().requires_grad_(True),
        "R_B": layer.router(name).detach().clone().requires_grad_(True),
    }
    mode_A, mode_B = layer.routing_A[name], layer.routing[name]
    h = routed_mix_reference(x, leaves["R_A"], leaves["A_bank"], 1.0, mode_A, mask if mode_A in MASKED else None)
    bank = leaves["B"].view(layer.num_B[name], layer.r[name], -1)
    delta = routed_mix_reference(
        h, leaves["R_B"], bank, layer.scaling[name], mode_B, mask if mode_B in MASKED else None
    )
    return layer.base_layer(x) + delta, leaves


def inputs(seed=2, S=3, L=5, width=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, L, width, generator=g, dtype=torch.float64)
    mask = torch.ones(S, L, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, 3:] = 0  # right padding
    return x, mask


# ---- config ----------------------------------------------------------------------------------------------------


def test_config_fields_defaults_and_round_trip():
    cfg = LilyConfig(num_A=4, routing="token")
    assert cfg.num_A == 4 and cfg.routing_A == "token" and cfg.is_v2  # routing_A defaults to routing
    assert LilyConfig(num_A=2, routing_A="static").routing_A == "static"
    assert LilyConfig.from_dict(cfg.to_dict()) == cfg
    v1 = LilyConfig()
    assert v1.num_A is None and v1.routing_A is None and not v1.is_v2
    assert "num_A" not in v1.to_dict() and "routing_A" not in v1.to_dict()  # what format 1 wrote


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_A": 1}, r"LilyConfig.num_A: .*num_A >= 2"),
        ({"num_A": 0}, r"LilyConfig.num_A"),
        ({"num_A": True}, r"LilyConfig.num_A: expected None or an integer >= 2"),
        ({"num_A": "4"}, r"LilyConfig.num_A: expected None or an integer >= 2"),
        ({"num_A": 2.0}, r"LilyConfig.num_A: expected None or an integer >= 2"),
        ({"num_A": 4, "stride_A": 2}, r"num_A=4 and stride_A=2 cannot be combined"),
        ({"num_A": 4, "routing_A": "fancy"}, r"LilyConfig.routing_A: expected one of"),
        ({"routing_A": "token"}, r"LilyConfig.routing_A: .*needs num_A"),
    ],
)
def test_config_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        LilyConfig(**fields)


# ---- forward and backward against the float64 reference ----------------------------------------------------------


@pytest.mark.parametrize("routing_A", MODES)
@pytest.mark.parametrize("routing", MODES)
def test_forward_and_every_gradient_match_the_float64_reference(routing, routing_A):
    model = v2_model(routing, routing_A)
    layer = model.model.proj
    x, mask = inputs()
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    y = model(x, attention_mask=mask)
    expected, leaves = v2_reference(x_ref, layer, mask)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    got = {
        "A_bank": layer.a_bank("default").grad,
        "R_A": layer.a_router("default").grad,
        "B": layer.lily_B["default"].weight.grad,
        "R_B": layer.router("default").grad,
    }
    for key, leaf in leaves.items():
        torch.testing.assert_close(got[key], leaf.grad, rtol=1e-9, atol=1e-10, msg=key)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    assert layer.a_bank("default").grad.abs().sum() > 0 and layer.a_router("default").grad.abs().sum() > 0


def test_masked_tokens_do_not_route_on_either_side():
    # sequence routing on both sides: changing a padded token changes only that token's own output
    model = v2_model("sequence", "sequence")
    x, mask = inputs()
    y = model(x, attention_mask=mask)
    poisoned = x.clone()
    poisoned[0, :2] += 5.0  # the left padding of sample 0
    y2 = model(poisoned, attention_mask=mask)
    torch.testing.assert_close(y2[0, 2:], y[0, 2:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2[1:], y[1:], rtol=0, atol=0)


def test_float32_model_and_half_precision_base():
    model = nudged(
        get_lily_model(TinyNet(), LilyConfig(r=4, num_B=2, num_A=2, target_modules=["q_proj"], routing="token"))
    )
    x = torch.randn(2, 5, 16)
    y = model(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    half = get_lily_model(TinyNet().to(torch.bfloat16), LilyConfig(r=4, num_A=2, target_modules=["q_proj"]))
    layer = half.model.layers[0].q_proj
    assert layer.a_bank("default").dtype == torch.float32  # adapters of a half base are float32, as in v1
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16


# ---- structure: sharing, init, accessors, trainable parameters ---------------------------------------------------------


def test_a_bank_is_shared_per_target_and_initialised_like_the_issue_says():
    num_A, r, num_B, width = 4, 3, 2, 16
    model = get_lily_model(TinyNet(), LilyConfig(r=r, num_B=num_B, num_A=num_A, target_modules=["q_proj", "v_proj"]))
    q = [model.model.layers[i].q_proj for i in range(3)]
    v = [model.model.layers[i].v_proj for i in range(3)]
    assert all(m.a_bank("default") is q[0].a_bank("default") for m in q)
    assert all(m.a_bank("default") is v[0].a_bank("default") for m in v)
    assert q[0].a_bank("default") is not v[0].a_bank("default")
    assert q[0].a_router("default") is not q[1].a_router("default")
    assert tuple(q[0].a_bank("default").shape) == (num_A, width, r)
    assert tuple(q[0].a_router("default").shape) == (num_A, width)
    assert "default" not in q[0].lily_A  # no fixed A in v2
    bank = q[0].a_bank("default")
    bound = 1 / width**0.5  # Kaiming-uniform of each expert A_a [r, in], as nn.Linear(in, r) initialises
    assert bank.abs().max() <= bound and bank.std() > bound / 3
    assert torch.count_nonzero(q[0].lily_B["default"].weight) == 0  # B zeros: starts as the base model
    x = torch.randn(2, 5, 16)
    with model.disable_adapter():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    trainable, _ = model.get_nb_trainable_parameters()
    expected = 2 * (num_A * width * r + num_B * r * width) + 6 * (num_A * width + num_B * r)
    assert trainable == expected
    static = get_lily_model(TinyNet(), LilyConfig(r=r, num_A=num_A, routing_A="static", target_modules=["q_proj"]))
    layer = static.model.layers[0].q_proj
    assert tuple(layer.a_router("default").shape) == (num_A,) and "default" in layer.lily_theta_A
    with pytest.raises(ValueError, match="no A bank"):
        lily_net_v1().model.layers[0].q_proj.a_bank("default")
    assert "num_A=2" in repr(get_lily_model(TinyNet(), LilyConfig(num_A=2, target_modules=["q_proj"])))


def lily_net_v1():
    return get_lily_model(TinyNet(), LilyConfig(r=4, target_modules=["q_proj"]))


def test_set_adapter_and_delete_adapter_with_v1_and_v2_side_by_side():
    model = get_lily_model(TinyNet(), LilyConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("v2", LilyConfig(r=4, num_A=2, target_modules=["q_proj"], routing="token"))
    model.set_adapter("v2")
    layer = model.model.layers[0].q_proj
    assert layer.a_bank("v2").requires_grad and not layer.lily_A["default"].weight.requires_grad
    model.set_adapter("default")
    assert not layer.a_bank("v2").requires_grad and not layer.a_router("v2").requires_grad
    model.delete_adapter("v2")
    assert "v2" not in layer.lily_A_bank and "v2" not in layer.lily_router_A and "v2" not in layer.num_A


def test_opcheck_on_the_op_calls_the_model_makes(monkeypatch):
    import lily_ext.layer

    calls = []
    original = lily_ext.layer.routed_mix

    def recording(hidden, router, bank, scaling=1.0, mode="batch", mask=None):
        calls.append((hidden.detach(), router.detach(), bank.detach(), float(scaling), mode, mask))
        return original(hidden, router, bank, scaling=scaling, mode=mode, mask=mask)

    monkeypatch.setattr(lily_ext.layer, "routed_mix", recording)
    for routing, routing_A in [("token", "sequence"), ("causal", "static"), ("batch", "causal")]:
        model = v2_model(routing, routing_A)
        x, mask = inputs(S=2, L=3)
        model(x, attention_mask=mask)
    assert len(calls) == 6 and {c[4] for c in calls} == {"token", "sequence", "causal", "static", "batch"}
    for hidden, router, bank, scaling, mode, mask in calls:
        args = (hidden.requires_grad_(True), router.requires_grad_(True), bank.requires_grad_(True), scaling, mode)
        torch.library.opcheck(torch.ops.lily.routed_mix.default, (*args, mask))


# ---- causal routing on both sides: KV-cache decoding ---------------------------------------------------------------


def test_cached_generation_equals_the_forward_pass_with_causal_routing_on_both_sides():
    model = lily_lm(routing="causal", num_A=2)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.routing_A["default"] == "causal"
    ids = torch.tensor([[0, 0, 5, 9, 13, 2], [4, 8, 15, 16, 23, 42]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4, use_cache=True)
        plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4, use_cache=False)
        torch.testing.assert_close(cached, plain, rtol=0, atol=0)
        full = model(input_ids=cached, attention_mask=torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)).logits
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model(input_ids=cached[:, 6:7], attention_mask=step_mask, cache=out.cache).logits
    torch.testing.assert_close(step[:, 0], full[:, 6], rtol=1e-5, atol=1e-5)
    state = out.cache.lily_causal_state
    keys = set(state.sums)
    assert any(k.endswith(":default:A") for k in keys) and any(k.endswith(":default") for k in keys)
    assert len(keys) == 2 * len(model.lily_layers())  # a state per side


# ---- checkpoints -----------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_saves_every_shared_tensor_once_and_restores_sharing(tmp_path):
    model = nudged(
        get_lily_model(
            TinyNet(),
            LilyConfig(r=4, num_B=3, num_A=2, target_modules=["q_proj", "v_proj"], routing="token", routing_A="static"),
        )
    )
    x = torch.randn(2, 5, 16)
    expected = model(x)
    model.save_adapter(tmp_path / "a")
    record = json.loads((tmp_path / "a" / "lily_config.json").read_text())
    assert record["format_version"] == 2 and record["config"]["num_A"] == 2
    tensors = safetensors.torch.load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert {k for k in tensors if "A" in k.split(".")[-1] or k.startswith(("router_A.", "theta_A."))} == {
        "group.0.A_bank",
        "group.1.A_bank",
        *(f"theta_A.layers.{i}.{t}" for i in range(3) for t in ("q_proj", "v_proj")),
    }
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == trainable_bytes
    loaded = load_adapter(TinyNet(), tmp_path / "a", is_trainable=True)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    q = [loaded.model.layers[i].q_proj for i in range(3)]
    assert all(m.a_bank("default") is q[0].a_bank("default") for m in q)  # one Parameter again
    assert loaded.configs["default"] == model.configs["default"]
    # a dynamic A router saves router_A.{layer} [num_A, in]
    dynamic = get_lily_model(TinyNet(), LilyConfig(num_A=3, r=2, target_modules=["q_proj"], routing="sequence"))
    dynamic.save_adapter(tmp_path / "b")
    keys = safetensors.torch.load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert tuple(keys["router_A.layers.1.q_proj"].shape) == (3, 16)
    # a v1 adapter is still written as format 1
    lily_net_v1().save_adapter(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "lily_config.json").read_text())["format_version"] == 1


def test_a_format_1_checkpoint_from_the_previous_version_still_loads():
    record = json.loads((FIXTURE / "lily_config.json").read_text())
    assert record["format_version"] == 1 and "num_A" not in record["config"]
    saved = safetensors.torch.load_file(str(FIXTURE / "adapter.safetensors"))
    model = load_adapter(TinyNet(), FIXTURE)
    layers = model.model.layers
    assert layers[0].q_proj.lily_A["default"].weight is layers[1].q_proj.lily_A["default"].weight  # stride_A = 2
    assert layers[2].q_proj.lily_A["default"].weight is not layers[0].q_proj.lily_A["default"].weight
    torch.testing.assert_close(layers[2].v_proj.lily_A["default"].weight, saved["group.1.A.1"], rtol=0, atol=0)
    torch.testing.assert_close(layers[1].v_proj.lily_router["default"].weight, saved["router.layers.1.v_proj"])
    # the loaded model computes the v1 formula from the file's tensors
    x = torch.randn(2, 4, 16)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    h = x
    for i, block in enumerate(TinyNet().layers):
        out = {}
        for t, g in (("q_proj", 0), ("v_proj", 1)):
            base = getattr(block, t)
            A = saved[f"group.{g}.A.{i // 2}"].double()
            bank = saved[f"group.{g}.B"].double().view(3, 4, 16)
            hid = h.double() @ A.T
            delta = routed_mix_reference(hid, saved[f"router.layers.{i}.{t}"], bank, 1.0, "sequence", mask)
            out[t] = base(h) + delta.float()
        h = h + torch.tanh(out["q_proj"]) * out["v_proj"]
    head = nn.Linear(16, 5)
    head.load_state_dict({k.split(".")[-1]: v for k, v in saved.items() if k.startswith("save.head.")})
    torch.testing.assert_close(model(x, attention_mask=mask), head(h), rtol=1e-4, atol=1e-5)


def test_checkpoint_errors():
    with tempfile.TemporaryDirectory() as tmp:
        model = get_lily_model(TinyNet(), LilyConfig(num_A=2, r=2, target_modules=["q_proj"]))
        model.save_adapter(Path(tmp) / "a")
        config = Path(tmp) / "a" / "lily_config.json"
        record = json.loads(config.read_text())
        record["format_version"] = 1
        config.write_text(json.dumps(record))
        with pytest.raises(AdapterLoadError, match="format_version 1 cannot hold a Lily v2 adapter"):
            load_adapter(TinyNet(), Path(tmp) / "a")
        record["format_version"] = 3
        config.write_text(json.dumps(record))
        with pytest.raises(AdapterLoadError, match="written by a newer lily_ext"):
            load_adapter(TinyNet(), Path(tmp) / "a")
        record["format_version"] = 2
        record["config"]["num_A"] = 3  # tensors of num_A = 2 against a config saying 3
        config.write_text(json.dumps(record))
        with pytest.raises(AdapterLoadError, match=r"group.0.A_bank.*shape \[2, 16, 2\], expected \[3, 16, 2\]"):
            load_adapter(TinyNet(), Path(tmp) / "a")


# ---- merging and freezing ------------------------------------------------------------------------------------------------


def test_merge_with_both_routers_static_folds_bc_transposed_times_ac():
    model = nudged(
        get_lily_model(
            TinyNet(), LilyConfig(r=4, num_B=3, num_A=3, target_modules=["q_proj", "v_proj"], routing="static")
        )
    )
    layer = model.model.layers[1].v_proj
    Ac = torch.einsum(
        "a,aik->ki", torch.softmax(layer.a_router("default").double(), 0), layer.a_bank("default").double()
    )
    Bc = torch.einsum("e,eio->io", torch.softmax(layer.router("default").double(), 0), layer.bank("default").double())
    torch.testing.assert_close(layer.delta_weight("default"), layer.scaling["default"] * Bc.T @ Ac)
    assert tuple(layer.delta_weight("default").shape) == (16, 16)
    x = torch.randn(3, 4, 16)
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert isinstance(plain, TinyNet) and isinstance(plain.layers[0].q_proj, nn.Linear)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing, routing_A", [("static", "token"), ("sequence", "static")])
def test_a_dynamic_router_on_either_side_refuses_to_merge(routing, routing_A):
    model = get_lily_model(
        TinyNet(), LilyConfig(r=4, num_A=2, target_modules=["q_proj"], routing=routing, routing_A=routing_A)
    )
    with pytest.raises(ValueError, match="freeze_router"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="freeze_router"):
        export_onnx(model, (torch.randn(1, 3, 16),), form="merged")


def test_freeze_router_on_the_calibration_batch_is_exact_for_batch_routing_on_both_sides():
    model = nudged(
        get_lily_model(
            TinyNet(), LilyConfig(r=4, num_A=3, num_B=3, target_modules=["q_proj", "v_proj"], routing="batch")
        )
    )
    x = torch.randn(3, 6, 16)
    dynamic = model(x)
    report = lily_ext.freeze_router(model, [(x,)], method="mean")
    assert set(report) == {p for p, _ in model.lily_layers()}
    for layer_report in report.values():  # per layer, both sides
        assert layer_report["relative_error"] < 1e-5 and layer_report["A"]["relative_error"] < 1e-6
        assert layer_report["A"]["method"] == "mean" and abs(sum(layer_report["A"]["static_weights"]) - 1) < 1e-9
    cfg = model.configs["default"]
    assert cfg.routing == "static" and cfg.routing_A == "static"
    assert all("default" in m.lily_theta_A and "default" not in m.lily_router_A for _, m in model.lily_layers())
    torch.testing.assert_close(model(x), dynamic, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), dynamic, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["mean", "optimal_weights", "optimal_bc"])
def test_freeze_router_methods_on_token_and_sequence_routing(method):
    model = nudged(
        get_lily_model(
            TinyNet(),
            LilyConfig(r=4, num_A=3, num_B=3, target_modules=["q_proj"], routing="token", routing_A="sequence"),
        ),
        scale=0.3,
    )
    batches = [(torch.randn(4, 6, 16),), (torch.randn(2, 3, 16),)]
    report = lily_ext.freeze_router(model, batches, method=method, tune_batches=None)
    for r in report.values():
        assert 0 <= r["relative_error"] <= r["relative_error_mean"] + 1e-9 or method == "mean"
        assert r["A"]["method"] == ("mean" if method == "mean" else "optimal_weights")
        assert r["A"]["relative_errors"]["optimal_weights"] <= r["A"]["relative_errors"]["mean"] + 1e-9
        assert r["max_abs_error"] is not None
    x = torch.randn(2, 5, 16)
    out = model(x)
    plain = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-5)
    assert len(lily_ext.calibration.static_parameters(model)) == 2 * len(model.lily_layers())


def test_freeze_router_v2_errors():
    model = get_lily_model(TinyNet(), LilyConfig(r=4, num_A=2, target_modules=["q_proj"], routing="token"))
    x = [(torch.randn(1, 3, 16),)]
    with pytest.raises(ValueError, match=r"method_A: .*'mean', 'optimal_weights'.*optimal_bc.*\[in, in\]"):
        lily_ext.freeze_router(model, x, method_A="optimal_bc")
    with pytest.raises(ValueError, match="method_A: adapter 'default' has no A router"):
        lily_ext.freeze_router(lily_net_v1(), x, method_A="mean")
    static = get_lily_model(TinyNet(), LilyConfig(r=4, num_A=2, target_modules=["q_proj"], routing="static"))
    with pytest.raises(ValueError, match="already uses static routing on both sides"):
        lily_ext.freeze_router(static, x)


def test_freeze_router_with_only_the_a_router_dynamic_keeps_the_b_side():
    model = nudged(
        get_lily_model(
            TinyNet(), LilyConfig(r=4, num_A=3, target_modules=["q_proj"], routing="static", routing_A="token")
        )
    )
    layer = model.model.layers[0].q_proj
    theta = layer.lily_theta["default"].detach().clone()
    report = lily_ext.freeze_router(model, [(torch.randn(3, 4, 16),)])
    torch.testing.assert_close(layer.lily_theta["default"], theta, rtol=0, atol=0)
    assert "default" in layer.lily_theta_A and report["layers.0.q_proj"]["method"] == "static"
    model.merge_adapter()


# ---- ONNX export --------------------------------------------------------------------------------------------------------


def ort_outputs(path, feeds, custom):
    session = (
        lily_ext.ort_session(str(path))
        if custom
        else ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    )
    names = {i.name for i in session.get_inputs()}  # (the merged graph has no use for the mask)
    return session.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize(
    "form, routing, routing_A",
    [("custom", "sequence", "token"), ("decomposed", "causal", "sequence"), ("merged", "static", "static")],
)
def test_export_forms_run_in_onnxruntime(tmp_path, form, routing, routing_A):
    model = nudged(
        get_lily_model(
            TinyNet(),
            LilyConfig(
                r=4, num_B=3, num_A=3, target_modules=["q_proj", "v_proj"], routing=routing, routing_A=routing_A
            ),
        ),
        scale=0.3,
    ).eval()
    example = {"x": torch.randn(2, 3, 16), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, 5:] = 0
    other = {"x": torch.randn(3, 7, 16), "attention_mask": mask}  # another batch size, length and padding
    dynamic = {"x": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    path = tmp_path / "m.onnx"
    proto = export_onnx(model, (), path, form=form, kwargs=example, dynamic_shapes=dynamic)
    nodes = [n for n in proto.graph.node if n.domain == "lily"] + [
        n for f in proto.functions for n in f.node if n.domain == "lily"
    ]
    assert len(nodes) == (2 * len(model.lily_layers()) if form == "custom" else 0)  # two RoutedMix per layer
    if form == "custom":
        assert {a.s.decode() for n in nodes for a in n.attribute if a.name == "mode"} == {routing, routing_A}
    with torch.no_grad():
        expected = model(**other).numpy()
    got = ort_outputs(path, other, custom=form == "custom")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # ~50 s on 2 busy cores: the export of a decoder
def test_decoder_export_with_causal_routing_on_both_sides_generates_like_pytorch(tmp_path):
    from lily_ext import ort as lily_ort

    model = lily_lm(routing="causal", num_A=2, routing_A="causal")
    folder = lily_ext.export_causal_lm(model, tmp_path / "dec", form="custom")
    record = json.loads((folder / "lily_decoder.json").read_text())
    sides = [s["side"] for s in record["state_layers"]]
    assert sides.count("A") == sides.count("B") == len(model.lily_layers()) and record["routing_A"] == "causal"
    ids = torch.tensor([[0, 0, 7, 3, 9], [5, 1, 2, 8, 4], [0, 0, 0, 6, 11]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [3]])).long()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=3)
        logits = model(input_ids=ids, attention_mask=mask).logits
    session = lily_ort.DecoderSession(folder)
    got = lily_ort.generate(session, ids.numpy(), mask.numpy(), max_new_tokens=3)
    np.testing.assert_array_equal(got, expected.numpy())
    first = session.start(ids.numpy(), mask.numpy())
    real = mask.numpy() == 1
    np.testing.assert_allclose(first[real], logits.numpy()[real], rtol=0, atol=1e-4)


# ---- PEFT and the CLI ------------------------------------------------------------------------------------------------------


def test_peft_interop_refuses_a_v2_adapter(tmp_path):
    model = get_lily_model(TinyNet(), LilyConfig(r=4, num_A=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="save_peft_adapter: .*Lily v2 adapter.*save_adapter"):
        model.save_peft_adapter(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="patch_peft: .*Lily v2 adapter.*PEFT's Lily has no v2"):
        lily_ext.patch_peft(model)


def test_cli_flags_reach_the_config():
    from lily_ext.app.cli import _lily_config, build_parser

    args = build_parser().parse_args(
        ["train", "--model", "m", "--data", "d.jsonl", "--out", "o", "--num-A", "4", "--routing-A", "token"]
    )
    args.routing = "sequence"
    cfg = _lily_config(args, nn.Linear(2, 2))
    assert (cfg.num_A, cfg.routing_A, cfg.stride_A, cfg.routing) == (4, "token", 1, "sequence")
    demo = build_parser().parse_args(["demo", "--num-A", "2"])
    assert demo.num_A == 2 and demo.routing_A is None
    args = build_parser().parse_args(
        ["train", "--model", "m", "--data", "d", "--out", "o", "--num-A", "2", "--stride-A", "2"]
    )
    args.routing = "sequence"
    with pytest.raises(ValueError, match="num_A=2 and stride_A=2"):
        _lily_config(args, nn.Linear(2, 2))
    v1 = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o"])
    v1.routing = "sequence"
    assert _lily_config(v1, nn.Linear(2, 2)).stride_A == 2  # the v1 default is unchanged


# ---- DDP ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    import distributed_worker as w
    import torch.multiprocessing as mp

    out = tmp_path / "params"
    rendezvous = tempfile.mktemp(dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(w.worker, args=(2, rendezvous, "sequence", "ddp", str(out), 2), nprocs=2)
    rank0, rank1 = (torch.load(f"{out}.rank{r}") for r in range(2))
    reference = w.single_process("sequence", num_A=2)
    assert rank0.keys() == reference.keys() and any("lily_A_bank" in k for k in rank0)
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = w.trained_params(w.make_model("sequence", num_A=2))
    assert any(not torch.equal(rank0[n], initial[n]) for n in rank0 if "lily_A_bank" in n)


@pytest.mark.parametrize("routing_A", ["token", "causal"])
def test_training_sized_per_row_a_side_takes_the_gemm_form_with_the_same_result(routing_A, monkeypatch):
    # >= PER_ROW_A_GEMM_MIN_ROWS rows on the CPU with gradients: x @ [in, num_A * r] and the weighted sum
    import lily_ext.layer

    model = v2_model("sequence", routing_A)
    layer = model.model.proj
    x, mask = inputs(S=4, L=70)
    assert x.shape[0] * x.shape[1] >= lily_ext.layer.PER_ROW_A_GEMM_MIN_ROWS
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    modes = []
    original = lily_ext.layer.routed_mix
    monkeypatch.setattr(lily_ext.layer, "routed_mix", lambda *a, **k: modes.append(k["mode"]) or original(*a, **k))
    y = model(x, attention_mask=mask)
    assert modes == ["sequence"]  # only the B side went through the op
    expected, leaves = v2_reference(x_ref, layer, mask)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(layer.a_bank("default").grad, leaves["A_bank"].grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.a_router("default").grad, leaves["R_A"].grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # inference keeps the op
        modes.clear()
        torch.testing.assert_close(model(x, attention_mask=mask), expected, rtol=1e-10, atol=1e-10)
    assert modes == [routing_A, "sequence"]
