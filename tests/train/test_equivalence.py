"""Loss is normalised per trainable token across gradient accumulation, and merge-lora is exact."""

from __future__ import annotations

import torch

from sft.inference import load_trained, locate, merge_lora
from sft.train.run import train


def final_weights(result) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {
        n: p.detach().clone()
        for n, p in AutoModelForCausalLM.from_pretrained(result.output_dir).named_parameters()
    }


def test_micro_batch_4_accum_1_equals_micro_batch_1_accum_4(tiny_project):
    # SGD makes the update exactly lr × gradient, so any difference in loss normalisation shows.
    # The samples have different lengths and different trainable-token counts: a mean of
    # per-micro-batch means would give a different gradient than the per-token mean.
    common = [
        "optimizer=sgd",
        "learning_rate=0.5",
        "max_steps=1",
        "shuffle_merged_datasets=false",
        "lr_scheduler=constant",
        "max_grad_norm=0",
    ]
    write_four = tiny_project.tmp_path / "four.jsonl"
    lines = (tiny_project.tmp_path / "data.jsonl").read_text().splitlines()
    write_four.write_text("\n".join([lines[1], lines[6], lines[11], lines[23]]) + "\n")
    data = f"datasets[0].path={write_four}"
    one_batch = final_weights(
        train(
            tiny_project(
                *common,
                data,
                "micro_batch_size=4",
                "gradient_accumulation_steps=1",
                "output_dir=" + str(tiny_project.tmp_path / "a"),
            )
        )
    )
    accumulated = final_weights(
        train(
            tiny_project(
                *common,
                data,
                "micro_batch_size=1",
                "gradient_accumulation_steps=4",
                "output_dir=" + str(tiny_project.tmp_path / "b"),
            )
        )
    )
    base = final_weights(type("R", (), {"output_dir": tiny_project.tmp_path / "tiny"})())
    moved = max((one_batch[n] - base[n]).abs().max().item() for n in base)
    assert moved > 1e-3  # the step really changed the weights
    for name in base:
        torch.testing.assert_close(
            one_batch[name], accumulated[name], atol=1e-6, rtol=1e-5, msg=name
        )


def test_merged_model_gives_the_adapter_logits(tiny_project):
    from transformers import AutoModelForCausalLM

    result = train(
        tiny_project("adapter=lora", "lora_target_linear=true", "max_steps=4", "learning_rate=0.05")
    )
    trained = locate(result.output_dir)
    adapter_model, tokenizer = load_trained(trained)
    merged_dir = merge_lora(trained)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base, _ = load_trained(trained, base_only=True)
    ids = tokenizer("What is 7 plus 7?", return_tensors="pt")
    with torch.no_grad():
        expected = adapter_model(**ids).logits
        got = merged(**ids).logits
        before = base(**ids).logits
    assert (expected - before).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (merged_dir / "tokenizer.json").exists()
