"""What `sft run` does with its plugins, seen from one: a recording plugin takes part in one tiny
training run (2 steps) and the tests read what it saw. Every hook the run calls is called once,
in order, with the objects that train and are saved; this is the call-site test of these hooks
(tests/test_hookspecs.py reads CALLED_BY_SFT_RUN).

The run also checks what the hooks carry: the attention backend the config names (eager, not
the default), the configured chat template on a base tokenizer that has none, and a training-
health warning (a zero grad norm injected into the trainer's log) in the run's result.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CONFIG, tiny_rows, write_jsonl

from sft import hookimpl
from sft.manager import hook_names

# The hooks `sft run` calls, in the order it calls them; tests/test_hookspecs.py counts a hook
# listed here as tested (at its call site).
CALLED_BY_SFT_RUN = (
    "sft_prepare_tokenizer",
    "sft_patch_model",
    "sft_trainer_callbacks",
    "sft_train_start",
    "sft_train_end",
    "sft_before_save",
    "sft_save_model",
    "sft_after_save",
)
STEPS = 2


class Recorder:
    """Records each hook call (name and arguments) and the trainer callback's events, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def record(self, name: str, **seen: Any) -> None:
        self.calls.append((name, seen))

    def seen(self, name: str) -> dict[str, Any]:
        found = [seen for called, seen in self.calls if called == name]
        assert len(found) == 1, f"{name} was called {len(found)} times, not once"
        return found[0]

    @hookimpl
    def sft_prepare_tokenizer(self, tokenizer: Any, config: Any) -> None:
        self.record("sft_prepare_tokenizer", tokenizer=tokenizer, config=config)

    @hookimpl
    def sft_patch_model(self, model: Any, config: Any) -> None:
        self.record(
            "sft_patch_model",
            model=model,
            config=config,
            attention=model.config._attn_implementation,
        )

    @hookimpl
    def sft_trainer_callbacks(self, config: Any) -> list[Any]:
        from transformers import TrainerCallback

        recorder = self

        class Events(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                recorder.record("on_train_begin")

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                recorder.record("on_step_end", step=state.global_step)

        self.record("sft_trainer_callbacks", config=config)
        return [Events()]

    @hookimpl
    def sft_train_start(self, config: Any, trainer: Any) -> None:
        self.record("sft_train_start", config=config, trainer=trainer, model=trainer.model)
        log = trainer.log

        def zero_grad_norm(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "grad_norm" in logs:  # as if nothing were trainable
                logs = {**logs, "grad_norm": 0.0}
            log(logs, *args, **kwargs)

        trainer.log = zero_grad_norm

    @hookimpl
    def sft_train_end(self, config: Any, trainer: Any, metrics: dict[str, float]) -> None:
        self.record(
            "sft_train_end",
            config=config,
            trainer=trainer,
            metrics=dict(metrics),
            step=trainer.state.global_step,
        )

    @hookimpl
    def sft_before_save(self, config: Any, model: Any, output_dir: str, trainer: Any) -> None:
        self.record(
            "sft_before_save",
            config=config,
            model=model,
            output_dir=output_dir,
            trainer=trainer,
            files=sorted(p.name for p in Path(output_dir).iterdir()),
        )

    @hookimpl
    def sft_save_model(
        self, config: Any, model: Any, tokenizer: Any, output_dir: str, trainer: Any
    ) -> None:
        self.record(
            "sft_save_model",
            config=config,
            model=model,
            tokenizer=tokenizer,
            output_dir=output_dir,
            trainer=trainer,
        )
        # None: the core's own implementation saves

    @hookimpl
    def sft_after_save(self, config: Any, output_dir: str) -> None:
        self.record(
            "sft_after_save",
            config=config,
            output_dir=output_dir,
            files=sorted(p.name for p in Path(output_dir).iterdir()),
        )


class Recorded:
    def __init__(self, recorder: Recorder, config: Any, result: Any, base: Path) -> None:
        self.recorder = recorder
        self.config = config
        self.result = result
        self.base = base


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    from rich.console import Console

    from sft.config import load_config_text
    from sft.manager import SftPlugins, set_plugins
    from sft.testing import build_model, build_tokenizer
    from sft.train.run import train

    tmp = tmp_path_factory.mktemp("run-hooks")
    tokenizer = build_tokenizer(  # ChatML's tokens but no chat template: the config sets it
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    build_model(tokenizer, attn_implementation="sdpa").save_pretrained(tmp / "tiny")
    tokenizer.save_pretrained(tmp / "tiny")
    write_jsonl(tmp / "data.jsonl", tiny_rows())
    plugins = SftPlugins.load(environ={})
    recorder = Recorder()
    plugins.register(recorder, name="recorder")
    set_plugins(plugins)
    try:
        config = load_config_text(
            TINY_CONFIG.replace("{tmp}", str(tmp)),
            overrides=[f"max_steps={STEPS}", "attn_implementation=eager"],
            plugins=plugins,
            source=str(tmp / "config.toml"),
        )
        result = train(config, plugins=plugins, console=Console(file=io.StringIO()))
    finally:
        set_plugins(None)
    yield Recorded(recorder, config, result, tmp / "tiny")


def test_sft_run_calls_every_run_hook_once_in_order(recorded: Recorded) -> None:
    order = [name for name, _ in recorded.recorder.calls]
    assert order == [
        *CALLED_BY_SFT_RUN[:4],
        "on_train_begin",
        *["on_step_end"] * STEPS,
        *CALLED_BY_SFT_RUN[4:],
    ]
    assert [seen["step"] for name, seen in recorded.recorder.calls if "step" in seen] == [
        *range(1, STEPS + 1),
        STEPS,  # sft_train_end: after the last step
    ]


def test_the_recorder_covers_every_hook_but_the_config_and_registration_ones() -> None:
    run_hooks = [
        name
        for name in hook_names()
        if not name.startswith("sft_register_")
        and name not in ("sft_config_keys", "sft_validate_config")
        # checkpoints and resumes: tests/train/test_checkpoint_hooks.py, with real runs
        and name not in ("sft_save_checkpoint", "sft_resume_checkpoint")
    ]
    assert sorted(run_hooks) == sorted(CALLED_BY_SFT_RUN)
    assert sorted(name for name in vars(Recorder) if name.startswith("sft_")) == sorted(
        CALLED_BY_SFT_RUN
    )


def test_every_run_hook_gets_the_runs_config_and_trainer(recorded: Recorded) -> None:
    calls = dict(recorded.recorder.calls)
    trainer = calls["sft_train_start"]["trainer"]
    for name in CALLED_BY_SFT_RUN:
        assert calls[name]["config"] is recorded.config, name
        assert calls[name].get("trainer", trainer) is trainer, name


def test_the_patched_model_is_the_model_that_trains_and_is_saved(recorded: Recorded) -> None:
    patched = recorded.recorder.seen("sft_patch_model")["model"]
    assert recorded.recorder.seen("sft_train_start")["model"] is patched
    assert recorded.recorder.seen("sft_before_save")["model"] is patched
    assert recorded.recorder.seen("sft_save_model")["model"] is patched


def test_the_model_loads_with_the_attention_backend_the_config_names(recorded: Recorded) -> None:
    assert recorded.recorder.seen("sft_patch_model")["attention"] == "eager"
    trained = recorded.recorder.seen("sft_train_start")["model"]
    assert trained.config._attn_implementation == "eager"


def test_the_configured_chat_template_is_saved_with_the_model(
    recorded: Recorded,
) -> None:
    from transformers import AutoTokenizer

    from sft.plugins.chat_template.templates import builtin_template

    assert AutoTokenizer.from_pretrained(recorded.base).chat_template is None
    saved = AutoTokenizer.from_pretrained(recorded.result.output_dir)
    assert saved.chat_template == builtin_template("chatml")
    prepared = recorded.recorder.seen("sft_prepare_tokenizer")["tokenizer"]
    assert recorded.recorder.seen("sft_save_model")["tokenizer"] is prepared


def test_before_save_comes_before_the_weights_and_after_save_finds_them(
    recorded: Recorded,
) -> None:
    out = str(recorded.result.output_dir)
    before = recorded.recorder.seen("sft_before_save")
    after = recorded.recorder.seen("sft_after_save")
    assert before["output_dir"] == recorded.recorder.seen("sft_save_model")["output_dir"] == out
    assert after["output_dir"] == out
    assert "model.safetensors" not in before["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        after["files"]
    )


def test_train_end_gets_the_final_training_metrics(recorded: Recorded) -> None:
    end = recorded.recorder.seen("sft_train_end")
    assert end["metrics"]["train_loss"] > 0 and end["step"] == recorded.result.global_step == STEPS


def test_training_health_warnings_reach_the_run_result(recorded: Recorded) -> None:
    assert any("grad_norm is 0: nothing is learning" in w for w in recorded.result.warnings)
