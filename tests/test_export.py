"""Static routing and merging, freeze_router, TorchScript, torch.export and ONNX (decomposed / merged /
custom) run in ONNX Runtime."""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.lily_models import DYNAMIC, TinyNet, bert_model, example_and_other_inputs, lily_net
from helpers.models import tiny_bert, token_batch
from torch import nn

import lily_ext
from lily_ext import LilyConfig, get_lily_model
from lily_ext.export import export_onnx
from lily_ext.layer import LilyLinear


def ort_run(proto_or_path, feeds, session=None):
    session = session or ort.InferenceSession(
        proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path),
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


# ---- merging -------------------------------------------------------------------------------------------


def test_merge_unmerge_round_trip():
    model = lily_net("static")
    x = torch.randn(4, 7, 16)
    expected = model(x)
    weights = {n: p.clone() for n, p in model.model.named_parameters() if n.endswith("base_layer.weight")}
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    for n, p in model.model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter is merged"):
        model.unmerge_adapter()


def test_merge_and_unload_gives_the_plain_model_with_merged_weights():
    model = lily_net("static", modules_to_save=["head"])
    with torch.no_grad():
        model.model.head.modules_to_save["default"].weight.add_(1.0)
    x = torch.randn(2, 5, 16)
    expected = model(x)
    plain = model.merge_and_unload()
    assert isinstance(plain, TinyNet) and not any(isinstance(m, LilyLinear) for m in plain.modules())
    assert isinstance(plain.layers[0].q_proj, nn.Linear)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["batch", "sequence", "token", "causal"])
def test_dynamic_routing_refuses_to_merge(routing):
    model = lily_net(routing)
    with pytest.raises(ValueError, match=r"freeze_router"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"freeze_router"):
        export_onnx(model, (torch.randn(1, 3, 16),), form="merged")
    assert not any(m.merged_adapters for _, m in model.lily_layers())


def test_freeze_router_on_the_calibration_batch_is_exact_for_batch_routing():
    # batch routing averages over the whole call, which is what freezing on that one call does
    model = lily_net("batch")
    x = torch.randn(3, 6, 16)
    dynamic = model(x)
    report = lily_ext.freeze_router(model, [(x,)])
    assert set(report) == {p for p, _ in model.lily_layers()}
    for layer_report in report.values():
        assert layer_report["relative_error"] < 1e-5 and abs(sum(layer_report["weights"]) - 1) < 1e-9
    assert model.configs["default"].routing == "static"
    assert all(m.routing["default"] == "static" and "default" not in m.lily_router for _, m in model.lily_layers())
    torch.testing.assert_close(model(x), dynamic, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), dynamic, rtol=1e-4, atol=1e-5)


def test_freeze_router_reports_deviation_and_ignores_padding():
    model = bert_model("token")
    twin = copy.deepcopy(model)
    ids = token_batch(4, 9)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    report = lily_ext.freeze_router(
        model, [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:2], "attention_mask": mask[:2]}]
    )
    errors = [r["relative_error"] for r in report.values()]
    assert all(0 < e < 1 for e in errors)  # token routing is not constant: frozen is close, not equal
    # padded positions do not count: other tokens there give the same frozen weights
    poisoned = ids.clone()
    poisoned[:, 6:] = (poisoned[:, 6:] + 11) % 97
    twin_report = lily_ext.freeze_router(
        twin, [{"input_ids": poisoned, "attention_mask": mask}, {"input_ids": poisoned[:2], "attention_mask": mask[:2]}]
    )
    for path in report:
        np.testing.assert_allclose(twin_report[path]["weights"], report[path]["weights"], rtol=1e-6)


def test_freeze_router_bad_input():
    model = lily_net("batch")
    with pytest.raises(ValueError, match="batches: need at least one"):
        lily_ext.freeze_router(model, [])
    with pytest.raises(TypeError, match="batches: each item must be a tuple"):
        lily_ext.freeze_router(model, [torch.randn(1, 2, 16)])
    with pytest.raises(ValueError, match="already uses static routing"):
        lily_ext.freeze_router(lily_net("static"), [(torch.randn(1, 2, 16),)])


# ---- TorchScript and torch.export -------------------------------------------------------------------------


def test_torchscript_trace_keeps_one_op_per_layer_and_reloads_in_a_fresh_process(tmp_path):
    model = lily_net("token")
    x = torch.randn(2, 5, 16)
    traced = torch.jit.trace(model.model, (x,))
    assert str(traced.inlined_graph).count("lily::routed_mix") == 6
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    x2 = torch.randn(3, 4, 16)
    torch.save({"x": x2, "y": model(x2)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, lily_ext
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(m(io["x"]), io["y"])
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("routing", ["batch", "sequence", "causal"])
def test_torch_export_keeps_one_op_per_layer(routing):
    model = lily_net(routing)
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        model.model, (x,), {"attention_mask": mask}, dynamic_shapes={"x": {0: batch}, "attention_mask": {0: batch}}
    )
    ops = [n for n in program.graph.nodes if n.target is torch.ops.lily.routed_mix.default]
    assert len(ops) == 6
    x2, mask2 = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.long)
    mask2[1, 3:] = 0
    torch.testing.assert_close(program.module()(x2, attention_mask=mask2), model(x2, attention_mask=mask2))


# ---- ONNX ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["batch", "sequence", "token", "static", "causal"])
def test_decomposed_form_runs_in_plain_onnxruntime(routing, tmp_path):
    model = bert_model(routing)
    example, other = example_and_other_inputs()
    proto = export_onnx(model, (), tmp_path / "m.onnx", form="decomposed", kwargs=example, dynamic_shapes=DYNAMIC)
    onnx.checker.check_model(proto)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    expected = model(**other).logits.detach().numpy()
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", other), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_merged_form_is_the_base_graph(tmp_path):
    base = tiny_bert()
    example, other = example_and_other_inputs()
    base_proto = torch.onnx.export(
        copy.deepcopy(base).eval(), (), kwargs=example, dynamo=True, dynamic_shapes=DYNAMIC, external_data=False
    ).model_proto
    model = get_lily_model(
        base, LilyConfig(r=4, num_B=3, target_modules=["query", "value"], routing="static", init_weights=False)
    ).eval()
    proto = export_onnx(model, (), tmp_path / "m.onnx", form="merged", kwargs=example, dynamic_shapes=DYNAMIC)
    assert len(proto.graph.node) == len(base_proto.graph.node)
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in base_proto.graph.node]
    np.testing.assert_allclose(
        ort_run(tmp_path / "m.onnx", other), model(**other).logits.detach().numpy(), rtol=0, atol=1e-4
    )
    assert any(isinstance(m, LilyLinear) for m in model.modules())  # the user's model is left as it was


def test_export_bad_form():
    with pytest.raises(ValueError, match="form: expected one of 'custom', 'decomposed', 'merged'"):
        export_onnx(lily_net(), (torch.randn(1, 2, 16),), form="fused")


@pytest.mark.parametrize("routing", ["batch", "sequence", "token", "static", "causal"])
def test_custom_form_graph(routing):
    model = bert_model(routing)
    example, _ = example_and_other_inputs()
    proto = export_onnx(model, (), form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    onnx.checker.check_model(proto)
    nodes = [n for n in proto.graph.node if n.op_type == "RoutedMix"]
    assert len(nodes) == 6 and all(n.domain == "lily" for n in nodes)
    assert any(o.domain == "lily" and o.version == 1 for o in proto.opset_import)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"scaling": 1.0, "mode": routing.encode()}
    assert (len(nodes[0].input) == 4) == (routing in ("sequence", "causal"))  # the attention mask reaches the node


@pytest.mark.ort
@pytest.mark.parametrize("routing", ["batch", "sequence", "token", "static", "causal"])
def test_custom_form_runs_in_onnxruntime_with_the_library(routing, tmp_path):
    model = bert_model(routing)
    example, other = example_and_other_inputs()
    export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    session = lily_ext.ort_session(str(tmp_path / "m.onnx"))
    expected = model(**other).logits.detach().numpy()
    np.testing.assert_allclose(ort_run(None, other, session), expected, rtol=0, atol=1e-4)


@pytest.mark.ort
def test_custom_form_with_the_torchscript_exporter(tmp_path):
    model = lily_net("token")
    proto = export_onnx(model, (torch.randn(2, 5, 16),), tmp_path / "m.onnx", form="custom", dynamo=False)
    nodes = [n for n in proto.graph.node if n.op_type == "RoutedMix"]
    assert len(nodes) == 6 and all(n.domain == "lily" for n in nodes)
    onnx.checker.check_model(proto)
    x = torch.randn(2, 5, 16)  # the TorchScript exporter fixes the example's shapes
    np.testing.assert_allclose(
        ort_run(None, {proto.graph.input[0].name: x}, lily_ext.ort_session(str(tmp_path / "m.onnx"))),
        model(x).detach().numpy(),
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.ort
def test_exported_model_runs_in_a_process_with_only_onnxruntime(tmp_path):
    model = bert_model("sequence")
    example, other = example_and_other_inputs()
    export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    np.savez(
        tmp_path / "io.npz", expected=model(**other).logits.detach().numpy(), **{k: v.numpy() for k, v in other.items()}
    )
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        options = ort.SessionOptions()
        options.register_custom_ops_library({lily_ext.ort_library_path()!r})
        session = ort.InferenceSession({str(tmp_path / "m.onnx")!r}, options, providers=["CPUExecutionProvider"])
        io = np.load({str(tmp_path / "io.npz")!r})
        out = session.run(None, {{"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}})[0]
        assert np.abs(out - io["expected"]).max() < 1e-4
        assert "torch" not in sys.modules and "lily_ext" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
