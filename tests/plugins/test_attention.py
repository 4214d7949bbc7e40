from __future__ import annotations

import pytest

from sft.config import load_config_text
from sft.errors import ConfigError


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_builtin_attention_backends_are_registered_and_selectable(plugins, name):
    backend = plugins.attention_backends().get(name)
    assert backend.hf_implementation == name
    assert plugins.attention_backends().owner(name) == name
    config = load_config_text(
        f'base_model = "m"\nattn_implementation = "{name}"\n[[datasets]]\npath = "a"\n'
    )
    assert config.attention == name


def test_unknown_attention_backend_names_the_installed_ones(plugins):
    with pytest.raises(ConfigError) as error:
        load_config_text(
            'base_model = "m"\nattn_implementation = "spda"\n[[datasets]]\npath = "a"\n'
        )
    (problem,) = error.value.problems
    assert "did you mean 'sdpa'" in problem.message and problem.line == 2
