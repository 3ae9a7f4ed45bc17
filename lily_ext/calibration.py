"""freeze_router: turn data-dependent routing into static (mergeable) weights from calibration data."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .model import LilyModel
from .ops import routed_mix


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


@torch.no_grad()
def freeze_router(model: LilyModel, batches: Iterable, adapter_name: str | None = None) -> dict:
    """Replaces each layer's router by the mean of its routing weights over ``batches``.

    Each item of ``batches`` is a tuple of positional arguments or a dict of keyword arguments for
    ``model(...)``; tokens the ``attention_mask`` marks as padding are left out of the mean. The
    adapter becomes ``routing="static"`` (and so mergeable). Returns, per layer path, how far the
    frozen adapter output is from the dynamic one on the same calibration inputs:
    ``{"relative_error": ||d_static - d_dynamic|| / ||d_dynamic||, "max_abs_error": ...}``.
    """
    if not isinstance(model, LilyModel):
        raise TypeError(f"model: expected a lily_ext.LilyModel, got {type(model).__name__}")
    name = adapter_name or model.active_adapter
    if name not in model.configs:
        raise ValueError(f"adapter_name: no adapter {name!r} (have: {', '.join(model.configs) or 'none'})")
    if model.configs[name].routing == "static":
        raise ValueError(f"adapter {name!r} already uses static routing; nothing to freeze")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: need at least one calibration batch")
    layers = {path: m for path, m in model.lily_layers() if name in m.lily_router}
    previous = model.active_adapter
    model.set_adapter(name)
    was_training = model.training
    model.eval()

    totals = {p: torch.zeros(m.num_B[name], dtype=torch.float64) for p, m in layers.items()}
    counts = dict.fromkeys(layers, 0.0)
    errors = {p: [0.0, 0.0, 0.0] for p in layers}  # sum |d_s - d_d|^2, sum |d_d|^2, max |d_s - d_d|
    weights: dict = {}

    def hook(path, layer):
        def fn(module, args, output):
            x = args[0]
            hidden = F.linear(x.to(layer.lily_A[name].weight.dtype), layer.lily_A[name].weight)
            mask = _token_mask(layer, hidden)
            if not weights:  # pass 1: accumulate routing probabilities
                probs = torch.softmax(hidden.double() @ layer.lily_router[name].weight.double().T, dim=-1)
                totals[path] += (probs * mask.unsqueeze(-1)).reshape(-1, probs.shape[-1]).sum(0).cpu()
                counts[path] += float(mask.sum())
                return
            # pass 2: the same input through dynamic and frozen routing
            bank, scaling, routing = layer.bank(name), layer.scaling[name], layer.routing[name]
            dynamic = routed_mix(
                hidden,
                layer.lily_router[name].weight,
                bank,
                scaling=scaling,
                mode=routing,
                mask=layer.sequence_mask(hidden, routing) if routing in ("sequence", "causal") else None,
            )
            theta = torch.log(weights[path].clamp_min(1e-300)).to(hidden.dtype).to(hidden.device)
            frozen = routed_mix(hidden, theta, bank, scaling=scaling, mode="static")
            diff = (frozen - dynamic).double() * mask.unsqueeze(-1)
            err = errors[path]
            err[0] += float(diff.square().sum())
            err[1] += float((dynamic.double() * mask.unsqueeze(-1)).square().sum())
            err[2] = max(err[2], float(diff.abs().max()) if diff.numel() else 0.0)

        return fn

    handles = [m.register_forward_hook(hook(p, m)) for p, m in layers.items()]
    try:
        for batch in batches:
            _call(model, batch)
        for path in layers:
            if counts[path] == 0:
                raise ValueError(f"batches: no unmasked token reached layer {path!r}; cannot estimate its routing")
            weights[path] = totals[path] / counts[path]
        for batch in batches:
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for path, layer in layers.items():
        layer.set_static_weights(name, weights[path])
    model.configs[name] = dataclasses.replace(model.configs[name], routing="static")
    if previous is not None and previous != name:
        model.set_adapter(previous)
    report = {}
    for path, (num, den, peak) in errors.items():
        report[path] = {
            "relative_error": (num / den) ** 0.5 if den > 0 else 0.0,
            "max_abs_error": peak,
            "weights": weights[path].tolist(),
        }
    return report
