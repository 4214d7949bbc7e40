"""What a run saves beside the model: the resolved config and the model card, without secrets."""

from __future__ import annotations

from sft.save import write_model_card, write_resolved_config

SECRET = "hf_SuperSecretToken123"


def test_url_credentials_are_redacted_in_the_resolved_config_and_the_model_card(
    make_config, tmp_path
):
    config = make_config(
        f'[[datasets]]\npath = "https://alice:{SECRET}@data.example.com/train.jsonl"\n'
        'type = "alpaca"\n'
        '[[datasets]]\npath = "s3://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/more.jsonl"\n'
        'type = "alpaca"\nstorage_options = {key = "k", secret = "s"}\n'
    )
    resolved = write_resolved_config(config, tmp_path).read_text()
    card = write_model_card(config, tmp_path, {}).read_text()
    for text in (resolved, card):
        assert SECRET not in text and "wJalrXUtnFEMIK7MDENG" not in text
        assert "https://<redacted>@data.example.com/train.jsonl" in text
        assert "s3://<redacted>@bucket/more.jsonl" in text
    assert "secret: <redacted>" in resolved
