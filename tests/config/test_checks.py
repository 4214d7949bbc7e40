"""Cross-key checks `sft validate` runs: an output_dir that cannot work is reported up front."""

from __future__ import annotations

import pytest

from sft.errors import ConfigError


def test_an_output_dir_that_is_a_file_is_a_validate_error(tmp_path, plugins, capsys):
    from sft.cli import main

    (tmp_path / "outfile").write_text("not a directory")
    config = tmp_path / "config.toml"
    config.write_text(
        f'base_model = "m"\noutput_dir = "{tmp_path / "outfile"}"\n'
        '[[datasets]]\npath = "org/name"\n'
    )
    assert main(["validate", str(config)]) == 4
    err = capsys.readouterr().err
    assert "output_dir (line 2)" in err and "is a file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("output", "adapter", "message"),
    [
        ("base", "lora", "is the base_model directory"),
        ("base", None, "is the base_model directory"),
        ("base/out", None, "inside the base_model directory"),
    ],
)
def test_output_dir_may_not_write_over_the_base_model(make_config, output, adapter, message):
    (make_config.tmp_path / "base").mkdir()
    text = f'output_dir = "{{tmp}}/{output}"\n[[datasets]]\npath = "org/x"\n'
    if adapter:
        text = f'adapter = "{adapter}"\n' + text
    with pytest.raises(ConfigError, match=message):
        make_config(text, f"base_model={make_config.tmp_path / 'base'}")


def test_an_adapter_may_be_saved_inside_the_base_model_folder(make_config):
    (make_config.tmp_path / "base").mkdir()
    config = make_config(
        'adapter = "lora"\noutput_dir = "{tmp}/base/lora"\n[[datasets]]\npath = "org/x"\n',
        f"base_model={make_config.tmp_path / 'base'}",
    )
    assert config.output_dir.endswith("base/lora")
