"""Small layers shared by the models."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CastLinear(nn.Linear):
    """nn.Linear whose weight may be stored in another dtype (fp8 storage): cast per call to the input's."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


def cast_linears(module: nn.Module) -> int:
    """Let every plain nn.Linear of a library model (e.g. transformers' Qwen3) take weights stored in
    another dtype, by making it a CastLinear (same parameters, same math). Returns how many changed."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = CastLinear
            n += 1
    return n
