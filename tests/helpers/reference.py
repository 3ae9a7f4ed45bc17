"""Independent float64 reference of routed_mix, written from docs/DESIGN.md in plain PyTorch.

Deliberately naive (explicit per-sample loops, materialised per-expert products) so that it
shares no structure with the kernels it checks. Gradients come from autograd through it.
"""

import torch


def routed_mix_reference(hidden, router, bank, scaling=1.0, mode="batch", mask=None):
    h = hidden.double()
    R = router.double()
    Bk = bank.double()
    E, r, out = Bk.shape
    lead = h.shape[:-1]
    if h.numel() == 0:
        return h.new_zeros((*lead, out)) + 0 * (R.sum() + Bk.sum())
    if mode == "static":
        w = torch.softmax(R, dim=0)
        return scaling * (h @ (w[:, None, None] * Bk).sum(0))
    probs = torch.softmax(h @ R.T, dim=-1)  # [..., E]
    if mode == "batch":
        w = probs.reshape(-1, E).mean(0)
        return scaling * (h @ (w[:, None, None] * Bk).sum(0))
    if mode == "token":
        per_expert = torch.stack([h @ Bk[e] for e in range(E)], dim=-2)  # [..., E, out]
        return scaling * (probs.unsqueeze(-1) * per_expert).sum(-2)
    if mode == "sequence":
        L = h.shape[-2] if h.dim() >= 3 else 1
        hs = h.reshape(-1, L, r)
        ps = probs.reshape(-1, L, E)
        ms = torch.ones(hs.shape[:2], dtype=torch.float64) if mask is None else (mask != 0).reshape(-1, L).double()
        rows = []
        for b in range(hs.shape[0]):
            count = ms[b].sum()
            if count == 0:
                w = torch.zeros(E, dtype=torch.float64)
            else:
                w = (ps[b] * ms[b][:, None]).sum(0) / count
            rows.append(scaling * (hs[b] @ (w[:, None, None] * Bk).sum(0)))
        if not rows:
            return h.new_zeros((*lead, out))
        return torch.stack(rows).reshape(*lead, out)
    if mode == "causal":
        L = h.shape[-2] if h.dim() >= 3 else 1
        hs = h.reshape(-1, L, r)
        ps = probs.reshape(-1, L, E)
        ms = torch.ones(hs.shape[:2], dtype=torch.float64) if mask is None else (mask != 0).reshape(-1, L).double()
        rows = []
        for b in range(hs.shape[0]):
            for t in range(L):
                count = ms[b, : t + 1].sum()
                if count == 0:
                    w = torch.zeros(E, dtype=torch.float64)
                else:
                    w = (ps[b, : t + 1] * ms[b, : t + 1, None]).sum(0) / count
                rows.append(scaling * (hs[b, t] @ (w[:, None, None] * Bk).sum(0)))
        if not rows:
            return h.new_zeros((*lead, out))
        return torch.stack(rows).reshape(*lead, out)
    raise ValueError(mode)
