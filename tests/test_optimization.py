"""The pieces the tasks share about optimization: the EMA with warmup."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from trainer.tasks.optimization import ema_multi_avg_fn


def test_ema_follows_the_compvis_warmup_recursion() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    model.register_buffer("steps", torch.tensor(0))  # a non-float buffer is copied, not averaged
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.999), use_buffers=True)
    expected = None
    for n, value in enumerate([3.0, -1.0, 2.0, 5.0, 0.5] + [1.0] * 200):
        with torch.no_grad():
            model.weight.fill_(value)
            model.steps.fill_(n)
        ema.update_parameters(model)
        if expected is None:
            expected = value  # the first update copies
        else:
            decay = min(0.999, (1 + n) / (10 + n))  # n updates averaged so far
            expected = decay * expected + (1 - decay) * value
        assert abs(ema.module.weight.item() - expected) < 1e-5
        assert ema.module.steps.item() == n
    # after 205 updates the first value's share is small: a fixed 0.999 would still hold 0.999**204 = 82% of it
    assert abs(ema.module.weight.item() - 1.0) < 0.05
