"""The pieces the tasks share about optimization: AdamW (fused where it can be), the EMA with warmup, and
``task.compile``."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from trainer.errors import ConfigError
from trainer.tasks.compilation import compile_in_place, compile_options, forward_context
from trainer.tasks.optimization import adamw_with_schedule, build_adamw, ema_multi_avg_fn, warmup_cosine


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


def test_task_compile_values_map_to_torch_compile_keywords() -> None:
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"mode": "max-autotune", "dynamic": False}) == {"mode": "max-autotune", "dynamic": False}
    with pytest.raises(ConfigError, match=r"task.compile has keys torch.compile does not take: \['mod'\]"):
        compile_options({"mod": "default"})
    with pytest.raises(ConfigError, match="task.compile must be true, false or a mapping"):
        compile_options("inductor")
    module = torch.nn.Linear(2, 2)
    assert not compile_in_place(module, False) and module._compiled_call_impl is None
    assert compile_in_place(module, {"backend": "eager"}) and module._compiled_call_impl is not None


def test_forward_context_is_the_trainers_autocast_and_nothing_without_one() -> None:
    import pytorch_lightning as pl

    task = pl.LightningModule()
    with forward_context(task):
        assert not torch.is_autocast_enabled("cpu")
    task.trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    with forward_context(task):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    task.trainer = pl.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False)
    with forward_context(task):
        assert not torch.is_autocast_enabled("cpu")


def adam_reference(param: torch.Tensor, grads: list[torch.Tensor], lr: float, betas, eps: float, decay: float):
    """AdamW's closed form (Loshchilov & Hutter, torch's documented algorithm), step by step."""
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    for t, grad in enumerate(grads, start=1):
        param = param * (1 - lr * decay)
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad**2
        param = param - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return param


def test_adamw_is_fused_on_the_cpu_by_default_and_steps_as_the_closed_form() -> None:
    config = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    torch.manual_seed(0)
    start, grads = torch.randn(5, 3, dtype=torch.float64), [torch.randn(5, 3, dtype=torch.float64) for _ in range(4)]
    expected = adam_reference(start, grads, config["lr"], config["betas"], config["eps"], config["weight_decay"])
    for fused, default in ((None, True), (False, False), (True, True)):
        param = torch.nn.Parameter(start.clone())
        # param groups as the tasks pass them, their lists given as generators: the check must not consume them
        groups = ({"params": (p for p in [param]), "weight_decay": config["weight_decay"]},)
        step = adamw_with_schedule(groups, {**config, "fused": fused}, {"warmup_steps": 0, "min_lr_ratio": 1.0}, 4)
        optimizer = step["optimizer"]
        assert optimizer.defaults["fused"] is default and optimizer.param_groups[0]["params"] == [param]
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        assert torch.allclose(param.detach(), expected, rtol=1e-10, atol=1e-12), fused


def test_adamw_auto_falls_back_where_a_parameter_cannot_be_fused() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert not build_adamw(params, {"fused": None}, lr=1e-3).defaults["fused"]
    assert build_adamw(params[:1], {}, lr=1e-3).defaults["fused"]
    with pytest.raises(ConfigError, match="task.optimizer.fused must be true, false or null"):
        build_adamw(params[:1], {"fused": "yes"}, lr=1e-3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": -1}, "task.optimizer.lr must be positive, got -1.0"),
        ({"lr": 0.0}, "task.optimizer.lr must be positive, got 0.0"),
        ({"lr": float("inf")}, "task.optimizer.lr must be positive, got inf"),
        ({"lr": "1e-4"}, "task.optimizer.lr must be a number, got '1e-4'"),
        ({"betas": (0.9, 1.0)}, r"task.optimizer.betas must be two numbers in \[0, 1\)"),
        ({"betas": (-0.1, 0.99)}, r"task.optimizer.betas must be two numbers in \[0, 1\)"),
        ({"betas": (0.9,)}, r"task.optimizer.betas must be two numbers in \[0, 1\)"),
        ({"eps": -1e-8}, "task.optimizer.eps must be >= 0, got -1e-08"),
        ({"weight_decay": -0.1}, "task.optimizer.weight_decay must be >= 0, got -0.1"),
    ],
)
def test_optimizer_values_adamw_cannot_take_are_config_errors_naming_the_key(settings: dict, message: str) -> None:
    config = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, **settings}
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match=message):
        adamw_with_schedule([param], config, {"warmup_steps": 0}, 10)  # CLIP's and the LDM's way
    kwargs = {k: (tuple(v) if k == "betas" else v) for k, v in config.items()}
    with pytest.raises(ConfigError, match=message):
        build_adamw([param], {}, **kwargs)  # the autoencoder's
    if "weight_decay" in settings:  # a per-group value too (CLIP's decay group)
        with pytest.raises(ConfigError, match=message):
            build_adamw([{"params": [param], "weight_decay": settings["weight_decay"]}], {}, lr=1e-3)


def test_the_shipped_optimizer_settings_pass() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    build_adamw([param], {}, lr=4.5e-6, betas=(0.5, 0.9), weight_decay=0.0)  # the autoencoder's, no eps
    build_adamw([param], {}, lr=torch.tensor(1e-3), betas=[0, 0.999], eps=0, weight_decay=0)
    adamw_with_schedule([param], {"lr": 1, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2}, {}, 5)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"warmup_steps": -5}, "task.scheduler.warmup_steps must be a whole number >= 0, got -5"),
        ({"warmup_steps": 2.5}, "task.scheduler.warmup_steps must be a whole number >= 0, got 2.5"),
        ({"warmup_steps": None}, "task.scheduler.warmup_steps must be a whole number >= 0, got None"),
        ({"total_steps": 7.5}, r"task.scheduler.total_steps must be a whole number >= 1 \(or trainer.max_steps"),
        ({"min_lr_ratio": 1.5}, r"task.scheduler.min_lr_ratio must be in \[0, 1\] \(1: constant lr\), got 1.5"),
        ({"min_lr_ratio": -0.1}, r"task.scheduler.min_lr_ratio must be in \[0, 1\]"),
    ],
)
def test_schedule_values_that_cannot_work_are_config_errors_naming_the_key(schedule: dict, message: str) -> None:
    config = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    with pytest.raises(ConfigError, match=message):
        adamw_with_schedule([torch.nn.Parameter(torch.zeros(2))], config, schedule, 10)
    with pytest.raises(ConfigError, match=message):  # the autoencoder builds its schedule with warmup_cosine itself
        settings = {"warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 0.0, **schedule}
        warmup_cosine(settings["warmup_steps"], settings["total_steps"], settings["min_lr_ratio"])
    # a warmup longer than a short run (debug=fast on a long config) is allowed
    assert warmup_cosine(100, 2)(1) == 2 / 100
