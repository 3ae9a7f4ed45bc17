"""freeze_router: turn data-dependent routing into a static (mergeable) adapter from calibration data;
tune_static: a few optimizer steps on the frozen static parameters (recovery fine-tuning).

Per layer, with ``h = A x`` ([N, r]) and ``d`` the dynamic adapter's output ([N, out]) on the
calibration tokens (padding excluded), a static adapter gives ``s h Bc`` for one ``Bc [r, out]``.
Its squared error is a quadratic in ``Bc`` that depends on the data only through

    H = sum_n h_n^T h_n  [r, r],    Y = sum_n h_n^T d_n  [r, out],    D = sum_n |d_n|^2,
    err(Bc) = s^2 <Bc, H Bc> - 2 s <Bc, Y> + D,

so one streamed pass accumulates them (float64, per layer) and every method is solved and scored
from them (docs/DESIGN.md, "Merging a dynamic router well").

Lily v2 (a routed A bank): per token the A experts' projections ``p_na = x_n A_a^T`` ([num_A, r]),
the dynamic ``h_n`` and ``d_n``. The A side is frozen first, to the convex weights ``v`` whose
``sum_a v_a p_na`` is closest to the dynamic ``h_n`` (``optimal_weights``) or to the mean A-routing
weights (``mean``); then the B side as above on ``h = sum_a v_a p_na``, whose ``H`` and ``Y`` follow
from ``P = sum_n q_n^T q_n`` and ``PY = sum_n q_n^T d_n`` (``q_n = p_n`` flattened, ``[num_A * r]``),
so one pass still suffices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .model import LilyModel
from .ops import routed_mix
from .optim import adamw

METHODS = ("mean", "optimal_weights", "optimal_bc")
METHODS_A = ("mean", "optimal_weights")  # Lily v2's A side (an arbitrary [r, in] Ac would need [in, in] sums)
DEFAULT_METHOD = "optimal_bc"
DEFAULT_RIDGE = 1e-3


class FreezeReport(dict):
    """``freeze_router``'s result: layer path -> that layer's report (a dict), plus the attributes
    ``method``, ``ridge`` and ``tune_losses`` (the recovery fine-tuning losses, ``[]`` when none)."""

    def __init__(self, layers: dict, method: str, ridge: float, tune_losses: list[float]):
        super().__init__(layers)
        self.method = method
        self.ridge = ridge
        self.tune_losses = tune_losses


def _call(model: LilyModel, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"batches: each item must be a tuple of positional arguments or a dict of keyword arguments, got {type(batch).__name__}"
    )


def _token_mask(layer, hidden):
    mask = layer.sequence_mask(hidden)
    if mask is None:
        return torch.ones(hidden.shape[:-1], dtype=torch.float64, device=hidden.device)
    return (mask != 0).to(torch.float64)


def _check_adapter(model, adapter_name):
    if not isinstance(model, LilyModel):
        raise TypeError(f"model: expected a lily_ext.LilyModel, got {type(model).__name__}")
    name = adapter_name or model.active_adapter
    if name not in model.configs:
        raise ValueError(f"adapter_name: no adapter {name!r} (have: {', '.join(model.configs) or 'none'})")
    layers = {path: m for path, m in model.lily_layers() if name in m.r}
    if not layers:
        raise ValueError(f"model: no Lily layer holds adapter {name!r}")
    return name, layers


def _iterable(batches, what: str):
    """An iterator over ``batches`` (a list, a DataLoader, a generator...), or a TypeError naming ``what``."""
    if not isinstance(batches, (torch.Tensor, str, bytes, dict)):
        try:
            return iter(batches)
        except TypeError:
            pass
    raise TypeError(f"{what}: expected an iterable of batches (tuples or dicts), got {type(batches).__name__}")


def _check_steps(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: expected a non-negative int, got {value!r}")
    return value


def _check_lr(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: expected a finite float > 0, got {value!r}")
    return float(value)


# ---- the static replacements, from the streamed statistics -------------------------------------------------


@dataclasses.dataclass
class _Stats:
    """Float64 sums over one layer's unmasked calibration tokens."""

    probs: torch.Tensor  # sum_n P_n [E]
    count: float  # number of tokens
    H: torch.Tensor  # sum_n h_n^T h_n [r, r]  (Lily v2: sum_n q_n^T q_n [num_A * r, num_A * r])
    Y: torch.Tensor  # sum_n h_n^T d_n [r, out]  (Lily v2: sum_n q_n^T d_n [num_A * r, out])
    D: float  # sum_n |d_n|^2
    # Lily v2 only: the A side
    probs_A: torch.Tensor | None = None  # sum_n of the A router's probabilities [num_A]
    c_A: torch.Tensor | None = None  # sum_n <p_na, h_n> [num_A]
    D_A: float = 0.0  # sum_n |h_n|^2


def _solve_a_side(layer, name: str, stats: _Stats, method_A: str) -> dict:
    """Lily v2: the static A-side weights ``v`` ([num_A]) for ``method_A``, every A method's relative
    error ``|sum_a v_a p_a - h| / |h|``, and the B-side statistics ``H``, ``Y`` under the chosen ``v``
    (and under the mean weights)."""
    num_A, r = layer.num_A[name], layer.r[name]
    P = stats.H.view(num_A, r, num_A, r)
    G = torch.einsum("aibi->ab", P)  # sum_n <p_na, p_nb>
    if name in layer.lily_theta_A:  # already static: nothing to choose
        fixed = torch.softmax(layer.lily_theta_A[name].detach().double(), dim=0).to(G)
        weights = {"mean": fixed, "optimal_weights": fixed}
    else:
        mean = stats.probs_A / stats.count
        best = optimal_mixing_weights(G.cpu().numpy(), stats.c_A.cpu().numpy(), mean.cpu().numpy())
        weights = {"mean": mean, "optimal_weights": torch.from_numpy(best).to(G)}

    def error(v):
        squared = max(float(v @ G @ v - 2 * (v @ stats.c_A)) + stats.D_A, 0.0)
        return math.sqrt(squared / stats.D_A) if stats.D_A > 0 else 0.0

    def b_stats(v):
        V = torch.kron(v.unsqueeze(1), torch.eye(r, dtype=v.dtype, device=v.device))  # [num_A * r, r]
        return _Stats(stats.probs, stats.count, V.T @ stats.H @ V, V.T @ stats.Y, stats.D)

    return {
        "weights": weights[method_A],
        "mean": weights["mean"],
        "errors": {m: error(weights[m]) for m in METHODS_A},
        "stats": b_stats(weights[method_A]),
        "stats_mean": b_stats(weights["mean"]),
    }


def _squared_error(stats: _Stats, scaling: float, combined: torch.Tensor) -> float:
    """sum_n |s h_n Bc - d_n|^2 from the sums (float64; clamped at 0 against rounding)."""
    quadratic = (combined * (stats.H @ combined)).sum() * scaling**2
    linear = (combined * stats.Y).sum() * scaling
    return max(float(quadratic - 2 * linear) + stats.D, 0.0)


def _project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = k[u - cumulative / k > 0][-1]
    return np.maximum(v - cumulative[rho - 1] / rho, 0.0)


def _face_minimiser(Q: np.ndarray, b: np.ndarray, support: np.ndarray) -> np.ndarray:
    """The minimiser of ``q`` on the affine hull of the face ``{w_i = 0 outside support, sum w = 1}``
    (the KKT system, least-squares when ``Q`` is singular there)."""
    n = int(support.sum())
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = 2 * Q[np.ix_(support, support)]
    kkt[:n, n] = -1.0
    kkt[n, :n] = 1.0
    solution = np.linalg.lstsq(kkt, np.concatenate([2 * b[support], [1.0]]), rcond=None)[0]
    w = np.zeros(len(b))
    w[support] = solution[:n]
    return w


def optimal_mixing_weights(Q: np.ndarray, b: np.ndarray, start: np.ndarray) -> np.ndarray:
    """argmin over the simplex ``{w >= 0, sum w = 1}`` of ``q(w) = w^T Q w - 2 b^T w`` (``Q`` symmetric
    positive semidefinite), in float64. Up to 12 experts exactly: the best feasible face minimiser over
    every support (the optimum is one; 4095 small solves at most). Beyond, accelerated projected
    gradient from ``start`` with restarts, then the face minimiser on the support it found. Never
    returns a point worse than ``start``."""
    Q, b = np.asarray(Q, dtype=np.float64), np.asarray(b, dtype=np.float64)
    Q = (Q + Q.T) / 2
    E = len(b)

    def q(w):
        return float(w @ Q @ w - 2 * b @ w)

    best = np.asarray(start, dtype=np.float64)
    best_value = q(best)
    scale = max(float(np.abs(Q).max()), float(np.abs(b).max()), 1e-300)
    candidates = []
    if E <= 12:
        for bits in range(1, 2**E):
            support = np.array([(bits >> i) & 1 for i in range(E)], dtype=bool)
            candidates.append(_face_minimiser(Q, b, support))
    else:
        lipschitz = 2 * float(np.linalg.eigvalsh(Q).max())
        w, y, t, value = best.copy(), best.copy(), 1.0, best_value
        for _ in range(5000 if lipschitz > 0 else 0):
            w_next = _project_to_simplex(y - 2 * (Q @ y - b) / lipschitz)
            next_value = q(w_next)
            if next_value > value:  # restart the momentum from the last iterate
                y, t = w.copy(), 1.0
                continue
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = w_next + (t - 1) / t_next * (w_next - w)
            converged = value - next_value <= 1e-15 * scale
            w, t, value = w_next, t_next, next_value
            if converged:
                break
        candidates += [w, _face_minimiser(Q, b, w > 1e-12)]
    for w in candidates:
        if w.min() >= -1e-12 and abs(w.sum() - 1) < 1e-9:
            w = np.maximum(w, 0.0)
            w = w / w.sum()
            value = q(w)
            if value < best_value:
                best, best_value = w, value
    return best


def optimal_combined_bank(stats: _Stats, scaling: float, anchor: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_Bc err(Bc) + lam |Bc - anchor|_F^2`` with ``lam = ridge * s^2 * trace(H) / r``:
    ``Bc = anchor + (s^2 H + lam I)^-1 (s Y - s^2 H anchor)`` in float64 (the minimum-norm
    correction when ``lam = 0`` and ``H`` is singular). Directions the calibration tokens do not
    reach keep the anchor (the mean-weights bank)."""
    H = stats.H
    r = H.shape[0]
    s2 = scaling**2
    lam = ridge * s2 * float(torch.trace(H)) / r
    system = s2 * H + lam * torch.eye(r, dtype=H.dtype, device=H.device)
    rhs = scaling * stats.Y - s2 * (H @ anchor)
    if lam > 0:
        correction = torch.linalg.solve(system, rhs)
    else:
        correction = torch.linalg.pinv(system, hermitian=True) @ rhs
    return anchor + correction


def _solve_layer(layer, name: str, stats: _Stats, method: str, ridge: float, method_A: str | None = None) -> dict:
    """Every method's static replacement and its error on the calibration tokens (Lily v2: the A
    side's first, then the B side's given it; a B side that is static already is kept)."""
    a_side = None
    if layer.is_v2(name):
        a_side = _solve_a_side(layer, name, stats, method_A)
        stats_mean = a_side["stats_mean"]
        stats = a_side["stats"]
    scaling = layer.scaling[name]
    if layer.routing[name] == "static":  # (Lily v2 with only the A router dynamic) the B side stays
        combined = layer.combined_bank(name).to(stats.H)
        norm = math.sqrt(stats.D)
        error = math.sqrt(_squared_error(stats, scaling, combined)) / norm if norm > 0 else 0.0
        return {
            "combined": combined,
            "weights": None,
            "mean": None,
            "errors": {"static": error},
            "error": error,
            "error_mean": error,
            "keep_B": True,
            "A": a_side,
        }
    bank = layer.bank(name).detach().to(device=stats.H.device, dtype=torch.float64)
    mean = stats.probs / stats.count
    combined = {"mean": torch.einsum("e,eio->io", mean, bank)}
    weights = {"mean": mean}
    G = torch.einsum("eio,ij,fjo->ef", bank, stats.H, bank)
    c = torch.einsum("eio,io->e", bank, stats.Y)
    w = optimal_mixing_weights((scaling**2 * G).cpu().numpy(), (scaling * c).cpu().numpy(), mean.cpu().numpy())
    weights["optimal_weights"] = torch.from_numpy(w).to(mean)
    combined["optimal_weights"] = torch.einsum("e,eio->io", weights["optimal_weights"], bank)
    combined["optimal_bc"] = optimal_combined_bank(stats, scaling, combined["mean"], ridge)
    weights["optimal_bc"] = None
    norm = math.sqrt(stats.D)
    errors = {m: math.sqrt(_squared_error(stats, scaling, combined[m])) / norm if norm > 0 else 0.0 for m in METHODS}
    error_mean = errors["mean"]
    if a_side is not None:  # "before": the mean weights on both sides
        mean_bc = torch.einsum("e,eio->io", mean, bank)
        error_mean = math.sqrt(_squared_error(stats_mean, scaling, mean_bc)) / norm if norm > 0 else 0.0
    return {
        "combined": combined[method],
        "weights": weights[method],
        "mean": mean,
        "errors": errors,
        "error": errors[method],
        "error_mean": error_mean,
        "keep_B": False,
        "A": a_side,
    }


# ---- freeze_router ----------------------------------------------------------------------------------------


def freeze_router(
    model: LilyModel,
    batches: Iterable,
    adapter_name: str | None = None,
    *,
    method: str = DEFAULT_METHOD,
    ridge: float = DEFAULT_RIDGE,
    tune_batches: Iterable | None = None,
    tune_steps: int = 0,
    tune_lr: float = 1e-3,
    method_A: str | None = None,
) -> FreezeReport:
    """Replaces each layer's router by a static adapter fitted to the dynamic one on ``batches``.

    Each item of ``batches`` is a tuple of positional arguments or a dict of keyword arguments for
    ``model(...)``; tokens the ``attention_mask`` marks as padding are left out. The batches are
    streamed: per layer only ``H = sum h^T h`` ([r, r]), ``Y = sum h^T d`` ([r, out]) and the
    routing-probability sums are kept (float64). ``method`` chooses, per layer, the static
    replacement whose output ``s h Bc`` has the least squared error against the dynamic output ``d``:

    - ``"mean"``: the mean routing weights over the calibration tokens (``theta = log w``);
    - ``"optimal_weights"``: the convex mixing weights of the bank with the least error (a small
      quadratic program over the simplex, float64);
    - ``"optimal_bc"`` (default): the least-squares ``Bc`` over all ``[r, out]`` matrices, ridge-
      regularised towards the mean-weights bank (``ridge`` is relative to ``trace(H) / r``). The
      layer then holds its own ``lily_Bc`` (which checkpoint format 1 cannot save; the merged
      export and every ONNX form can).

    The adapter becomes ``routing="static"`` (mergeable). With ``tune_steps > 0`` the static
    parameters are then trained on ``tune_batches`` (labelled: see ``tune_static``).

    Lily v2 (``num_A``): both routers are frozen, the A side first: ``method_A`` ``"mean"`` (the mean
    A-routing weights) or ``"optimal_weights"`` (the convex mix of the A bank whose projection is
    closest to the dynamic ``h``); by default ``"mean"`` when ``method`` is ``"mean"``, else
    ``"optimal_weights"``. Then the B side by ``method``, fitted to the dynamic output given the
    frozen A side. (A free ``[r, in]`` A, the A-side analogue of ``optimal_bc``, is not offered: it
    would need ``[in, in]`` statistics per layer.) Each v2 layer's report has an ``"A"`` entry:
    ``method``, ``relative_error`` (``|h_static - h| / |h|``), ``relative_errors``, ``weights`` (mean
    A-routing weights) and ``static_weights``; the layer's ``relative_error`` is end to end.

    Returns a ``FreezeReport``: per layer path, ``relative_error`` (``|d_static - d| / |d|`` over
    the calibration tokens, for ``method``), ``relative_error_mean`` (the same for ``"mean"``, the
    error before optimisation), ``relative_errors`` (every method's), ``max_abs_error`` (from a
    second pass over ``batches``; None when ``batches`` is a one-shot iterator), ``weights`` (the
    mean routing weights) and ``static_weights`` (the mixing weights installed; None for
    ``optimal_bc``). Errors are measured before tuning.
    """
    name, layers = _check_adapter(model, adapter_name)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge: expected a finite float >= 0, got {ridge!r}")
    tune_steps = _check_steps(tune_steps, "tune_steps")
    tune_lr = _check_lr(tune_lr, "tune_lr")
    if tune_steps and tune_batches is None:
        raise ValueError("tune_batches: tune_steps > 0 needs labelled batches to train on")
    config = model.configs[name]
    if config.num_A is None:
        if method_A is not None:
            raise ValueError(
                f"method_A: adapter {name!r} has no A router (LilyConfig.num_A is None); method_A applies to Lily v2"
            )
        if config.routing == "static":
            raise ValueError(f"adapter {name!r} already uses static routing; nothing to freeze")
    else:
        if method_A is None:
            method_A = "mean" if method == "mean" else "optimal_weights"
        if method_A not in METHODS_A:
            raise ValueError(
                f"method_A: expected one of {', '.join(map(repr, METHODS_A))} for Lily v2's A side, got {method_A!r}"
                + (
                    " (a free [r, in] A per layer, the A-side analogue of optimal_bc, would need [in, in] statistics "
                    "per layer and is not supported)"
                    if method_A == "optimal_bc"
                    else ""
                )
            )
        if config.routing == "static" and config.routing_A == "static":
            raise ValueError(f"adapter {name!r} already uses static routing on both sides; nothing to freeze")
    reiterable = _iterable(batches, "batches") is not batches

    with torch.no_grad():
        stats, frozen, peaks = _calibrate(model, name, layers, batches, method, float(ridge), reiterable, method_A)
    for path, layer in layers.items():
        solved = frozen[path]
        if solved["A"] is not None and name in layer.lily_router_A:
            layer.set_static_weights_A(name, solved["A"]["weights"])
        if solved["keep_B"]:
            pass
        elif method == "optimal_bc":
            layer.set_static_bank(name, solved["combined"])
        else:
            layer.set_static_weights(name, solved["weights"])
    changes = {"routing": "static"} if config.num_A is None else {"routing": "static", "routing_A": "static"}
    model.configs[name] = dataclasses.replace(config, **changes)
    report = {}
    for path, solved in frozen.items():
        report[path] = {
            "method": method if not solved["keep_B"] else "static",
            "relative_error": solved["error"],
            "relative_error_mean": solved["error_mean"],
            "relative_errors": solved["errors"],
            "max_abs_error": peaks.get(path),
            "weights": None if solved["mean"] is None else solved["mean"].tolist(),
            "static_weights": None if solved["weights"] is None else solved["weights"].tolist(),
        }
        if solved["A"] is not None:
            a_side = solved["A"]
            report[path]["A"] = {
                "method": method_A,
                "relative_error": a_side["errors"][method_A],
                "relative_errors": a_side["errors"],
                "weights": a_side["mean"].tolist(),
                "static_weights": a_side["weights"].tolist(),
            }
    losses = tune_static(model, tune_batches, tune_steps, lr=tune_lr, adapter_name=name) if tune_steps else []
    return FreezeReport(report, method, float(ridge), losses)


def _calibrate(model, name, layers, batches, method, ridge, reiterable, method_A=None):
    previous = model.active_adapter
    model.set_adapter(name)
    was_training = model.training
    model.eval()
    stats: dict[str, _Stats] = {}
    frozen: dict[str, dict] = {}
    peaks: dict[str, float] = {}

    def mix(layer, hidden, router, bank, routing, scaling):
        mask = layer.sequence_mask(hidden, routing) if routing in ("sequence", "causal") else None
        return routed_mix(
            hidden, router.detach().double(), bank.detach().double(), scaling=scaling, mode=routing, mask=mask
        )

    def dynamic_output(layer, x):
        """(the A experts' projections [..., num_A, r] for Lily v2, else None; h; d; the token mask)"""
        experts = None
        if layer.is_v2(name):
            bank_A = layer.a_bank(name).detach()
            x = x.detach().to(device=bank_A.device, dtype=torch.float64)
            experts = torch.einsum("...i,aik->...ak", x, bank_A.double())
            hidden = mix(layer, x, layer.a_router(name), bank_A, layer.routing_A[name], 1.0)
        else:
            A = layer.lily_A[name].weight.detach()
            hidden = F.linear(x.detach().to(device=A.device, dtype=torch.float64), A.double())
        routing = layer.routing[name]
        delta = mix(layer, hidden, layer.router(name), layer.routed_bank(name), routing, layer.scaling[name])
        return experts, hidden, delta, _token_mask(layer, hidden)

    def hook(path, layer):
        def fn(module, args, output):
            experts, hidden, delta, mask = dynamic_output(layer, args[0])
            h = hidden.reshape(-1, hidden.shape[-1])
            d = delta.reshape(-1, delta.shape[-1])
            m = mask.reshape(-1, 1)
            q = h if experts is None else experts.reshape(h.shape[0], -1)  # [N, num_A * r] for Lily v2
            if not frozen:  # pass 1: the sums
                if layer.routing[name] == "static":
                    probs = torch.zeros(h.shape[0], 1, dtype=h.dtype, device=h.device)
                else:
                    probs = torch.softmax(h @ layer.lily_router[name].weight.detach().double().T, dim=-1)
                qm = q * m
                if path not in stats:
                    k, out = q.shape[-1], d.shape[-1]
                    zeros = {"dtype": torch.float64, "device": h.device}
                    stats[path] = _Stats(
                        torch.zeros(probs.shape[-1], **zeros),
                        0.0,
                        torch.zeros(k, k, **zeros),
                        torch.zeros(k, out, **zeros),
                        0.0,
                    )
                    if experts is not None:
                        stats[path].probs_A = torch.zeros(layer.num_A[name], **zeros)
                        stats[path].c_A = torch.zeros(layer.num_A[name], **zeros)
                st = stats[path]
                st.probs += (probs * m).sum(0)
                st.count += float(m.sum())
                st.H += qm.T @ q
                st.Y += qm.T @ d
                st.D += float((d.square() * m).sum())
                if experts is not None:
                    p = experts.reshape(h.shape[0], layer.num_A[name], -1)
                    if name in layer.lily_router_A:
                        x = args[0].detach().to(dtype=torch.float64, device=h.device).reshape(h.shape[0], -1)
                        probs_A = torch.softmax(x @ layer.lily_router_A[name].weight.detach().double().T, dim=-1)
                        st.probs_A += (probs_A * m).sum(0)
                    st.c_A += torch.einsum("nak,nk->a", p * m.unsqueeze(-1), h)
                    st.D_A += float((h.square() * m).sum())
                return
            # pass 2: the frozen output on the same tokens
            if experts is not None:
                v = frozen[path]["A"]["weights"]
                h = torch.einsum("a,nak->nk", v, experts.reshape(h.shape[0], v.shape[0], -1))
            static = layer.scaling[name] * (h @ frozen[path]["combined"])
            diff = (static - d) * m
            peaks[path] = max(peaks.get(path, 0.0), float(diff.abs().max()) if diff.numel() else 0.0)

        return fn

    handles = [m.register_forward_hook(hook(p, m)) for p, m in layers.items()]
    try:
        seen = 0
        for batch in batches:
            _call(model, batch)
            seen += 1
        if not seen:
            raise ValueError("batches: need at least one calibration batch")
        for path, layer in layers.items():
            if path not in stats or stats[path].count == 0:
                raise ValueError(f"batches: no unmasked token reached layer {path!r}; cannot estimate its routing")
            frozen[path] = _solve_layer(layer, name, stats[path], method, ridge, method_A)
        if reiterable:
            for batch in batches:
                _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if previous is not None and previous != name:
            model.set_adapter(previous)
    return stats, frozen, peaks


# ---- recovery fine-tuning -------------------------------------------------------------------------------


def static_parameters(model: LilyModel, adapter_name: str | None = None) -> list[torch.nn.Parameter]:
    """The per-layer static parameters of a static adapter: each layer's ``lily_Bc`` (frozen with
    ``optimal_bc``) or ``lily_theta`` (and Lily v2's ``lily_theta_A``)."""
    name, layers = _check_adapter(model, adapter_name)
    if model.configs[name].routing != "static" or model.configs[name].routing_A not in (None, "static"):
        raise ValueError(
            f"adapter {name!r} uses {model.configs[name].routing!r} routing; freeze it first with "
            "lily_ext.freeze_router(model, calibration_batches)"
        )
    params = [m.lily_Bc[name] if name in m.lily_Bc else m.lily_theta[name] for m in layers.values()]
    return params + [m.lily_theta_A[name] for m in layers.values() if name in m.lily_theta_A]


def _loss(output, batch, loss_fn):
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "tune_batches: the model's output has no loss; put the labels into each batch (e.g. labels=...) "
            "or pass loss_fn(output, batch)"
        )
    return loss


def tune_static(
    model: LilyModel,
    batches: Iterable,
    steps: int,
    *,
    lr: float = 1e-3,
    adapter_name: str | None = None,
    loss_fn=None,
) -> list[float]:
    """Recovery fine-tuning: ``steps`` AdamW steps on only the static parameters of a frozen adapter
    (each layer's ``lily_Bc`` or ``lily_theta``; everything else stays fixed), cycling over
    ``batches`` (each a tuple or dict of arguments for ``model(...)`` whose output has a ``loss``,
    e.g. with ``labels``; or give ``loss_fn(output, batch)``). Returns the loss of every step."""
    steps = _check_steps(steps, "steps")
    lr = _check_lr(lr, "lr")
    params = static_parameters(model, adapter_name)
    name = adapter_name or model.active_adapter
    _iterable(batches, "tune_batches")
    if not steps:
        return []
    previous, was_training = model.active_adapter, model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = adamw(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    try:
        while len(losses) < steps:
            count = len(losses)
            for batch in batches:
                loss = _loss(_call(model, batch), batch, loss_fn)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(
                        f"tune_static: the loss became {loss.item()} at step {len(losses)}; lower lr"
                    )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if len(losses) == steps:
                    break
            if len(losses) == count:
                raise ValueError("tune_batches: need at least one labelled batch")
    finally:
        model.train(was_training)
        if previous is not None and previous != name:
            model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses
