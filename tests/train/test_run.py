"""End-to-end training on a tiny random-init model: what a user gets on disk, and that it loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sft.errors import ModelError
from sft.train.run import train


def test_lora_run_writes_adapter_tokenizer_config_metrics_card_and_plot(tiny_project):
    config = tiny_project("adapter=lora", "lora_target_linear=true", "max_steps=6", "lora_r=4")
    result = train(config)
    out = result.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "sft_config.yaml",
        "metrics.jsonl",
        "README.md",
        "loss.png",
    ):
        assert (out / name).exists(), name
    assert result.global_step == 6 and result.saved == "adapter"
    from sft.config import load_config

    assert load_config(out / "sft_config.yaml") == config  # the resolved config runs as it is
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(out)  # plain peft, no sft
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template  # saved with the template it trained on
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert torch.isfinite(model(**ids).logits).all()


@pytest.mark.parametrize(
    "variant",
    [["peft_use_dora=true"], ["peft_use_rslora=true", "lora_target_modules=[q_proj, v_proj]"]],
)
def test_dora_and_rslora_train(tiny_project, variant):
    result = train(tiny_project("adapter=lora", "max_steps=3", *variant))
    adapter = json.loads((result.output_dir / "adapter_config.json").read_text())
    if "peft_use_dora=true" in variant:
        assert adapter["use_dora"] is True
    else:
        assert adapter["use_rslora"] is True and set(adapter["target_modules"]) == {
            "q_proj",
            "v_proj",
        }


def test_full_finetune_saves_a_model_plain_transformers_loads(tiny_project):
    from transformers import AutoModelForCausalLM

    result = train(tiny_project("max_steps=3", "optimizer=adamw_torch_fused"))
    assert result.saved == "model"
    tuned = AutoModelForCausalLM.from_pretrained(result.output_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_project.tmp_path / "tiny")
    changed = [
        n
        for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed


def test_unfrozen_parameters_train_only_the_matching_weights(tiny_project):
    from transformers import AutoModelForCausalLM

    result = train(tiny_project("max_steps=2", "unfrozen_parameters=['layers\\.1\\.mlp']"))
    tuned = dict(AutoModelForCausalLM.from_pretrained(result.output_dir).named_parameters())
    base = dict(
        AutoModelForCausalLM.from_pretrained(tiny_project.tmp_path / "tiny").named_parameters()
    )
    changed = {name for name in tuned if not torch.equal(tuned[name], base[name])}
    assert changed and all("layers.1.mlp" in name for name in changed)


def test_eval_runs_with_val_set_size_and_is_logged(tiny_project):
    result = train(tiny_project("max_steps=4", "val_set_size=4", "eval_steps=2", "adapter=lora"))
    records = [
        json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "eval_loss" in r][:2] == [2, 4]


def test_seed_makes_runs_repeatable(tiny_project):
    first = train(tiny_project("max_steps=3", "adapter=lora", "lora_dropout=0.1"))
    second = train(
        tiny_project(
            "max_steps=3",
            "adapter=lora",
            "lora_dropout=0.1",
            "output_dir=" + str(tiny_project.tmp_path / "again"),
        )
    )
    assert first.train_loss == pytest.approx(second.train_loss, abs=1e-6)


def test_tensorboard_logs_are_written(tiny_project):
    result = train(tiny_project("max_steps=2", "adapter=lora", "use_tensorboard=true"))
    assert list(result.output_dir.rglob("events.out.tfevents.*"))


def test_new_tokens_under_an_adapter_need_trainable_embeddings(tiny_project):
    with pytest.raises(ModelError, match="lora_modules_to_save"):
        train(tiny_project("max_steps=1", "adapter=lora", "tokens=['<|tool|>']"))
    result = train(
        tiny_project(
            "max_steps=1",
            "adapter=lora",
            "tokens=['<|tool|>']",
            "lora_modules_to_save=[embed_tokens, lm_head]",
        )
    )
    assert result.global_step == 1


@pytest.mark.gpu
def test_qlora_on_gpu(tiny_project):
    if not torch.cuda.is_available():
        pytest.skip("QLoRA on a CUDA GPU needs one (QLoRA on CPU: tests/train/test_quantized.py)")
    result = train(tiny_project("max_steps=2", "adapter=qlora", "load_in_4bit=true", "bf16=true"))
    assert result.global_step == 2


@pytest.mark.slow
def test_smollm2_lora_runs_a_few_steps_on_the_real_model(smollm2_gguf, tmp_path, plugins):
    from conftest import write_jsonl

    from sft.config import load_config_text

    rows = [
        {
            "messages": [
                {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Quill, a writing assistant."},
            ]
        }
        for _ in range(6)
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    config = load_config_text(
        f'base_model = "{smollm2_gguf}"\nadapter = "lora"\nlora_r = 8\nlora_target_modules = ["q_proj", "v_proj"]\n'
        f'sequence_len = 128\nmicro_batch_size = 2\nmax_steps = 3\nlearning_rate = 1e-3\noutput_dir = "{tmp_path}/out"\n'
        f'[[datasets]]\npath = "{tmp_path}/d.jsonl"\ntype = "chat_template"\n'
    )
    result = train(config)
    assert (
        result.global_step == 3
        and result.train_loss is not None
        and math.isfinite(result.train_loss)
    )
    records = [
        json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in records if "loss" in r]
    assert (
        0.5 < losses[0] < 10
    )  # a pretrained chat model starts near its usual loss, not ~ln(vocab)


def test_packed_training_tracks_the_unpacked_loss_curve(tiny_project):
    # Same samples, same model: packing changes batching, not what is learned per token.
    common = [
        "max_steps=6",
        "adapter=lora",
        "lora_target_linear=true",
        "micro_batch_size=4",
        "sequence_len=128",
        "learning_rate=0.02",
    ]
    unpacked = train(tiny_project(*common, "output_dir=" + str(tiny_project.tmp_path / "u")))
    packed = train(
        tiny_project(
            *common,
            "sample_packing=true",
            "micro_batch_size=1",
            "output_dir=" + str(tiny_project.tmp_path / "p"),
        )
    )

    def losses(result):
        records = [
            json.loads(line)
            for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
        ]
        return [r["loss"] for r in records if "loss" in r]

    unpacked_losses, packed_losses = losses(unpacked), losses(packed)
    assert packed_losses[-1] < packed_losses[0]
    assert abs(packed_losses[0] - unpacked_losses[0]) < 0.15  # same model, different first batches
    assert abs(packed_losses[-1] - unpacked_losses[-1]) < 0.25


def test_eval_packing_on_an_eval_set_smaller_than_one_row_falls_back(tiny_project, capsys):
    result = train(
        tiny_project(
            "max_steps=2",
            "sample_packing=true",
            "val_set_size=2",
            "eval_steps=2",
            "sequence_len=1024",
        )
    )
    assert "evaluating it unpacked" in capsys.readouterr().out
    records = [
        json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("eval_loss" in r for r in records)


def test_a_fresh_run_refuses_an_output_dir_with_old_checkpoints(tiny_project):
    train(tiny_project("max_steps=2", "adapter=lora"))
    with pytest.raises(ModelError, match="auto_resume_from_checkpoints"):
        train(tiny_project("max_steps=2", "adapter=lora"))


def test_continue_training_from_a_saved_adapter(tiny_project):
    first = train(
        tiny_project(
            "adapter=lora",
            "max_steps=2",
            "lora_r=4",
            "output_dir=" + str(tiny_project.tmp_path / "first"),
        )
    )
    second = train(
        tiny_project(
            "adapter=lora",
            "max_steps=2",
            f"lora_model_dir={first.output_dir}",
            "output_dir=" + str(tiny_project.tmp_path / "second"),
        )
    )
    from safetensors.torch import load_file

    before = load_file(first.output_dir / "adapter_model.safetensors")
    after = load_file(second.output_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # the same adapter (rank 4), trained further
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("adapter", [["adapter=lora"], []])
def test_gradient_checkpointing_trains_the_same(tiny_project, adapter):
    plain = train(
        tiny_project("max_steps=2", *adapter, "output_dir=" + str(tiny_project.tmp_path / "plain"))
    )
    checkpointed = train(
        tiny_project(
            "max_steps=2",
            *adapter,
            "gradient_checkpointing=true",
            "output_dir=" + str(tiny_project.tmp_path / "gc"),
        )
    )
    assert checkpointed.train_loss == pytest.approx(plain.train_loss, abs=1e-5)


def test_special_tokens_override_the_tokenizer(tiny_project):
    from sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_project("special_tokens={pad_token='<|im_start|>'}"))
    assert tokenizer.pad_token == "<|im_start|>"
    from sft.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown special token role 'padding'"):
        tiny_project("special_tokens={padding='x'}")


def test_run_says_how_many_rows_were_dropped_and_why(tiny_project, capsys):
    long_row = {
        "messages": [
            {"role": "user", "content": "word " * 400},
            {"role": "assistant", "content": "ok"},
        ]
    }
    with (tiny_project.tmp_path / "data.jsonl").open("a") as handle:
        handle.write('{"messages": broken}\n' + json.dumps(long_row) + "\n")
    train(tiny_project("max_steps=1", "adapter=lora", "invalid_rows=skip", "sequence_len=256"))
    out = capsys.readouterr().out
    assert "data: 24 train / 0 eval samples" in out
    assert (
        "data.jsonl: 26 rows in, 24 kept, dropped: invalid JSON: 1, longer than sequence_len: 1"
        in out
    )


@pytest.mark.parametrize(
    ("unit", "overrides", "noted"),
    [
        ("AMX", [], True),
        (None, [], False),  # no native bf16: fp32 is the right choice
        ("AMX", ["bf16=false"], False),  # chosen by the user
    ],
)
def test_fp32_on_a_cpu_with_native_bf16_suggests_bf16(
    tiny_project, monkeypatch, unit, overrides, noted
):
    import io

    import torch
    from rich.console import Console

    import sft.hardware
    from sft.train.run import _suggest_cpu_bf16

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the note is for CPU training")
    monkeypatch.setattr(sft.hardware, "cpu_bf16_unit", lambda: unit)
    out = io.StringIO()
    _suggest_cpu_bf16(tiny_project(*overrides), torch.float32, Console(file=out, width=200))
    assert ("this CPU has AMX bf16 matmuls; bf16 = true trains faster" in out.getvalue()) is noted


@pytest.mark.parametrize(
    ("dtype_name", "overrides", "slowdown", "fix"),
    [
        ("bfloat16", ["bf16=true"], 120.0, "fix: bf16 = false"),
        ("bfloat16", ["bfloat16=true"], 120.0, "fix: bfloat16 = false"),  # Axolotl's name
        ("float16", ["float16=true"], 40.0, "fix: float16 = false"),
        ("bfloat16", ["bf16=true"], 0.6, None),  # AMX: bf16 is the faster one
        # fp32 weights, 4-bit layers computing in bf16
        (
            "bfloat16",
            ["adapter=qlora", "load_in_4bit=true", 'bnb_4bit_compute_dtype="bfloat16"'],
            90.0,
            'fix: bnb_4bit_compute_dtype = "float32"',
        ),
    ],
)
def test_half_precision_on_a_cpu_without_its_matmul_unit_warns_with_the_measured_slowdown(
    tiny_project, monkeypatch, dtype_name, overrides, slowdown, fix
):
    import io

    import torch
    from rich.console import Console

    import sft.hardware
    from sft.model import resolve_dtype
    from sft.train.run import _warn_slow_cpu_half

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the warning is for CPU training")
    measured = []
    monkeypatch.setattr(
        sft.hardware, "cpu_matmul_slowdown", lambda dtype: measured.append(dtype) or slowdown
    )
    out = io.StringIO()
    config = tiny_project(*overrides)
    _warn_slow_cpu_half(config, resolve_dtype(config), Console(file=out, width=300))
    dtype = getattr(torch, dtype_name)
    assert measured == [dtype]  # measured in the dtype the matmuls compute in
    text = out.getvalue()
    if fix is None:
        assert text == ""
    else:
        assert f"a {dtype_name} matmul takes {slowdown:.0f}x as long as a float32 one" in text
        assert fix in text


def test_float32_training_measures_nothing(tiny_project, monkeypatch):
    import io

    import torch
    from rich.console import Console

    import sft.hardware
    from sft.train.run import _warn_slow_cpu_half

    def measure(dtype):
        raise AssertionError("float32 needs no measurement")

    monkeypatch.setattr(sft.hardware, "cpu_matmul_slowdown", measure)
    out = io.StringIO()
    _warn_slow_cpu_half(tiny_project(), torch.float32, Console(file=out))
    assert out.getvalue() == ""


def test_cpu_matmul_slowdown_measures_this_cpu():
    import torch

    from sft.hardware import cpu_bf16_unit, cpu_matmul_slowdown
    from sft.train.run import SLOW_HALF_MATMUL

    bf16 = cpu_matmul_slowdown(torch.bfloat16)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU {capability}, bf16 unit {cpu_bf16_unit()}: bf16 matmul {bf16:.1f}x float32")
    if cpu_bf16_unit() is not None:
        assert bf16 < SLOW_HALF_MATMUL  # a bf16 unit: no warning
    elif capability in ("AVX2", "DEFAULT"):
        assert bf16 >= SLOW_HALF_MATMUL  # no bf16 matmul kernel: torch's fallback loop
    else:
        pytest.skip(
            f"AVX-512 without a bf16 unit: emulated bf16 may be slower or not ({bf16:.1f}x)"
        )


def test_a_bf16_run_on_a_slow_cpu_warns_before_training(tiny_project, monkeypatch):
    import io

    import torch
    from rich.console import Console

    import sft.hardware
    from sft.train.run import train

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the warning is for CPU training")
    monkeypatch.setattr(sft.hardware, "cpu_matmul_slowdown", lambda dtype: 80.0)
    out = io.StringIO()
    result = train(tiny_project("bf16=true", "max_steps=1"), console=Console(file=out, width=300))
    assert result.global_step == 1
    text = out.getvalue()
    warning = text.index("warning: on this CPU a bfloat16 matmul takes 80x as long")
    assert "fix: bf16 = false" in text[warning:]
