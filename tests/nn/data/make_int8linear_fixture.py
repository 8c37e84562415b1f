"""Writes tests/nn/data/int8linear_ef01f0a.pt with the Int8Linear of commit ef01f0a (int8 weight as an int8
nn.Parameter, gradient in ``weight.float_grad``), before the weight became a float-presenting tensor subclass:
the layer's state dict, an input, the output, the input gradient and the weight gradient for a fixed upstream
gradient. tests/nn/test_int8.py loads it with the current code. Run from the repository root (reference backend,
so the numbers do not depend on which kernel library is built):

    python tests/nn/data/make_int8linear_fixture.py
"""

import os

import torch
from torch import nn

from weightkit import use_backend
from weightkit.nn import Int8Linear

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8linear_ef01f0a.pt")


def main() -> None:
    torch.manual_seed(27)
    layer = Int8Linear.from_linear(nn.Linear(64, 24), group_size=32)
    x = torch.randn(5, 64)
    g = torch.randn(5, 24)
    with use_backend("reference"):
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(g)
    torch.save({"state_dict": {k: v.clone() for k, v in layer.state_dict().items()}, "x": x, "grad_out": g,
                "y": y.detach(), "grad_x": xr.grad, "grad_weight": layer.weight.float_grad.clone(),
                "config": {"in_features": 64, "out_features": 24, "group_size": 32, "bias": True}}, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
