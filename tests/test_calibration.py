"""freeze_router's static replacements (mean / optimal mixing weights / optimal combined bank) and
tune_static, checked against float64 formulas written here from docs/DESIGN.md ("Merging a dynamic
router well"): direct least squares over the stacked calibration tokens, a grid over the simplex,
and the reference routed_mix."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers.lily_models import DYNAMIC, bert_model, example_and_other_inputs, lily_net
from helpers.models import token_batch
from helpers.reference import routed_mix_reference

import lily_ext
from lily_ext.calibration import METHODS, optimal_mixing_weights, static_parameters, tune_static
from lily_ext.export import export_onnx

DYNAMIC_MODES = ["batch", "sequence", "token"]


def tiny_batches(seed=0, count=3, mask_tail=True):
    """Calibration batches for lily_net: (x [3, 6, 16], attention_mask) dicts, last 2 tokens of sample 0 padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(3, 6, 16, generator=g)
        mask = torch.ones(3, 6, dtype=torch.long)
        if mask_tail:
            mask[0, 4:] = 0
        out.append({"x": x, "attention_mask": mask})
    return out


def zero_routers(model):
    with torch.no_grad():
        for _, layer in model.lily_layers():
            layer.lily_router["default"].weight.zero_()
    return model


def captured_tokens(model, batches):
    """Per layer path: (h [N, r], d [N, out], mask [N]) in float64 over the calibration batches, d from
    the independent reference routed_mix (the dynamic adapter's output)."""
    layers = dict(model.lily_layers())
    seen = {p: [] for p in layers}

    def hook(path, layer):
        def fn(module, args, output):
            x = args[0].detach().double()
            h = x @ layer.lily_A["default"].weight.detach().double().T
            mask = layer.sequence_mask(h)
            mode = layer.routing["default"]
            d = routed_mix_reference(
                h,
                layer.lily_router["default"].weight.detach(),
                layer.bank("default").detach(),
                scaling=layer.scaling["default"],
                mode=mode,
                mask=mask if mode == "sequence" else None,
            )
            m = torch.ones(h.shape[:-1], dtype=torch.float64) if mask is None else (mask != 0).double()
            seen[path].append((h.reshape(-1, h.shape[-1]), d.reshape(-1, d.shape[-1]), m.reshape(-1)))

        return fn

    handles = [m.register_forward_hook(hook(p, m)) for p, m in layers.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {p: tuple(torch.cat(parts) for parts in zip(*chunks)) for p, chunks in seen.items()}


def relative_error(h, d, m, scaling, combined):
    combined = combined.detach()
    diff = (scaling * h @ combined - d) * m[:, None]
    return float(diff.norm() / (d * m[:, None]).norm())


# ---- known answers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", DYNAMIC_MODES)
@pytest.mark.parametrize("method", METHODS)
def test_zero_routers_route_uniformly_and_every_method_reproduces_them(method, routing):
    model = zero_routers(lily_net(routing))
    batches = tiny_batches()
    expected = [model(**b).detach() for b in batches]
    report = lily_ext.freeze_router(model, batches, method=method)
    assert report.method == method and set(report) == {p for p, _ in model.lily_layers()}
    for path, layer in model.lily_layers():
        uniform = layer.bank("default").detach().double().mean(0)  # softmax(0) = 1/E for every token
        torch.testing.assert_close(layer.combined_bank("default"), uniform, rtol=0, atol=1e-6)
        assert report[path]["relative_error"] < 1e-6 and report[path]["relative_error_mean"] < 1e-6
        np.testing.assert_allclose(report[path]["weights"], [1 / 3] * 3, rtol=1e-12)
        assert ("default" in layer.lily_Bc) == (method == "optimal_bc")
    for batch, want in zip(batches, expected):
        torch.testing.assert_close(model(**batch), want, rtol=1e-5, atol=1e-5)


def test_batch_routing_on_its_one_calibration_call_is_exact_for_every_method():
    x = torch.randn(3, 6, 16)
    for method in METHODS:
        model = lily_net("batch")
        want = model(x)
        report = lily_ext.freeze_router(model, [(x,)], method=method)
        assert max(r["relative_error"] for r in report.values()) < 1e-6
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


# ---- against direct float64 least squares ----------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_methods_match_direct_float64_solutions(routing):
    model = lily_net(routing)
    batches = tiny_batches()
    tokens = captured_tokens(model, batches)
    models = {m: copy.deepcopy(model) for m in METHODS}
    reports = {m: lily_ext.freeze_router(models[m], batches, method=m, ridge=0.0) for m in METHODS}
    for path, layer in model.lily_layers():
        h, d, m = tokens[path]
        keep = m > 0
        s = layer.scaling["default"]
        bank = layer.bank("default").detach().double()
        probs = torch.softmax(h @ layer.lily_router["default"].weight.detach().double().T, dim=-1)
        mean = probs[keep].mean(0)
        np.testing.assert_allclose(reports["mean"][path]["weights"], mean.numpy(), rtol=1e-9)
        # optimal Bc: ordinary least squares over the unpadded tokens, s h Bc = d
        lstsq = torch.linalg.lstsq(s * h[keep], d[keep]).solution
        got = dict(models["optimal_bc"].lily_layers())[path].combined_bank("default")
        torch.testing.assert_close(got, lstsq, rtol=0, atol=1e-5 * float(lstsq.abs().max()))
        # optimal weights: no point of a fine grid over the 2-simplex does better
        step = 1 / 200
        grid = torch.tensor(
            [(i * step, j * step, 1 - (i + j) * step) for i in range(201) for j in range(201 - i)], dtype=torch.float64
        )
        mixed = torch.einsum("ge,eio->gio", grid, bank)
        grid_errors = ((s * torch.einsum("ni,gio->gno", h[keep], mixed) - d[keep]) ** 2).sum((1, 2))
        w = torch.tensor(reports["optimal_weights"][path]["static_weights"], dtype=torch.float64)
        assert w.min() >= 0 and abs(float(w.sum()) - 1) < 1e-12
        ours = float(((s * h[keep] @ torch.einsum("e,eio->io", w, bank) - d[keep]) ** 2).sum())
        assert ours <= float(grid_errors.min()) * (1 + 1e-9)
        # every reported error is the float64 error of the installed replacement on these tokens
        for method in METHODS:
            combined = dict(models[method].lily_layers())[path].combined_bank("default")
            direct = relative_error(h, d, m, s, combined)
            np.testing.assert_allclose(reports[method][path]["relative_error"], direct, rtol=1e-6)
            np.testing.assert_allclose(reports["mean"][path]["relative_errors"][method], direct, rtol=1e-6)


def test_optimal_methods_are_never_worse_than_the_mean_and_strictly_better_on_a_random_case():
    model = lily_net("token")
    report = lily_ext.freeze_router(model, tiny_batches(), method="optimal_bc", ridge=0.0)
    for r in report.values():
        errors = r["relative_errors"]
        assert errors["optimal_weights"] <= errors["mean"] * (1 + 1e-9)
        assert errors["optimal_bc"] <= errors["optimal_weights"] * (1 + 1e-9)  # all [r, out] contain the mixes
        assert errors["optimal_bc"] < 0.999 * errors["mean"]
    assert any(r["relative_errors"]["optimal_weights"] < 0.99 * r["relative_errors"]["mean"] for r in report.values())
    # with the default ridge too: the regularised problem's optimum is never worse than its anchor, the mean
    report = lily_ext.freeze_router(lily_net("sequence"), tiny_batches(seed=3))
    assert all(r["relative_error"] <= r["relative_error_mean"] * (1 + 1e-9) for r in report.values())


def test_simplex_solver_against_brute_force_on_random_problems():
    rng = np.random.default_rng(0)
    for E in (2, 3, 5, 14):  # 14: past the exact enumeration, projected gradient
        for _ in range(20 if E < 14 else 3):
            M = rng.normal(size=(E, E + 1)) if rng.random() < 0.5 else rng.normal(size=(E, 1))  # some singular
            Q, b = M @ M.T, rng.normal(size=E)
            w = optimal_mixing_weights(Q, b, np.full(E, 1 / E))
            assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
            samples = rng.dirichlet(np.ones(E) * 0.3, size=20000)
            vertices = np.eye(E)
            candidates = np.concatenate([samples, vertices])
            values = np.einsum("ge,ef,gf->g", candidates, Q, candidates) - 2 * candidates @ b
            assert w @ Q @ w - 2 * b @ w <= values.min() + 1e-9


# ---- masks and half precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_padding_is_left_out(method):
    model = bert_model("sequence")
    twin = copy.deepcopy(model)
    ids = token_batch(4, 9)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    poisoned = ids.clone()
    poisoned[:, 6:] = (poisoned[:, 6:] + 11) % 97
    report = lily_ext.freeze_router(model, [{"input_ids": ids, "attention_mask": mask}], method=method)
    twin_report = lily_ext.freeze_router(twin, [{"input_ids": poisoned, "attention_mask": mask}], method=method)
    for (path, layer), (_, other) in zip(model.lily_layers(), twin.lily_layers()):
        torch.testing.assert_close(layer.combined_bank("default"), other.combined_bank("default"), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(twin_report[path]["relative_error"], report[path]["relative_error"], rtol=1e-6)


def test_a_fully_padded_calibration_is_refused():
    model = lily_net("sequence")
    batch = tiny_batches(count=1)[0]
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    with pytest.raises(ValueError, match="batches: no unmasked token reached layer"):
        lily_ext.freeze_router(model, [batch])
    assert model.configs["default"].routing == "sequence"  # left as it was


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_base_models(dtype, method):
    model = zero_routers(lily_net("sequence"))
    model.model.to(dtype)  # base and adapter in half precision
    batches = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()} for b in tiny_batches()]
    expected = [model(**b).detach() for b in batches]
    report = lily_ext.freeze_router(model, batches, method=method)
    for path, layer in model.lily_layers():
        uniform = layer.bank("default").detach().double().mean(0)
        tol = 1e-6 if method != "optimal_bc" else 1e-2 * float(uniform.abs().max())  # Bc is stored in `dtype`
        torch.testing.assert_close(layer.combined_bank("default"), uniform, rtol=0, atol=tol)
        assert report[path]["relative_error"] < 1e-6  # the fit itself is float64
        assert layer.combined_bank("default").isfinite().all()
    for batch, want in zip(batches, expected):
        got = model(**batch)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


# ---- what a frozen model can do -----------------------------------------------------------------------------


def test_optimal_bc_layers_merge_to_s_bc_transpose_a():
    model = lily_net("token", modules_to_save=["head"])
    lily_ext.freeze_router(model, tiny_batches())
    x = torch.randn(2, 5, 16)
    frozen_out = model(x).detach()
    for _, layer in model.lily_layers():
        Bc, A = layer.lily_Bc["default"].detach().double(), layer.lily_A["default"].weight.detach().double()
        torch.testing.assert_close(layer.delta_weight("default"), layer.scaling["default"] * Bc.T @ A, rtol=0, atol=0)
        h = x.double() @ A.T
        torch.testing.assert_close(
            torch.ops.lily.routed_mix(
                h,
                layer.router("default").double(),
                layer.routed_bank("default").double(),
                layer.scaling["default"],
                "static",
                None,
            ),
            layer.scaling["default"] * h @ Bc,
        )
    plain = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(plain(x), frozen_out, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), frozen_out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), frozen_out, rtol=1e-5, atol=1e-5)


def test_checkpoints_of_frozen_adapters(tmp_path):
    model = lily_net("sequence")
    lily_ext.freeze_router(model, tiny_batches(), method="optimal_bc")
    with pytest.raises(ValueError, match=r"own combined bank .*optimal_bc.*format version 1"):
        model.save_adapter(tmp_path / "bc")
    assert not (tmp_path / "bc").exists()
    # mixing weights are theta over the shared bank: saved and reloaded as a static adapter
    model = lily_net("sequence")
    lily_ext.freeze_router(model, tiny_batches(), method="optimal_weights")
    model.save_adapter(tmp_path / "weights")
    from helpers.lily_models import TinyNet

    loaded = lily_ext.load_adapter(TinyNet(), tmp_path / "weights")
    assert loaded.configs["default"].routing == "static"
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(loaded(x), model(x))


def test_merged_export_of_an_optimal_bc_model_runs_in_onnxruntime(tmp_path):
    model = bert_model("sequence")
    example, other = example_and_other_inputs()
    lily_ext.freeze_router(model, [example, other], method="optimal_bc")
    export_onnx(model, (), tmp_path / "m.onnx", form="merged", kwargs=example, dynamic_shapes=DYNAMIC)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in other.items()})[0]
    np.testing.assert_allclose(got, model(**other).logits.detach().numpy(), rtol=0, atol=1e-4)
    assert all("default" in m.lily_Bc for _, m in model.lily_layers())  # the user's model is left as it was


@pytest.mark.slow
def test_decomposed_export_of_an_optimal_bc_model(tmp_path):
    model = bert_model("token")
    example, other = example_and_other_inputs()
    lily_ext.freeze_router(model, [example, other], method="optimal_bc")
    export_onnx(model, (), tmp_path / "m.onnx", form="decomposed", kwargs=example, dynamic_shapes=DYNAMIC)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in other.items()})[0]
    np.testing.assert_allclose(got, model(**other).logits.detach().numpy(), rtol=0, atol=1e-4)


@pytest.mark.ort
def test_custom_export_of_an_optimal_bc_model(tmp_path):
    model = bert_model("sequence")
    example, other = example_and_other_inputs()
    lily_ext.freeze_router(model, [example, other], method="optimal_bc")
    proto = export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    nodes = [n for n in proto.graph.node if n.op_type == "RoutedMix"]
    assert len(nodes) == 6 and all(a.s == b"static" for n in nodes for a in n.attribute if a.name == "mode")
    got = lily_ext.ort_session(str(tmp_path / "m.onnx")).run(None, {k: v.numpy() for k, v in other.items()})[0]
    np.testing.assert_allclose(got, model(**other).logits.detach().numpy(), rtol=0, atol=1e-4)


# ---- recovery fine-tuning -------------------------------------------------------------------------------------


def input_batches(count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, 16, generator=g),) for _ in range(count)]


def towards_half(output, batch):
    return (output - 0.5).square().mean()


@pytest.mark.parametrize("method", ["optimal_bc", "optimal_weights"])
def test_tune_static_trains_only_the_static_parameters(method):
    model = lily_net("sequence")
    lily_ext.freeze_router(model, tiny_batches(), method=method)
    static = {id(p) for p in static_parameters(model)}
    assert len(static) == 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    losses = tune_static(model, input_batches(), 12, lr=1e-2, loss_fn=towards_half)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # 12 steps cycle 3 times over the 4 batches
    for n, p in model.named_parameters():
        assert (not torch.equal(p.detach(), before[n])) == (id(p) in static), n
        assert p.requires_grad == flags[n], n  # restored
    assert not model.training


def test_freeze_router_with_tuning_on_labelled_batches():
    model = bert_model("sequence")
    ids = token_batch(4, 9)
    mask = torch.ones_like(ids)
    labelled = [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}]
    frozen = copy.deepcopy(model)
    untuned = lily_ext.freeze_router(frozen, [{"input_ids": ids, "attention_mask": mask}])
    report = lily_ext.freeze_router(
        model, [{"input_ids": ids, "attention_mask": mask}], tune_batches=labelled, tune_steps=5, tune_lr=1e-2
    )
    assert len(report.tune_losses) == 5 and report.tune_losses[-1] < report.tune_losses[0]
    for path in report:  # errors are those of the fit, before tuning
        assert report[path]["relative_error"] == untuned[path]["relative_error"]
    for (_, a), (_, b) in zip(model.lily_layers(), frozen.lily_layers()):
        assert not torch.equal(a.lily_Bc["default"], b.lily_Bc["default"])  # tuned
        assert torch.equal(a.lily_A["default"].weight, b.lily_A["default"].weight)  # not trained


def test_tuning_needs_a_loss():
    model = lily_net("token")
    with pytest.raises(TypeError, match="tune_batches: the model's output has no loss"):
        lily_ext.freeze_router(model, tiny_batches(), tune_batches=input_batches(), tune_steps=3)


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, kwargs, error, pattern",
    [
        (lambda: lily_net("sequence"), {"batches": []}, ValueError, "batches: need at least one calibration batch"),
        (
            lambda: lily_net("sequence"),
            {"batches": iter([])},
            ValueError,
            "batches: need at least one calibration batch",
        ),
        (lambda: lily_net("sequence"), {"batches": 3}, TypeError, "batches: expected an iterable"),
        (lambda: lily_net("sequence"), {"batches": [torch.randn(1, 2, 16)]}, TypeError, "batches: each item must be"),
        (lambda: lily_net("static"), {}, ValueError, "already uses static routing"),
        (lambda: lily_net("static").model, {}, TypeError, "model: expected a lily_ext.LilyModel"),
        (
            lambda: lily_net("sequence"),
            {"method": "median"},
            ValueError,
            "method: expected one of 'mean', 'optimal_weights', 'optimal_bc'",
        ),
        (lambda: lily_net("sequence"), {"ridge": -1.0}, ValueError, "ridge: expected a finite float >= 0"),
        (lambda: lily_net("sequence"), {"ridge": float("nan")}, ValueError, "ridge: expected a finite float >= 0"),
        (lambda: lily_net("sequence"), {"tune_steps": 2}, ValueError, "tune_batches: tune_steps > 0 needs"),
        (lambda: lily_net("sequence"), {"tune_steps": -1}, ValueError, "tune_steps: expected a non-negative int"),
        (lambda: lily_net("sequence"), {"tune_lr": 0.0, "tune_steps": 1, "tune_batches": []}, ValueError, "tune_lr:"),
        (lambda: lily_net("sequence"), {"adapter_name": "other"}, ValueError, "adapter_name: no adapter 'other'"),
    ],
    ids=[
        "empty",
        "empty iterator",
        "not iterable",
        "bare tensor",
        "static",
        "no Lily layers",
        "unknown method",
        "negative ridge",
        "nan ridge",
        "tuning without data",
        "negative steps",
        "zero lr",
        "unknown adapter",
    ],
)
def test_bad_input(make, kwargs, error, pattern):
    model = make()
    args = {"batches": tiny_batches(count=1), **kwargs}
    with pytest.raises(error, match=pattern):
        lily_ext.freeze_router(model, args.pop("batches"), **args)
    if isinstance(model, lily_ext.LilyModel) and model.configs["default"].routing != "static":
        assert all("default" in m.lily_router and not m.lily_Bc for _, m in model.lily_layers())  # unchanged


def test_tune_static_bad_input():
    with pytest.raises(ValueError, match="uses 'sequence' routing; freeze it first"):
        tune_static(lily_net("sequence"), input_batches(), 2, loss_fn=towards_half)
    model = lily_net("static")
    with pytest.raises(ValueError, match="tune_batches: need at least one labelled batch"):
        tune_static(model, [], 2, loss_fn=towards_half)
    with pytest.raises(ValueError, match="steps: expected a non-negative int"):
        tune_static(model, input_batches(), 1.5)
    with pytest.raises(ValueError, match="lr: expected a finite float > 0"):
        tune_static(model, input_batches(), 1, lr=float("inf"))
    assert tune_static(model, input_batches(), 0) == []
