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


def test_the_final_save_goes_through_the_trainer(tiny_project, monkeypatch):
    """The trainer's save_model gathers FSDP / ZeRO-3 weights before writing: the core's save
    must call it (a default on its `trainer` argument made pluggy < 1.7 drop the trainer)."""
    import transformers

    from sft.train.run import train

    calls = []
    real = transformers.Trainer.save_model

    def recording(self, output_dir=None, _internal_call=False):
        calls.append((output_dir, _internal_call))
        return real(self, output_dir, _internal_call)

    monkeypatch.setattr(transformers.Trainer, "save_model", recording)
    result = train(tiny_project("max_steps=1", "adapter=lora"))
    assert (str(result.output_dir), False) in calls
    assert (result.output_dir / "adapter_model.safetensors").is_file()
