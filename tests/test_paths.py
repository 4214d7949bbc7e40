"""Paths as users write them: `~` is home for every path key, relative paths are read from the
working directory, and credentials in a URL never reach a screen or a saved file."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_rows, write_jsonl

from sft.errors import DataError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_expand_home_leaves_hub_ids_urls_and_template_text_alone(home):
    from sft import paths

    assert paths.expand_home("~/data/x.jsonl") == str(home / "data" / "x.jsonl")
    assert paths.expand_home("~") == str(home)
    for value in (
        "org/name",
        "s3://bucket/~/x",
        "./~x",
        "relative/path",
        "{{ '~' }}",
        "~{{ x }}",
        None,
    ):
        assert paths.expand_home(value) == value


def test_every_path_key_is_expanded_once_when_the_config_is_loaded(home, plugins):
    from sft.config import load_config_text

    (home / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (home / "base").mkdir()
    config = load_config_text(
        """
        base_model = "~/base"
        tokenizer_config = "~/tok"
        output_dir = "~/runs/out"
        dataset_prepared_path = "~/prepared"
        resume_from_checkpoint = "~/runs/out/checkpoint-2"
        chat_template = "jinja"
        chat_template_jinja = "~/t.jinja"
        [[datasets]]
        path = "~/data/chat.jsonl"
        type = "chat_template"
        chat_template_jinja = "~/t.jinja"
        [[datasets]]
        path = "https://host/~/x.jsonl"
        type = "chat_template"
        """,
        machine_checks=False,
    )
    assert config.base_model == str(home / "base")
    assert config.tokenizer_config == str(home / "tok")
    assert config.output_dir == str(home / "runs" / "out")
    assert config.dataset_prepared_path == str(home / "prepared")
    assert config.resume_from_checkpoint == str(home / "runs" / "out" / "checkpoint-2")
    assert config.chat_template_jinja == str(home / "t.jinja")
    assert config.datasets[0].path == str(home / "data" / "chat.jsonl")
    assert config.datasets[0].chat_template_jinja == str(home / "t.jinja")
    assert config.datasets[1].path == "https://host/~/x.jsonl"  # a URL is left as it is


def test_training_arguments_and_sft_agree_on_the_output_dir(home, plugins, tokenizer):
    # transformers expands `~` itself; sft used the literal `./~/...` for the model and the
    # stale-checkpoint guard (which an earlier run's checkpoints then slipped past).
    from sft.config import load_config_text
    from sft.train.run import training_arguments

    config = load_config_text(
        'base_model = "m"\noutput_dir = "~/out"\n[[datasets]]\npath = "org/name"\n',
        machine_checks=False,
    )
    args = training_arguments(config, 8, False, None)
    assert args.output_dir == config.output_dir == str(home / "out")


def test_a_relative_dataset_path_is_read_from_the_working_directory(
    tmp_path, monkeypatch, plugins, tokenizer
):
    from sft.config import load_config
    from sft.data.pipeline import prepare_datasets

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    write_jsonl(project / "data.jsonl", tiny_rows(3))
    write_jsonl(elsewhere / "data.jsonl", tiny_rows(5))
    (project / "config.toml").write_text(
        'base_model = "unused"\nchat_template = "chatml"\n'
        '[[datasets]]\npath = "data.jsonl"\ntype = "chat_template"\n'
    )
    monkeypatch.chdir(elsewhere)
    config = load_config(project / "config.toml")
    prepared = prepare_datasets(config, tokenizer, plugins, show_progress=False)
    assert prepared.summary.datasets[0].rows_in == 5  # the working directory's file

    (elsewhere / "data.jsonl").unlink()
    from sft.data.sources import read_rows

    with pytest.raises(DataError, match="working directory") as error:
        read_rows(config.datasets[0])
    assert str(elsewhere) in str(error.value)


SECRET_URLS = [
    ("https://alice:hf_SuperSecretToken123@data.example.com/train.jsonl", "hf_SuperSecretToken123"),
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/train.jsonl", "wJalrXUtnFEMIK7MDENG"),
    ("https://host/train.jsonl?X-Amz-Signature=abc123def&x=1", "abc123def"),
    ("https://host/train.jsonl?token=tok_999", "tok_999"),
]


@pytest.mark.parametrize(("url", "secret"), SECRET_URLS)
def test_redact_hides_url_credentials_and_keeps_the_rest(url, secret):
    from sft import paths

    shown = paths.redact(f"cannot load {url}: 404")
    assert secret not in shown and "<redacted>" in shown
    assert shown.startswith("cannot load ") and shown.endswith(": 404")
    assert "train.jsonl" in shown
    assert (
        paths.redact("plain text, org/name, ./data.jsonl") == "plain text, org/name, ./data.jsonl"
    )


def test_data_errors_never_show_url_credentials(plugins):
    from sft.config.schema import DatasetConfig
    from sft.data.sources import read_rows

    url = "memory://alice:hf_SuperSecretToken123@bucket/missing.jsonl"
    with pytest.raises(DataError) as error:
        read_rows(DatasetConfig(path=url))
    assert "hf_SuperSecretToken123" not in str(error.value)
    assert "hf_SuperSecretToken123" not in error.value.render()
    assert "missing.jsonl" in str(error.value)


def test_preprocess_summary_shows_a_redacted_dataset_url(tmp_path, plugins, capsys, monkeypatch):
    import fsspec

    monkeypatch.setenv("COLUMNS", "200")  # one table row per dataset

    from sft.cli import main
    from sft.testing import build_tokenizer

    build_tokenizer(
        special_tokens=["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>"
    ).save_pretrained(tmp_path / "tok")
    url = "memory://alice:hf_SuperSecretToken123@bucket/train.jsonl"
    with fsspec.open(url, "w") as handle:
        write_jsonl(tmp_path / "rows.jsonl", tiny_rows(4))
        handle.write((tmp_path / "rows.jsonl").read_text())
    config = tmp_path / "config.toml"
    config.write_text(
        f'base_model = "{tmp_path / "tok"}"\nchat_template = "chatml"\n'
        f'dataset_prepared_path = "{tmp_path / "prepared"}"\n'
        f'[[datasets]]\npath = "{url}"\ntype = "chat_template"\n'
    )
    assert main(["preprocess", str(config)]) == 0
    out = capsys.readouterr().out
    assert "hf_SuperSecretToken123" not in out
    assert "memory://<redacted>@bucket/train.jsonl" in out
    summary = next((tmp_path / "prepared").glob("*/summary.json")).read_text()
    assert "hf_SuperSecretToken123" not in summary
