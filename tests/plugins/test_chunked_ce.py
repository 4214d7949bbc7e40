"""Chunked cross-entropy: the same loss and gradients as the plain path, without full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama4

from sft.config import load_config_text
from sft.plugins.chunked_ce import ChunkedCEKeys, chunked_loss, patch
from sft.plugins.chunked_ce.fused import fusable_head
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
        if chunked:
            patch(model, chunk=7)  # chunks smaller than the trained tokens
            assert fusable_head(model.get_output_embeddings())  # the fused path is the one tested
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


def softcapped_model(softcap: float) -> torch.nn.Module:
    """A tiny Gemma 2, whose own forward applies final_logit_softcapping (Gemma 1's does not)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    config = Gemma2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=softcap,
        use_cache=False,
    )
    return Gemma2ForCausalLM(config)


@pytest.mark.parametrize("softcap", [None, 0.3])
def test_forwards_that_share_the_logits_scratch_keep_their_own_gradients(tokenizer, softcap):
    """The fused head writes every chunk's logits into one scratch kept from call to call:
    two forwards before one backward (the second smaller, the third larger than the scratch)
    still give the plain path's gradients."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for length, masked in ((40, 12), (24, 20), (60, 2)):
        ids = torch.randint(5, 500, (2, length), generator=generator)
        labels = ids.clone()
        labels[:, :masked] = -100
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})

    def run(chunked: bool):
        if softcap:  # small enough that tanh bends the logits
            model = softcapped_model(softcap)
        else:
            model = build_model(tokenizer, "llama", seed=2)
            model.config.use_cache = False
        if chunked:
            patch(model, chunk=64)
        first = model(**batches[0]).loss + model(**batches[1]).loss
        first.backward()
        second = model(**batches[2]).loss  # more trained tokens than the scratch holds
        second.backward()
        return (first, second), {n: p.grad for n, p in model.named_parameters()}

    plain, plain_grads = run(False)
    chunked, chunked_grads = run(True)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_head_loss_equals_the_checkpointed_one(dtype, softcap, frozen_head):
    """The fused path against the generic one (a hooked head takes the generic path), with
    a trainable or a frozen head (LoRA's), in fp32 and under bf16 autocast; under no_grad
    (evaluation) the fused loss is the same number."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 33, 16, generator=generator)
    labels = torch.randint(0, 300, (2, 33), generator=generator)
    labels[0, :5] = -100
    results = []
    for hooked in (False, True):
        head = torch.nn.Linear(16, 300, bias=False)
        torch.nn.init.normal_(head.weight, std=0.5, generator=torch.Generator().manual_seed(1))
        head.weight.requires_grad_(not frozen_head)
        if hooked:
            head.register_forward_pre_hook(lambda module, args: None)
        assert fusable_head(head) is not hooked
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = chunked_loss(h, labels, head, chunk=10, softcap=softcap)
            with torch.no_grad():
                evaluated = chunked_loss(h, labels, head, chunk=10, softcap=softcap)
        assert not evaluated.requires_grad
        torch.testing.assert_close(evaluated, loss.detach(), atol=0, rtol=0)
        loss.backward()
        assert (head.weight.grad is None) is frozen_head
        results.append((loss, h.grad, head.weight.grad))
    tolerance = (
        {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-2}
    )
    for fused, generic in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(fused, generic, **tolerance)


def test_a_scratch_made_under_inference_mode_does_not_break_training():
    """An evaluation under inference_mode that needs a larger scratch than training did, then
    a training step: the kept scratch stays an ordinary tensor that training can write."""
    head = torch.nn.Linear(16, 300, bias=False)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 300, (2, 9), generator=generator)
    scratch: list = []
    with torch.inference_mode():
        evaluated = chunked_loss(torch.randn(2, 9, 16), labels, head, 64, None, scratch=scratch)
    assert torch.isfinite(evaluated)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    chunked_loss(hidden, labels, head, 64, None, scratch=scratch).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


def test_no_trained_token_gives_no_nan_gradient():
    """Every label masked and a count of 0 (the loss is 0/0, as on the plain path): the head and
    the hidden states get no gradient rather than NaN, which clipping would spread to every
    parameter."""
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.full((2, 9), -100)
    loss = chunked_loss(hidden, labels, head, 64, None, num_items=torch.tensor(0))
    loss.backward()
    for grad in (hidden.grad, head.weight.grad):
        assert grad is None or torch.isfinite(grad).all()


@pytest.mark.parametrize("multimodal", [False, True])
def test_models_whose_decoder_is_nested_or_renamed_give_the_plain_loss(multimodal):
    """Llama 4's causal LM names its base model `language_model` but keeps it in `model`; the
    multimodal class holds a whole causal LM as its language model: the loss still reads the
    text decoder's hidden states, and equals the model's own."""
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    losses = []
    for chunked in (False, True):
        model = tiny_llama4(500, multimodal, experts=2, seed=3)
        model.config.use_cache = False
        if chunked:
            patch(model, chunk=5)
        out = model(input_ids=ids, labels=labels)
        assert (out.logits is None) == chunked
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_without_num_items_the_loss_is_the_mean_over_trained_tokens(tokenizer):
    # The eval path passes no num_items_in_batch: divide by the trained positions, as plain
    # cross-entropy with ignore_index does, never by all positions.
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (2, 30), generator=generator)
    labels = ids.clone()
    labels[:, :20] = -100  # a third of the positions are trained
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model = build_model(tokenizer, seed=3)
    model.config.use_cache = False
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        patch(model, chunk=7)
        chunked = model(**batch)
    assert chunked.logits is None  # the patched path ran
    torch.testing.assert_close(chunked.loss, expected, atol=1e-5, rtol=1e-5)


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


# -- token-weighted objectives: DFT and EAFT ------------------------------------------------------


def reference_weighted_loss(logits, labels, num_items, kind, alpha=1.0, k=20):
    """The objectives written out on the full logits tensor, as their papers define them."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    logits, targets = logits[keep], targets[keep]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if kind == "dft":
        weights = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1).detach()
    else:
        top = logits.detach().topk(k, dim=-1).values.softmax(-1)
        weights = (-(top * top.log()).sum(-1)) ** alpha
    return (losses * weights).sum() / num_items


@pytest.mark.parametrize("kind", ["dft", "eaft"])
def test_weighted_objectives_equal_their_definition_with_gradients(tokenizer, kind):
    from sft.plugins.chunked_ce import dft_weight, eaft_weight

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (2, 32), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    num_items = torch.tensor(44)

    reference_model = build_model(tokenizer, seed=3)
    logits = reference_model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    expected = reference_weighted_loss(logits, labels, num_items, kind, alpha=0.5, k=8)
    expected.backward()

    model = build_model(tokenizer, seed=3)
    patch(model, chunk=5, weight=dft_weight if kind == "dft" else eaft_weight(0.5, 8))
    loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for (name, param), (_, ref) in zip(
        model.named_parameters(), reference_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    plain = build_model(tokenizer, seed=3)(**batch, num_items_in_batch=num_items).loss
    assert abs(loss.item() - plain.item()) > 0.1  # the weight changes the loss


def config_of(text: str):
    return load_config_text('base_model = "m"\n' + text + '[[datasets]]\npath = "a"\n')


def test_weighted_objective_keys(plugins):
    from sft.errors import ConfigError
    from sft.plugins.chunked_ce import dft_weight, enabled, token_weight

    for name in ("use_dft", "use_dynamic_finetuning"):
        config = config_of(f"{name} = true\n")
        assert enabled(config) and token_weight(config) is dft_weight and config.warnings == ()
    assert enabled(config_of("use_eaft = true\neaft_k = 5\n"))
    with pytest.raises(ConfigError) as caught:
        config_of("use_eaft = true\nuse_dft = true\n")
    assert [p.message for p in caught.value.problems] == [
        "conflicts with use_dft: each weights the loss, choose one"
    ]
    with pytest.raises(ConfigError) as caught:
        config_of("eaft_alpha = 2.0\neaft_k = 5\n")
    assert {p.path: p.message for p in caught.value.problems} == {
        "eaft_alpha": "has no effect: use_eaft is off",
        "eaft_k": "has no effect: use_eaft is off",
    }


# The tiny random model's plain loss is about ln(vocab) ~ 6.2: DFT weights each token by p ~ 1/500,
# EAFT by the entropy of 20 near-equal logits, ~ ln(20) ~ 3.
@pytest.mark.parametrize(
    "setting, low, high", [("use_dft=true", 0.0, 0.1), ("use_eaft=true", 15, 22)]
)
def test_training_runs_the_weighted_objective(tiny_project, setting, low, high):
    from sft.train.run import train

    result = train(tiny_project("max_steps=2", "adapter=lora", setting))
    assert result.global_step == 2 and low < result.train_loss < high
