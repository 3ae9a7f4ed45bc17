"""A short built-in example: the routed mixing op, forward and backward, in every mode."""

import torch

import lily_ext
from lily_ext.ops import MODES, routed_mix


def main():
    torch.manual_seed(0)
    E, r, out = 4, 64, 256
    hidden = torch.randn(2, 10, r, requires_grad=True)
    bank = torch.randn(E, r, out, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    print("lily_ext", lily_ext.__version__, "| torch", torch.__version__)
    for mode in MODES:
        router = torch.randn(E, requires_grad=True) if mode == "static" else torch.randn(E, r, requires_grad=True)
        delta = routed_mix(hidden, router, bank, scaling=0.5, mode=mode, mask=mask if mode == "sequence" else None)
        delta.square().mean().backward()
        print(f"{mode:>8}: delta {tuple(delta.shape)}, |delta| {delta.norm():.3f}, |d router| {router.grad.norm():.3f}")


if __name__ == "__main__":
    main()
