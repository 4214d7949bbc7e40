from __future__ import annotations

import torch

from sft.config import load_config_text
from sft.plugins.adamw import AdamKeys


def config_with(**overrides):
    return load_config_text(
        'base_model = "m"\n[[datasets]]\npath = "a"\n',
        overrides=[f"{k}={v}" for k, v in overrides.items()],
    )


def test_adamw_factories_build_real_optimizers_that_step(plugins):
    for name, fused in (("adamw_torch", False), ("adamw_torch_fused", True)):
        config = config_with(optimizer=name, learning_rate=0.1, adam_beta1=0.8, weight_decay=0.01)
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = plugins.optimizers().get(name).factory([{"params": [weight]}], config)
        assert isinstance(optimizer, torch.optim.AdamW)
        group = optimizer.param_groups[0]
        assert (
            group["lr"] == 0.1 and group["betas"] == (0.8, 0.999) and group["weight_decay"] == 0.01
        )
        assert bool(group["fused"]) is fused
        (weight * torch.tensor([1.0, -1.0, 2.0])).sum().backward()
        optimizer.step()
        # Adam's first step moves each weight by ~lr against the gradient's sign (+ decay).
        assert torch.allclose(weight.detach(), torch.tensor([0.899, 1.099, 0.899]), atol=1e-3)


def test_adam_keys_are_owned_and_checked(plugins):
    assert config_with(adam_epsilon=1e-6).section(AdamKeys).adam_epsilon == 1e-6
    assert plugins.optimizers().owner("adamw_torch_fused") == "adamw"
