"""lily::lily_linear, the whole Lily layer in one op, and LilyLinear's fused path.

The reference is the composed path in float64: ``F.linear(x, W, b) + routed_mix(F.linear(x, A), R, Bk)``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_llama, token_batch

import lily_ext
from lily_ext import LilyConfig, fused_layers, get_lily_model
from lily_ext.ops import MODES, lily_linear, routed_mix

IN, OUT, R, E = 12, 10, 4, 3


def make_inputs(lead, mode, dtype=torch.float32, adapter_dtype=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    x = rnd(*lead, IN)
    weight = rnd(OUT, IN, scale=0.3)
    b = rnd(OUT) if bias else None
    A = rnd(R, IN, dt=adapter_dtype, scale=0.3)
    router = rnd(E, dt=adapter_dtype) if mode == "static" else rnd(E, R, dt=adapter_dtype)
    bank = rnd(E, R, OUT, dt=adapter_dtype, scale=0.5)
    return x, weight, b, A, router, bank


def make_mask(lead, mode):
    if mode not in ("sequence", "causal") or len(lead) < 2:
        return None
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(*lead, generator=g) > 0.3
    mask[0] = False  # a fully masked sample
    return mask


def reference(x, weight, bias, A, router, bank, scaling, mode, mask):
    d = torch.float64
    y = F.linear(x.to(d), weight.to(d), None if bias is None else bias.to(d))
    h = F.linear(x.to(d), A.to(d))
    bank = bank.to(d).reshape(-1, A.shape[0], weight.shape[0])  # [E, r, out], also from a flat bank
    return y + routed_mix(h, router.to(d), bank, scaling=scaling, mode=mode, mask=mask)


LEADS = [(1,), (3,), (2, 5), (1, 70), (2, 40)]  # (1, 70), (2, 40): more than 64 rows, the in-place BLAS mix


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", LEADS)
def test_forward_backward_match_reference(mode, lead):
    x, weight, bias, A, router, bank = make_inputs(lead, mode, torch.float64)
    mask = make_mask(lead, mode)
    leaves = [t.requires_grad_() for t in (x, weight, bias, A, router, bank)]
    y = lily_linear(*leaves, scaling=0.7, mode=mode, mask=mask)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves, 0.7, mode, mask)
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    for name, got, want in zip(("x", "weight", "bias", "A", "router", "bank"), leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
    + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)
def test_dtypes(mode, dtype, adapter_dtype):
    lead = (2, 5)
    x, weight, bias, A, router, bank = make_inputs(lead, mode, dtype, adapter_dtype)
    mask = make_mask(lead, mode)
    leaves = [t.requires_grad_() for t in (x, weight, bias, A, router, bank)]
    y = lily_linear(*leaves, scaling=0.7, mode=mode, mask=mask)
    assert y.dtype == dtype
    ref = reference(*[t.detach() for t in leaves], 0.7, mode, mask)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    y.float().square().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all()


def test_flat_bank_and_no_bias():
    x, weight, _, A, router, bank = make_inputs((2, 3), "token", bias=False)
    a = lily_linear(x, weight, None, A, router, bank, scaling=0.5, mode="token")
    b = lily_linear(x, weight, None, A, router, bank.reshape(E * R, OUT), scaling=0.5, mode="token")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(
        a.double(), reference(x, weight, None, A, router, bank, 0.5, "token", None), atol=1e-5, rtol=1e-5
    )


# A gradient returned as a tracked view of a temporary keeps that temporary alive: autograd then sums
# the next gradient of the same tensor (a bank shared by a target's layers, the input that q, k and v
# read) into a new tensor (aten::add) instead of into it (aten::add_).
@pytest.mark.parametrize("backward", ["lily_linear_backward", "_lily_linear_backward_composed"])
def test_backward_returns_no_views(backward):
    x, weight, _, A, router, bank = make_inputs((2, 5), "batch")
    flat = bank.reshape(E * R, OUT)  # the model's layout: lily_B's weight
    y, hidden = torch.ops.lily.lily_linear_forward(x, weight, None, A, router, flat, 0.5, "batch", None)
    grads = getattr(torch.ops.lily, backward)(
        torch.randn_like(y), x, hidden, weight, A, router, flat, 0.5, "batch", None, [True, False, False, True]
    )
    for name, g in zip(["dx", "dweight", "dbias", "dA", "drouter", "dbank"], grads):
        assert not g._is_view(), name
    assert grads[0].shape == x.shape and grads[5].shape == flat.shape


def test_gradients_are_summed_in_place():
    x, weight, _, A, router, bank = make_inputs((2, 5), "batch")
    x, flat = x.requires_grad_(), bank.reshape(E * R, OUT).requires_grad_()
    routers = (router, router.flip(0), router)
    ys = [lily_linear(x, weight, None, A, r, flat, scaling=0.5, mode="batch") for r in routers]
    with torch.profiler.profile() as prof:
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    names = [e.name for e in prof.events()]
    assert "aten::add" not in names and names.count("aten::add_") >= 4, names  # 2 sums each for x and bank
    ref_x, ref_bank = x.detach().double().requires_grad_(), flat.detach().double().requires_grad_()
    refs = [reference(ref_x, weight, None, A, r, ref_bank.reshape(E, R, OUT), 0.5, "batch", None) for r in routers]
    torch.autograd.backward(refs, [torch.ones_like(y) for y in refs])
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat.grad.double(), ref_bank.grad, atol=1e-5, rtol=1e-5)


def test_no_grad_equals_grad_path():
    x, weight, bias, A, router, bank = make_inputs((3, 4), "batch")
    with torch.no_grad():
        plain = lily_linear(x, weight, bias, A, router, bank, scaling=0.5, mode="batch")
    tracked = lily_linear(x, weight, bias, A.requires_grad_(), router, bank, scaling=0.5, mode="batch")
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)


def test_empty_rows():
    x, weight, bias, A, router, bank = make_inputs((0,), "token")
    leaves = [t.requires_grad_() for t in (x, weight, bias, A, router, bank)]
    y = lily_linear(*leaves, mode="token")
    assert y.shape == (0, OUT)
    y.sum().backward()
    assert float(A.grad.abs().sum()) == 0 and float(bank.grad.abs().sum()) == 0


# Decode: up to 8 rows the CPU op computes the base layer in the same passes over the weights as the
# adapter (lily_layer_forward_rows), not through ATen's linear. Shapes with several tasks per pass
# (rank 40, out 70: tasks of 32 rows of A or W) and vector tails (in = 37); smaller values than
# make_inputs' so that float32 meets the same tolerances at this size.
def decode_inputs(lead, mode, dtype, bias=True, seed=1, adapter_dtype=None, in_=37):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    out, r, e, adt = 70, 40, 3, adapter_dtype or dtype
    router = rnd(e, dt=adt) if mode == "static" else rnd(e, r, scale=0.3, dt=adt)
    return (
        rnd(*lead, in_),
        rnd(out, in_, scale=0.2),
        rnd(out) if bias else None,
        rnd(r, in_, scale=0.2, dt=adt),
        router,
        rnd(e, r, out, scale=0.2, dt=adt),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(1,), (2,), (5,), (8,), (9,), (2, 4), (1, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_rows_match_reference(mode, lead, dtype):
    x, weight, bias, A, router, bank = decode_inputs(lead, mode, dtype, bias=lead != (5,))
    mask = make_mask(lead, mode)
    with torch.no_grad():
        y = lily_linear(x, weight, bias, A, router, bank, scaling=0.7, mode=mode, mask=mask)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y.double(), reference(x, weight, bias, A, router, bank, 0.7, mode, mask), **tol)
    # the autograd forward saves h = x A^T for the backward: gradients through the same path
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, A, router, bank)]
    got = lily_linear(leaves[0], leaves[1], bias, *leaves[2:], scaling=0.7, mode=mode, mask=mask)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(ref_leaves[0], ref_leaves[1], bias, *ref_leaves[2:], 0.7, mode, mask)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got.backward(grad.to(dtype))
    ref.backward(grad)
    for name, a, b in zip(("x", "weight", "A", "router", "bank"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_", [4, 32])  # shorter than a vector (no vector part), a multiple of it (no tail)
def test_decode_rows_half_precision_adapter_and_row_lengths(adapter_dtype, in_):
    # float32 x and W with a half-precision adapter: the adapter computed in float32, as the base
    x, weight, bias, A, router, bank = decode_inputs((3,), "token", torch.float32, adapter_dtype=adapter_dtype, in_=in_)
    leaves = [t.requires_grad_() for t in (x, A, bank)]
    y = lily_linear(x, weight, bias, A, router, bank, scaling=0.7, mode="token")
    assert y.dtype == torch.float32
    want = reference(x.detach(), weight, bias, A.detach(), router, bank.detach(), 0.7, "token", None)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.float32, adapter_dtype, adapter_dtype]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, bias, lead", [(torch.float32, True, (8,)), (torch.float64, False, (2, 4))])
def test_decode_rows_take_no_aten_gemm(mode, dtype, bias, lead):
    x, weight, b, A, router, bank = decode_inputs(lead, mode, dtype, bias=bias)
    mask = make_mask(lead, mode)
    with torch.no_grad(), torch.profiler.profile() as prof:
        lily_linear(x, weight, b, A, router, bank, scaling=0.5, mode=mode, mask=mask)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::linear", "aten::addmm", "aten::mm"}, names
    # 9 rows: the base layer through ATen, as nn.Linear computes it
    x9 = torch.cat([x.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1])[:1]])
    with torch.no_grad(), torch.profiler.profile() as prof:
        lily_linear(x9, weight, b, A, router, bank, scaling=0.5, mode=mode)
    assert "aten::linear" in {e.name for e in prof.events()}


def test_decode_rows_same_bits_alone_batched_and_any_thread_count():
    # Every output element is one dot product and one mix summed in a fixed order: a token's row has
    # the same bits alone, in a batch of 7 (rows 0-3 in the kernel's 4-row tile, 4-6 outside it)
    # and with 1 or 2 threads.
    x, weight, bias, A, router, bank = decode_inputs((7,), "token", torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(lily_linear(x, weight, bias, A, router, bank, scaling=0.5, mode="token"))
                alone = [
                    lily_linear(x[i : i + 1], weight, bias, A, router, bank, scaling=0.5, mode="token")
                    for i in range(7)
                ]
            torch.testing.assert_close(torch.cat(alone), outs[-1], rtol=0, atol=0)
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_decode_rows_with_strided_weight_and_input():
    # a weight that is a transposed view, and an input with gaps: the ATen path, and the decode
    # path on a contiguous copy of x
    x, weight, bias, A, router, bank = decode_inputs((3,), "token", torch.float32)
    wide = torch.zeros(3, 2 * x.shape[1])
    wide[:, ::2] = x
    strided_weight = weight.t().contiguous().t()
    want = reference(x, weight, bias, A, router, bank, 0.5, "token", None)
    for xi, wi in ((wide[:, ::2], weight), (x, strided_weight)):
        with torch.no_grad():
            got = lily_linear(xi, wi, bias, A, router, bank, scaling=0.5, mode="token")
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    lead = (2, 3)
    x, weight, bias, A, router, bank = make_inputs(lead, mode, torch.float64)
    mask = make_mask(lead, mode)
    leaves = tuple(t.requires_grad_() for t in (x, weight, bias, A, router, bank))
    assert torch.autograd.gradcheck(lambda *t: lily_linear(*t, scaling=0.8, mode=mode, mask=mask), leaves)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    lead = (2, 5)
    x, weight, bias, A, router, bank = make_inputs(lead, mode)
    mask = make_mask(lead, mode)
    args = (x, weight, bias, A, router, bank)
    torch.library.opcheck(
        torch.ops.lily.lily_linear.default, (*(t.clone().requires_grad_() for t in args), 0.5, mode, mask)
    )
    torch.library.opcheck(torch.ops.lily.lily_linear.default, (*args, 0.5, mode, mask))
    torch.library.opcheck(torch.ops.lily.lily_linear_forward.default, (*args, 0.5, mode, mask))
    _, hidden = torch.ops.lily.lily_linear_forward(*args, 0.5, mode, mask)
    grad = torch.randn(*lead, OUT)
    for needs in ([True, True, True, True], [True, False, False, True], [False, False, False, False]):
        torch.library.opcheck(
            torch.ops.lily.lily_linear_backward.default,
            (grad, x, hidden, weight, A, router, bank, 0.5, mode, mask, needs),
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(3,), (2, 5), (1, 70)])
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_cuda_composition_matches_cpu_kernels(mode, lead, dtype, adapter_dtype):
    """The CUDA kernels of lily_linear_forward / _backward are a composition (at::linear, the
    routed_mix ops, at::mm) that no GPU runs here; the same code, registered as
    lily::_lily_linear_*_composed for every device, must agree with the CPU kernels."""
    x, weight, bias, A, router, bank = make_inputs(lead, mode, dtype, adapter_dtype)
    mask = make_mask(lead, mode)
    args = (x, weight, bias, A, router, bank, 0.7, mode, mask)
    y, hidden = torch.ops.lily._lily_linear_forward_composed(*args)
    y_cpu, hidden_cpu = torch.ops.lily.lily_linear_forward(*args)
    assert (y.dtype, hidden.dtype) == (dtype, adapter_dtype)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.double(), reference(*args).double(), **tol)
    torch.testing.assert_close(y, y_cpu, **tol)
    torch.testing.assert_close(hidden, hidden_cpu, **tol)
    grad = torch.randn(*lead, OUT, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    for needs in ([True, True, True, True], [False, True, False, True], [True, False, False, False]):
        rest = (weight, A, router, bank, 0.7, mode, mask, needs)
        got = torch.ops.lily._lily_linear_backward_composed(grad, x, hidden, *rest)
        want = torch.ops.lily.lily_linear_backward(grad, x, hidden_cpu, *rest)
        for name, g, w, needed in zip(("x", "weight", "bias", "A", "router", "bank"), got, want, needs + [True] * 2):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            if needed:
                torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    lead = (2, 6)
    inputs = make_inputs(lead, mode)
    mask = make_mask(lead, mode)

    def layer(*t):
        return torch.tanh(lily_linear(*t, scaling=0.5, mode=mode, mask=mask)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if mode == "token" else "aot_eager")
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss, *(t.grad for t in leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_autocast_runs_in_autocast_dtype():
    x, weight, bias, A, router, bank = make_inputs((2, 3), "token")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lily_linear(x, weight, bias, A, router, bank, mode="token")
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), "weight: expected shape [out, in]"),
        (lambda a: a.update(bias=a["bias"][:-1]), "bias: expected shape"),
        (lambda a: a.update(A=a["A"][:, :-1]), "A: expected shape [r, in]"),
        (lambda a: a.update(bank=a["bank"][:, :-1]), "bank: expected shape [E, r, out]"),
        (lambda a: a.update(bank=a["bank"].reshape(E * R, OUT)[:-1]), "bank: expected shape [E, r, out]"),
        (lambda a: a.update(router=a["router"][:, :-1]), "router: expected shape [E, r]"),
        (lambda a: a.update(weight=a["weight"].double()), "weight: dtype torch.float64 differs from x's"),
        (lambda a: a.update(router=a["router"].double()), "router: dtype torch.float64 differs from A's"),
        (lambda a: a.update(mode="nope"), "mode: expected one of"),
        (lambda a: a.update(mask=torch.ones(2, 3, dtype=torch.bool)), "mask: only modes"),
        (lambda a: a.update(scaling=float("nan")), "scaling: expected a finite float"),
    ],
)
def test_bad_inputs_eager_and_fake(change, message):
    x, weight, bias, A, router, bank = make_inputs((2, 3), "token")
    args = dict(x=x, weight=weight, bias=bias, A=A, router=router, bank=bank, scaling=0.5, mode="token", mask=None)
    change(args)
    values = list(args.values())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.lily.lily_linear(*values)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            torch.ops.lily.lily_linear(*fake)


# ---- LilyLinear uses it ---------------------------------------------------------------------------


def lily_llama(routing, r=8, num_B=3):
    model = get_lily_model(
        tiny_llama(layers=2, hidden=32),
        LilyConfig(r=r, stride_A=2, num_B=num_B, target_modules=["q_proj", "v_proj", "down_proj"], routing=routing),
    )
    with torch.no_grad():
        for _, layer in model.lily_layers():
            layer.lily_B["default"].weight.normal_(std=0.2)
    return model


@pytest.mark.parametrize("routing", ["batch", "token", "static", "sequence", "causal"])
def test_model_fused_equals_composed(routing):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lily_llama(routing)
    ids = token_batch(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    results = []
    for fused in (False, True):
        with fused_layers(fused):
            model.zero_grad(set_to_none=True)
            out = model(**kwargs)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.logits.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_layer_calls_the_fused_op_once_per_layer():
    model = lily_llama("token").eval()
    ids = token_batch(1, 4)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(input_ids=ids)
    names = [e.name for e in prof.events()]
    assert names.count("lily::lily_linear") == len(list(model.lily_layers()))
    assert "lily::routed_mix" not in names


def test_generation_with_cache_matches_composed():
    import warnings

    for routing in ("token", "causal"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lily_llama(routing).eval()
        ids = token_batch(2, 5)
        outs = []
        for fused in (False, True):
            with fused_layers(fused), torch.no_grad():
                outs.append(
                    model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=4,
                        do_sample=False,
                        output_scores=True,
                        return_dict_in_generate=True,
                        pad_token_id=0,
                    )
                )
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        for a, b in zip(outs[0].scores, outs[1].scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_switches_and_state_changes():
    model = lily_llama("static").eval()
    ids = token_batch(1, 4)
    with torch.no_grad():
        base = model.model(input_ids=ids).logits  # the wrapped model, adapters on
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert not torch.allclose(base, off)
    torch.testing.assert_close(again, base, rtol=0, atol=0)
    torch.testing.assert_close(merged, base, atol=1e-5, rtol=1e-5)
    assert lily_ext.set_fused_layers(True) == "auto"  # the default
    assert lily_ext.set_fused_layers("inference") is True
    assert lily_ext.set_fused_layers("auto") == "inference"
    with pytest.raises(ValueError, match="set_fused_layers: expected True, False, 'auto' or 'inference'"):
        lily_ext.set_fused_layers("yes")


def _lily_ops_in_a_training_step(model, ids):
    with torch.profiler.profile() as prof:
        model(input_ids=ids).logits.sum().backward()
    names = [e.name for e in prof.events()]
    return names.count("lily::lily_linear"), names.count("lily::routed_mix")


def test_cpu_training_takes_the_fused_op_by_default():
    model = lily_llama("token").train()
    ids = token_batch(1, 4)
    layers = len(list(model.lily_layers()))
    fused, composed = _lily_ops_in_a_training_step(model, ids)
    assert fused >= layers and composed == 0
    with fused_layers("inference"):  # training keeps the separate ops
        fused, composed = _lily_ops_in_a_training_step(model, ids)
    assert fused == 0 and composed >= layers
    with fused_layers(True):
        fused, composed = _lily_ops_in_a_training_step(model, ids)
    assert fused >= layers and composed == 0


def test_fused_and_composed_training_steps_agree():
    """The default CPU training path (fused) and the composed ops give the same loss and gradients."""
    ids = token_batch(2, 6)
    grads = []
    for setting in ("auto", False):
        model = lily_llama("token").train()
        with fused_layers(setting):
            model(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_torch_compile_fullgraph_of_a_fresh_wrapped_model(routing):
    """The layers' cached arguments are built inside the compiled region (first call): no graph break."""
    from helpers.lily_models import lily_net

    model = lily_net(routing).train()
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with fused_layers(True):  # training: fused only when asked
        out = compiled(x, attention_mask=mask)
        out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with fused_layers(False):
        ref = model(x, attention_mask=mask)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)
