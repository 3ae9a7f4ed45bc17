"""lily_ext.optim.adamw: the optimizer lily_ext's training loops build."""

import pytest
import torch

from lily_ext.optim import adamw


def adamw_float64(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """AdamW (Loshchilov & Hutter, torch's formulation) written out in float64."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p *= 1 - lr * weight_decay
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p -= lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_on_cpu_and_steps_as_adamw(dtype):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(7, 5, generator=g, dtype=dtype)
    grads = [torch.randn(7, 5, generator=g, dtype=dtype) for _ in range(4)]
    p = torch.nn.Parameter(start.clone())
    optimizer = adamw([p], lr=1e-2, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    for grad in grads:
        p.grad = grad.clone()
        optimizer.step()
    want = adamw_float64(start, grads, lr=1e-2, weight_decay=0.1)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(p.detach().double(), want, rtol=tol, atol=tol)


def test_unfused_where_torch_has_no_fused_kernel():
    on_meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert adamw([on_meta], lr=1e-3).defaults["fused"] is None
    group = {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}
    optimizer = adamw([group], lr=1e-2)
    assert optimizer.defaults["fused"] is None
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_a_saved_state_resumes_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    start, grads = torch.randn(16, generator=g), [torch.randn(16, generator=g) for _ in range(4)]
    through = torch.nn.Parameter(start.clone())
    optimizer = adamw([through], lr=1e-2)
    for grad in grads:
        through.grad = grad.clone()
        optimizer.step()
    resumed = torch.nn.Parameter(start.clone())
    first = adamw([resumed], lr=1e-2)
    for grad in grads[:2]:
        resumed.grad = grad.clone()
        first.step()
    second = adamw([resumed], lr=1e-2)
    second.load_state_dict(first.state_dict())
    for grad in grads[2:]:
        resumed.grad = grad.clone()
        second.step()
    assert torch.equal(resumed, through)
