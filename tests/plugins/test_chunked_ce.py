"""Chunked cross-entropy: the same loss and gradients as the plain path, without full logits."""

from __future__ import annotations

import pytest
import torch

from sft.config import load_config_text
from sft.plugins.chunked_ce import ChunkedCEKeys, patch
from sft.testing import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(eos_token="</s>")


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("packed", [False, True])
def test_loss_and_gradients_equal_the_plain_path(tokenizer, arch, packed):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (2, 40), generator=generator)
    labels = ids.clone()
    labels[:, :12] = -100
    labels[1, 30:] = -100
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)
    else:
        batch["attention_mask"] = torch.ones_like(ids)

    def run(chunked: bool):
        model = build_model(tokenizer, arch, seed=2)
        model.config.use_cache = False
        if arch == "gemma":
            model.config.final_logit_softcapping = 30.0
        if chunked:
            patch(model, chunk=7)  # chunks smaller than the trained tokens
        out = model(**batch, num_items_in_batch=torch.tensor(50))
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    plain, plain_grads = run(False)
    chunked, chunked_grads = run(True)
    assert chunked.logits is None  # no full logits tensor
    # The plain path divides by num_items_in_batch as the Trainer passes it.
    torch.testing.assert_close(chunked.loss, plain.loss, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_generation_and_label_free_calls_use_the_original_forward(tokenizer):
    model = build_model(tokenizer)
    reference = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    patch(model, chunk=4)
    torch.testing.assert_close(model(input_ids=torch.tensor([[5, 6, 7]])).logits, reference)
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape == (
        1,
        5,
    )


def test_keys_and_training_with_it(tiny_project):
    from sft.train.run import train

    config = tiny_project(
        "max_steps=3",
        "adapter=lora",
        "chunked_cross_entropy=true",
        "chunked_cross_entropy_chunk=16",
    )
    assert config.section(ChunkedCEKeys).chunked_cross_entropy
    result = train(config)
    assert result.train_loss is not None and result.global_step == 3


def test_chunk_size_is_bounded(plugins):
    from sft.errors import ConfigError

    with pytest.raises(ConfigError, match="chunked_cross_entropy_chunk"):
        load_config_text(
            'base_model = "m"\nchunked_cross_entropy_chunk = 2\n[[datasets]]\npath = "a"\n'
        )
