"""`sft chat --prompt`, `sft merge-lora` and `sft run` from the command line; `sft.api.train`."""

from __future__ import annotations

from test_cli import run_sft

from sft import api


def sft(*args, cwd=None):
    return run_sft(*args, cwd=cwd)


def test_api_train_then_cli_chat_and_merge(tiny_project, tmp_path):
    config = tiny_project("adapter=lora", "max_steps=2")
    result = api.train(config)
    assert result.global_step == 2
    answer = sft(
        "chat", str(result.output_dir), "--prompt", "What is 1 plus 1?", "--max-new-tokens", "5"
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip()  # a (random-model) reply was streamed
    base = sft(
        "chat",
        str(result.output_dir),
        "--base",
        "--prompt",
        "What is 1 plus 1?",
        "--max-new-tokens",
        "5",
    )
    assert base.returncode == 0 and base.stdout.strip()  # the base model answers too (before/after)
    (tmp_path / "config.toml").write_text(
        f'base_model = "{tmp_path}/tiny"\nadapter = "lora"\noutput_dir = "{result.output_dir}"\n[[datasets]]\npath = "x"\ntype = "chat_template"\n'
    )
    merged = sft("merge-lora", str(tmp_path / "config.toml"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (result.output_dir / "merged" / "model.safetensors").exists()


def test_cli_run_on_a_config_file_and_chat_on_nothing_trained(tiny_project, tmp_path):
    text = (tmp_path / "data.jsonl").exists()
    assert text
    config = tmp_path / "run.toml"
    config.write_text(
        f'base_model = "{tmp_path}/tiny"\nchat_template = "chatml"\nmax_steps = 2\noutput_dir = "{tmp_path}/cli-out"\n'
        f'[[datasets]]\npath = "data.jsonl"\ntype = "chat_template"\n'
    )
    missing = sft("chat", str(config), "--prompt", "hi")
    assert missing.returncode == 6 and "run `sft run` first" in missing.stderr
    run = sft("run", str(config), cwd=tmp_path)  # relative paths: from the working directory
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 2/2 | loss" in run.stdout and "saved model to" in run.stdout


PERSONA_TEMPLATE = (
    "{% if persona is not defined %}{{ raise_exception('persona is not set') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant ({{ persona }})\n{% endif %}"
)


def test_chat_template_kwargs_render_the_training_data_and_the_chat(tiny_project, tmp_path):
    # A template that refuses to render without `persona`: the run's data and `sft chat` on
    # its result (which reads the run's sft_config.yaml) both render with it.
    (tmp_path / "persona.jinja").write_text(PERSONA_TEMPLATE)
    config = tiny_project(
        "adapter=lora",
        "max_steps=1",
        "chat_template=jinja",
        f"chat_template_jinja={tmp_path / 'persona.jinja'}",
        "chat_template_kwargs={persona = 'Quill'}",
    )
    result = api.train(config)
    assert result.global_step == 1
    answer = sft(
        "chat", str(result.output_dir), "--prompt", "Who are you?", "--max-new-tokens", "3"
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip()
