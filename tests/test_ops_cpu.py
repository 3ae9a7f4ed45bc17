"""lily::routed_mix on the CPU against the independent float64 reference (tests/helpers/reference.py)."""

import pytest
import torch
from helpers.reference import routed_mix_reference
from helpers.shapes import SHAPES, TOL, make_inputs, rel_err, shape_id

import lily_ext  # noqa: F401  (loads torch.ops.lily)
from lily_ext.ops import MODES, routed_mix


def check_forward_and_grads(hidden, router, bank, mode, scaling=0.7, mask=None, tol=None):
    tol = tol or TOL[hidden.dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, router, bank)]
    out = routed_mix(*leaves, scaling=scaling, mode=mode, mask=mask)
    ref_leaves = [t.detach().double().requires_grad_() for t in (hidden, router, bank)]
    ref = routed_mix_reference(*ref_leaves, scaling=scaling, mode=mode, mask=mask)
    assert out.shape == ref.shape and out.dtype == hidden.dtype
    assert rel_err(out, ref) <= tol, f"forward error {rel_err(out, ref):.2e}"
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * grad).sum().backward()
    (ref * grad).sum().backward()
    for name, mine, theirs in zip(("hidden", "router", "bank"), leaves, ref_leaves):
        expected = theirs.grad if theirs.grad is not None else torch.zeros_like(theirs)
        assert mine.grad is not None and mine.grad.dtype == hidden.dtype, name
        assert rel_err(mine.grad, expected) <= tol * 4, f"d{name} error {rel_err(mine.grad, expected):.2e}"
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_reference(mode, shape, dtype):
    lead, E, r, out = shape
    hidden, router, bank = make_inputs(lead, E, r, out, mode, dtype)
    check_forward_and_grads(hidden, router, bank, mode)


@pytest.mark.parametrize("mode", MODES)
def test_float16_inputs_computed_in_float32(mode):
    hidden, router, bank = make_inputs((5, 6), 3, 8, 20, mode, torch.float16)
    check_forward_and_grads(hidden, router, bank, mode)


@pytest.mark.parametrize("mode", ["token", "sequence", "causal"])
def test_per_row_path_spans_several_row_chunks(mode):
    # more rows than one (W kron h) chunk holds; 2-D input: one token per sequence sample
    hidden, router, bank = make_inputs((2100,), 2, 4, 8, mode, torch.float64)
    check_forward_and_grads(hidden, router, bank, mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    E, r, out, N = 3, 6, 10, 9
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(r, N, generator=g, dtype=torch.float64).T  # transposed view
    bank = torch.randn(E, r, 2 * out, generator=g, dtype=torch.float64)[..., ::2]  # strided slice
    router = (
        torch.randn(E, generator=g, dtype=torch.float64)[::1]
        if mode == "static"
        else torch.randn(r, E, generator=g, dtype=torch.float64).T
    )
    assert not hidden.is_contiguous() and not bank.is_contiguous()
    check_forward_and_grads(hidden, router, bank, mode)


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_leading_dims(mode):
    # an expanded (stride-0) batch dim: autograd must sum the gradient back into the base
    E, r, out = 3, 5, 7
    base = torch.randn(1, 4, r, dtype=torch.float64, requires_grad=True)
    _, router, bank = make_inputs((1,), E, r, out, mode, torch.float64)
    out_mine = routed_mix(base.expand(3, 4, r), router, bank, mode=mode)
    ref_base = base.detach().clone().requires_grad_()
    out_ref = routed_mix_reference(ref_base.expand(3, 4, r), router, bank, mode=mode)
    assert rel_err(out_mine, out_ref) < 1e-12
    out_mine.sum().backward()
    out_ref.sum().backward()
    assert rel_err(base.grad, ref_base.grad) < 1e-12


def test_sequence_mask_dtypes_and_fully_masked_sample():
    hidden, router, bank = make_inputs((4, 6), 3, 8, 12, "sequence", torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool
    )
    out = check_forward_and_grads(hidden, router, bank, "sequence", mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2])), "a fully masked sample must get a zero delta"
    for other in (mask.long(), mask.float(), mask.to(torch.uint8)):
        assert torch.equal(routed_mix(hidden, router, bank, scaling=0.7, mode="sequence", mask=other), out)
    # masked tokens do not influence routing: changing them only changes their own rows
    poked = hidden.clone()
    poked[1, 4] += 100.0
    moved = routed_mix(poked, router, bank, scaling=0.7, mode="sequence", mask=mask)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[1, 4] = False
    assert torch.allclose(moved[keep], out[keep], rtol=0, atol=1e-12)


def test_fully_masked_batch_has_finite_grads():
    hidden, router, bank = make_inputs((2, 3), 2, 4, 5, "sequence", torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, router, bank)]
    out = routed_mix(*leaves, mode="sequence", mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_mode_is_batch_invariant(padding):
    # a sample alone gives the same delta as inside a padded batch, for its real tokens
    E, r, out = 4, 8, 16
    g = torch.Generator().manual_seed(5)
    router = torch.randn(E, r, generator=g)
    bank = torch.randn(E, r, out, generator=g)
    lengths = [5, 9, 2]
    samples = [torch.randn(n, r, generator=g) for n in lengths]
    L = max(lengths)
    batch = torch.zeros(len(lengths), L, r)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, (x, n) in enumerate(zip(samples, lengths)):
        rows = slice(L - n, L) if padding == "left" else slice(0, n)
        batch[b, rows] = x
        mask[b, rows] = True
    together = routed_mix(batch, router, bank, mode="sequence", mask=mask)
    for b, x in enumerate(samples):
        alone = routed_mix(x[None], router, bank, mode="sequence")[0]
        torch.testing.assert_close(together[b][mask[b]], alone)


@pytest.mark.parametrize("out", [40, 1100])
def test_token_mode_rows_do_not_depend_on_the_batch(out):
    # a token's delta has the same bits alone and among 2, 7 or 39 others: up to 8 rows the
    # mix reads the bank row by row (gemm_stream), beyond it the register-tiled gemm_small
    # does; both sum over k in one order. out = 1100: several column pieces per thread.
    E, r = 4, 64
    g = torch.Generator().manual_seed(7)
    router = torch.randn(E, r, generator=g)
    bank = torch.randn(E, r, out, generator=g)
    batch = torch.randn(40, r, generator=g)
    together = routed_mix(batch, router, bank, mode="token")
    for n in (1, 3, 8):
        assert torch.equal(routed_mix(batch[:n], router, bank, mode="token"), together[:n]), n


# ---- causal ------------------------------------------------------------------------------------


def test_causal_mask_left_padding_and_fully_masked_sample():
    hidden, router, bank = make_inputs((4, 6), 3, 8, 12, "causal", torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool
    )
    out = check_forward_and_grads(hidden, router, bank, "causal", mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2])), "a fully masked sample must get a zero delta"
    assert torch.equal(out[3, :2], torch.zeros_like(out[3, :2])), "tokens before the first unmasked one: zero delta"
    assert out[1, 2].abs().sum() > 0, "a masked token after unmasked ones gets the running mean of those"
    for other in (mask.long(), mask.float(), mask.to(torch.uint8)):
        assert torch.equal(routed_mix(hidden, router, bank, scaling=0.7, mode="causal", mask=other), out)


@pytest.mark.parametrize("L", [1, 7, 70])
def test_causal_never_sees_the_future(L):
    # changing token t changes no row before t, in the forward and in every gradient
    hidden, router, bank = make_inputs((3, L), 4, 6, 9, "causal", torch.float64)
    out = routed_mix(hidden, router, bank, mode="causal")
    for t in sorted({0, L // 2, L - 1}):
        poked = hidden.clone()
        poked[:, t] += 3.0
        moved = routed_mix(poked, router, bank, mode="causal")
        assert torch.equal(moved[:, :t], out[:, :t])
        assert (moved[:, t:] - out[:, t:]).abs().amax() > 0
    leaves = hidden.clone().requires_grad_()
    routed_mix(leaves, router, bank, mode="causal")[:, : L // 2 + 1].sum().backward()
    assert torch.equal(leaves.grad[:, L // 2 + 1 :], torch.zeros_like(leaves.grad[:, L // 2 + 1 :]))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_causal_mode_is_batch_invariant(padding):
    E, r, out = 4, 8, 16
    g = torch.Generator().manual_seed(6)
    router = torch.randn(E, r, generator=g)
    bank = torch.randn(E, r, out, generator=g)
    lengths = [5, 9, 1]
    samples = [torch.randn(n, r, generator=g) for n in lengths]
    L = max(lengths)
    batch = torch.randn(len(lengths), L, r, generator=g)  # padding rows hold noise: they must not matter
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, (x, n) in enumerate(zip(samples, lengths)):
        rows = slice(L - n, L) if padding == "left" else slice(0, n)
        batch[b, rows] = x
        mask[b, rows] = True
    together = routed_mix(batch, router, bank, mode="causal", mask=mask)
    for b, x in enumerate(samples):
        alone = routed_mix(x[None], router, bank, mode="causal")[0]
        torch.testing.assert_close(together[b][mask[b]], alone, rtol=1e-5, atol=1e-6)


def test_causal_last_row_equals_sequence_mode():
    # the running mean at the last token is the whole-sample mean: causal's last row is sequence's
    hidden, router, bank = make_inputs((3, 8), 3, 5, 7, "causal", torch.float64)
    mask = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    causal = routed_mix(hidden, router, bank, mode="causal", mask=mask)
    sequence = routed_mix(hidden, router, bank, mode="sequence", mask=mask)
    torch.testing.assert_close(causal[:, -1], sequence[:, -1], rtol=1e-12, atol=1e-12)


def test_batch_mode_is_batch_dependent():
    # PEFT's semantics, kept on purpose: the mixing weights are a mean over the whole call
    hidden, router, bank = make_inputs((4, 5), 2, 4, 6, "batch")
    alone = routed_mix(hidden[:1], router, bank, mode="batch")
    together = routed_mix(hidden, router, bank, mode="batch")
    assert not torch.allclose(alone, together[:1])


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    hidden, router, bank = make_inputs((2, 5), 3, 4, 6, mode, torch.float32)
    mask = (
        torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool) if mode in ("sequence", "causal") else None
    )
    args = (hidden.requires_grad_(), router.requires_grad_(), bank.requires_grad_(), 0.5, mode, mask)
    torch.library.opcheck(torch.ops.lily.routed_mix.default, args)
    grad = torch.randn(2, 5, 6)
    torch.library.opcheck(
        torch.ops.lily.routed_mix_backward.default, (grad, *(t.detach() for t in args[:3]), 0.5, mode, mask)
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    hidden, router, bank = make_inputs((3, 4), 3, 5, 6, mode, torch.float64)
    mask = (
        torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
        if mode in ("sequence", "causal")
        else None
    )
    leaves = tuple(t.requires_grad_() for t in (hidden, router, bank))
    assert torch.autograd.gradcheck(lambda h, R, B: routed_mix(h, R, B, scaling=0.8, mode=mode, mask=mask), leaves)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    hidden, router, bank = make_inputs((2, 6), 3, 8, 10, mode)
    mask = (
        torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        if mode in ("sequence", "causal")
        else None
    )

    def layer(h, R, B):
        return torch.tanh(routed_mix(h * 2.0, R, B, scaling=0.5, mode=mode, mask=mask)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if mode == "batch" else "aot_eager")
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, router, bank)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss, *(t.grad for t in leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_torch_compile_sees_no_graph_break():
    hidden, router, bank = make_inputs((2, 6), 3, 8, 10, "token")
    explanation = torch._dynamo.explain(lambda h: routed_mix(h, router, bank, mode="token") + 1)(hidden)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ---- bad input -----------------------------------------------------------------------------

E_, R_, OUT_ = 3, 4, 5


def _good(mode="batch"):
    return make_inputs((2, 6), E_, R_, OUT_, mode)


BAD_INPUTS = [
    # (description, builder -> (hidden, router, bank, kwargs), error type, message pattern)
    ("0-dim hidden", lambda: (torch.tensor(1.0), *_good()[1:], {}), ValueError, "hidden: .*0-dim"),
    (
        "hidden r mismatch",
        lambda: (torch.randn(2, R_ + 1), *_good()[1:], {}),
        ValueError,
        "hidden: last dim must equal bank's r",
    ),
    (
        "router wrong shape",
        lambda: (_good()[0], torch.randn(E_, R_ + 2), _good()[2], {}),
        ValueError,
        r"router: expected shape \[E, r\]",
    ),
    (
        "router E mismatch",
        lambda: (_good()[0], torch.randn(E_ + 1, R_), _good()[2], {}),
        ValueError,
        "router: expected shape",
    ),
    (
        "theta given to batch",
        lambda: (_good()[0], torch.randn(E_), _good()[2], {}),
        ValueError,
        "router: expected shape",
    ),
    (
        "router given to static",
        lambda: (*_good()[:3], {"mode": "static"}),
        ValueError,
        "router: static mode expects theta",
    ),
    (
        "bank 2-D",
        lambda: (_good()[0], _good()[1], torch.randn(R_, OUT_), {}),
        ValueError,
        "bank: expected a 3-D tensor",
    ),
    ("bank empty out", lambda: (_good()[0], _good()[1], torch.randn(E_, R_, 0), {}), ValueError, "bank: every dim"),
    ("num_B < 2", lambda: (_good()[0], torch.randn(1, R_), torch.randn(1, R_, OUT_), {}), ValueError, "num_B = E >= 2"),
    ("unknown mode", lambda: (*_good(), {"mode": "tokens"}), ValueError, "mode: expected one of"),
    (
        "mixed dtypes",
        lambda: (_good()[0], _good()[1].double(), _good()[2], {}),
        ValueError,
        "router: dtype torch.float64 differs",
    ),
    ("bank dtype", lambda: (*_good()[:2], _good()[2].double(), {}), ValueError, "bank: dtype"),
    ("integer hidden", lambda: (_good()[0].long(), *_good()[1:], {}), ValueError, "hidden: expected dtype"),
    ("mixed devices", lambda: (*_good()[:2], _good()[2].to("meta"), {}), ValueError, "bank: on device meta"),
    (
        "mask wrong shape",
        lambda: (*_good("sequence"), {"mode": "sequence", "mask": torch.ones(2, 5)}),
        ValueError,
        r"mask: expected shape \[2, 6\]",
    ),
    (
        "mask outside sequence",
        lambda: (*_good(), {"mask": torch.ones(2, 6)}),
        ValueError,
        "mask: only modes 'sequence' and 'causal'",
    ),
    (
        "causal mask wrong shape",
        lambda: (*_good("causal"), {"mode": "causal", "mask": torch.ones(6, 2)}),
        ValueError,
        r"mask: expected shape \[2, 6\]",
    ),
    (
        "causal with theta",
        lambda: (_good()[0], torch.randn(E_), _good()[2], {"mode": "causal"}),
        ValueError,
        r"router: expected shape \[E, r\]",
    ),
    (
        "causal num_B < 2",
        lambda: (_good()[0], torch.randn(1, R_), torch.randn(1, R_, OUT_), {"mode": "causal"}),
        ValueError,
        "mode 'causal' routes between experts",
    ),
    ("scaling nan", lambda: (*_good(), {"scaling": float("nan")}), ValueError, "scaling: expected a finite float"),
    ("scaling str", lambda: (*_good(), {"scaling": "1"}), ValueError, "scaling"),
    ("hidden not a tensor", lambda: ([1.0] * R_, *_good()[1:], {}), RuntimeError, "for argument 'hidden'"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_python_entry_point(case):
    _, build, error, pattern = case
    hidden, router, bank, kwargs = build()
    with pytest.raises(error, match=pattern):
        routed_mix(hidden, router, bank, **kwargs)


@pytest.mark.parametrize(
    "case", [c for c in BAD_INPUTS if c[0] != "scaling str" and c[2] is ValueError], ids=lambda c: c[0]
)
def test_bad_input_raw_op(case):
    # direct torch.ops callers get the C++ checks (same contract, csrc/lily/contract.h)
    _, build, error, pattern = case
    hidden, router, bank, kwargs = build()
    with pytest.raises(error, match=pattern):
        torch.ops.lily.routed_mix.default(
            hidden, router, bank, kwargs.get("scaling", 1.0), kwargs.get("mode", "batch"), kwargs.get("mask")
        )


def test_bad_grad_shape_for_backward_op():
    hidden, router, bank = _good()
    with pytest.raises(ValueError, match=r"grad: expected shape \[2, 6, 5\]"):
        torch.ops.lily.routed_mix_backward.default(torch.randn(2, 6, 4), hidden, router, bank, 1.0, "batch", None)
