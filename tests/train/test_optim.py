"""Optimizers from the registry and learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from sft.config import load_config_text
from sft.errors import ModelError
from sft.train.trainer import build_scheduler, parameter_groups, warmup_steps

BASE = 'base_model = "m"\n[[datasets]]\npath = "a"\n'


def config(*overrides):
    return load_config_text(BASE, overrides=list(overrides))


@pytest.mark.parametrize(
    "name",
    [
        "adamw_torch",
        "adamw_torch_fused",
        "sgd",
        "adafactor",
        "adamw_8bit",
        "adamw_bnb_8bit",
        "lion_8bit",
    ],
)
def test_registered_optimizers_build_and_step(plugins, name):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    cfg = config(f"optimizer={name}", "learning_rate=0.01", "weight_decay=0.1")
    groups = parameter_groups(model, cfg.weight_decay)
    assert [len(g["params"]) for g in groups] == [1, 3]  # the matrix decays; biases/norm do not
    optimizer = plugins.optimizers().get(name).factory(groups, cfg)
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 64)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_need_cuda(plugins, name):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: paged optimizers work here")
    from sft.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA GPU"):  # found by `sft validate`
        config(f"optimizer={name}")
    portable = load_config_text(BASE, overrides=[f"optimizer={name}"], machine_checks=False)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ModelError, match="needs a CUDA GPU"):  # and again before it would run
        plugins.optimizers().get(name).factory(parameter_groups(model, 0.0), portable)


def test_sgd_options_are_validated(plugins):
    from sft.errors import ConfigError

    with pytest.raises(ConfigError, match="sgd_momentum"):
        config("optimizer=sgd", "sgd_nesterov=true")


def lrs(cfg, total=10):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_scheduler(cfg, optimizer, total)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_schedules_warmup_and_cosine_floor(plugins):
    cosine = lrs(config("learning_rate=1.0", "warmup_steps=2", "cosine_min_lr_ratio=0.1"))
    assert cosine[0] == 0.0 and cosine[2] == pytest.approx(1.0)
    assert min(cosine[2:]) >= 0.1 - 1e-9 and cosine[-1] < 0.2
    linear = lrs(config("learning_rate=1.0", "lr_scheduler=linear", "warmup_ratio=0.2"))
    assert linear[2] == pytest.approx(1.0) and linear[-1] == pytest.approx(0.125)
    assert set(lrs(config("learning_rate=0.3", "lr_scheduler=constant"))) == {0.3}
    assert warmup_steps(config("warmup_ratio=0.15"), 100) == 15


def test_warmup_steps_below_one_is_a_fraction_of_the_total_steps(plugins):
    """transformers' reading, which Axolotl's examples use (`warmup_steps: 0.1`)."""
    fraction = lrs(config("learning_rate=1.0", "lr_scheduler=linear", "warmup_steps=0.2"))
    assert fraction == lrs(config("learning_rate=1.0", "lr_scheduler=linear", "warmup_steps=2"))
    assert fraction[1] == pytest.approx(0.5) and fraction[2] == pytest.approx(1.0)
    assert warmup_steps(config("warmup_steps=0.15"), 30) == 5  # ceil(4.5)
    assert warmup_steps(config("warmup_steps=3.0"), 30) == 3


def test_a_fractional_warmup_of_more_than_one_step_is_an_error(plugins):
    from sft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"warmup_steps \(--set\): 2.5 is neither a whole number"):
        config("warmup_steps=2.5")
    with pytest.raises(ConfigError, match=r"warmup_ratio \(--set\): conflicts with warmup_steps"):
        config("warmup_steps=0.1", "warmup_ratio=0.1")
    with pytest.raises(ConfigError, match="takes a step count, not a fraction"):
        config("optimizer=schedule_free_adamw", "lr_scheduler=constant", "warmup_steps=0.1")
