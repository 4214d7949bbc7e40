"""LISA: only lisa_n_layers drawn decoder layers train in each interval of a full fine-tune."""

from __future__ import annotations

import pytest
import torch

from sft.errors import ConfigError, ModelError
from sft.plugins.lisa import draw


def test_only_the_drawn_layers_train(tiny_project):
    from safetensors.torch import load_file

    from sft.train.run import train

    # a seed whose two intervals draw the same one of the tiny model's two layers
    seed = next(s for s in range(100) if draw(2, 1, s, 0) == draw(2, 1, s, 2))
    (active,) = draw(2, 1, seed, 0)
    config = tiny_project(
        "lisa_n_layers=1",
        "lisa_step_interval=2",
        "max_steps=4",
        f"seed={seed}",
        "learning_rate=0.01",
    )
    result = train(config)
    assert result.global_step == 4
    saved = load_file(result.output_dir / "model.safetensors")
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")

    def changed(prefix: str) -> bool:
        names = [n for n in base if n.startswith(prefix)]
        assert names
        return any(not torch.equal(saved[n], base[n]) for n in names)

    assert changed(f"model.layers.{active}.")
    assert not changed(f"model.layers.{1 - active}.")  # frozen all run
    assert changed("model.embed_tokens.")  # outside the layers: trains throughout


def test_draws_are_fixed_by_seed_and_step():
    assert draw(8, 3, 1, 20) == draw(8, 3, 1, 20)
    assert len(set(draw(8, 3, 1, 20))) == 3
    assert {tuple(draw(8, 3, 1, step)) for step in range(0, 200, 20)} != {tuple(draw(8, 3, 1, 0))}


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (["lisa_n_layers=2"], "lisa_n_layers", "LISA needs lisa_step_interval too"),
        (
            ["lisa_n_layers=1", "lisa_step_interval=5", "adapter=lora"],
            "lisa_n_layers",
            "conflicts with adapter",
        ),
        (["lisa_n_layers=0", "lisa_step_interval=5"], "lisa_n_layers", "must be ≥ 1"),
        (
            ["lisa_n_layers=1", "lisa_step_interval=5", "fsdp_version=2", "fsdp_config={}"],
            "lisa_n_layers",
            "which fsdp does not follow",
        ),
    ],
)
def test_lisa_mistakes_are_config_errors(tiny_project, overrides, path, message):
    with pytest.raises(ConfigError) as error:
        tiny_project(*overrides)
    assert message in {p.path: p.message for p in error.value.problems}[path]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lisa_n_layers=3"], "lisa_n_layers = 3, but model.layers has 2 layers"),
        (["lisa_n_layers=1", "lisa_layers_attribute=model.blocks"], "has no 'blocks'"),
        (["lisa_n_layers=1", "lisa_layers_attribute=model.norm"], "not a list of layers"),
    ],
)
def test_layers_that_do_not_fit_the_model_stop_the_load(tiny_project, overrides, message):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("lisa_step_interval=2", *overrides)
    with pytest.raises(ModelError, match=message):
        load_model(config, load_tokenizer(config), get_plugins())
