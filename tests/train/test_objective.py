"""Training objectives: a plugin's loss replaces the model's own when a config selects it."""

from __future__ import annotations

import json

import pytest

from sft import hookimpl
from sft.components import Objective
from sft.errors import ConfigError, PluginError
from sft.train.run import train


class ScaledLoss:
    """An objective plugin: `scale` × the model's own (correctly normalised) loss."""

    def __init__(self, scale: float = 2.0, broken: bool = False) -> None:
        self.scale = scale
        self.broken = broken
        self.items: list[object] = []

    def compute_loss(self, model, inputs, config, num_items_in_batch):
        self.items.append(num_items_in_batch)
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        return outputs.logits if self.broken else (self.scale * outputs.loss, outputs)

    @hookimpl
    def sft_register_objectives(self, register):
        register(Objective("scaled", self.compute_loss, description="scale x the LM loss"))


def first_loss(result) -> float:
    for line in (result.output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            return float(record["loss"])
    raise AssertionError("no loss logged")


def test_sft_register_objectives(tiny_project, plugins):
    """A registered objective, once selected, computes the loss of every micro-batch."""
    steps = ("max_steps=2", "logging_steps=1", "gradient_accumulation_steps=2")
    plain = train(tiny_project(*steps, f"output_dir={tiny_project.tmp_path}/plain"))
    objective = ScaledLoss(scale=3.0)
    plugins.register(objective, name="scaled")
    scaled = train(tiny_project(*steps, "objective=scaled"))

    # 2 steps x 2 micro-batches, each normalised by the trained tokens of its whole
    # accumulated step (what the objective is given); the first step's loss, computed before
    # any update, is exactly 3x the model's own.
    assert len(objective.items) == 4 and all(int(n) > 0 for n in objective.items)
    assert objective.items[0] == objective.items[1]
    assert scaled.global_step == 2
    assert first_loss(scaled) == pytest.approx(3 * first_loss(plain), rel=1e-4)


def test_an_unknown_objective_is_a_config_error_with_the_installed_ones(tiny_project, plugins):
    plugins.register(ScaledLoss(), name="scaled")
    with pytest.raises(ConfigError) as error:
        tiny_project("objective=scaeld")
    (problem,) = error.value.problems
    assert problem.path == "objective"
    assert "unknown objective 'scaeld'; did you mean 'scaled'?" in problem.message


def test_an_objective_returning_no_scalar_loss_is_named(tiny_project, plugins):
    plugins.register(ScaledLoss(broken=True), name="scaled")
    with pytest.raises(PluginError) as error:
        train(tiny_project("max_steps=1", "objective=scaled"))
    assert str(error.value).startswith(
        "objective 'scaled' (plugin scaled) returned Tensor of shape (2, "
    )
    assert "expected a scalar floating-point tensor" in str(error.value)
