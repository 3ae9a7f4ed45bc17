"""Independent float64 reference of routed_mix's `causal` mode, written from docs/DESIGN.md in
plain PyTorch (explicit loops over samples and tokens; gradients come from autograd through it).

Per sample (hidden [..., L, r]; 1-D / 2-D hidden: one token per sample) and token t, with
P_u = softmax(h_u R^T) and m_u the mask (nonzero = the token counts):
    w_t = (sum_{u <= t} m_u P_u) / (sum_{u <= t} m_u), 0 while that count is 0
    delta_t = scaling * sum_e w_te h_t Bk_e
"""

import torch


def causal_reference(hidden, router, bank, scaling=1.0, mask=None):
    h = hidden.double()
    R = router.double()
    Bk = bank.double()
    E, r, out = Bk.shape
    lead = h.shape[:-1]
    if h.numel() == 0:
        return h.new_zeros((*lead, out)) + 0 * (R.sum() + Bk.sum())
    L = h.shape[-2] if h.dim() >= 3 else 1
    hs = h.reshape(-1, L, r)
    probs = torch.softmax(hs @ R.T, dim=-1)  # [S, L, E]
    if mask is None:
        ms = torch.ones(hs.shape[:2], dtype=torch.float64)
    else:
        ms = (mask.cpu() != 0).reshape(-1, L).double()
    ms = ms.to(h.device)
    weights = []  # w_t of every token, sample by sample, token by token
    for b in range(hs.shape[0]):
        running = torch.zeros(E, dtype=torch.float64, device=h.device)
        count = 0.0
        for t in range(L):
            if ms[b, t] != 0:
                running = running + probs[b, t]
                count += 1.0
            weights.append(running / count if count > 0 else torch.zeros(E, dtype=torch.float64, device=h.device))
    w = torch.stack(weights).reshape(-1, L, E)
    per_expert = torch.stack([hs @ Bk[e] for e in range(E)], dim=-2)  # [S, L, E, out]: h_t Bk_e
    return (scaling * (w.unsqueeze(-1) * per_expert).sum(-2)).reshape(*lead, out)
