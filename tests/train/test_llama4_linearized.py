"""`llama4_linearized_experts`: Llama 4 MoE experts built as one nn.Linear per projection and
expert, loading checkpoints saved in that layout (Axolotl's linearized Llama 4 checkpoints)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama4
from safetensors.torch import load_file

from sft.errors import ModelError
from sft.train.run import train


def _loaded(config):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    return load_model(config, load_tokenizer(config), get_plugins())


def _linearized_state_dict(model) -> dict[str, torch.Tensor]:
    """The fused model's weights in the linearized layout: experts.gate_up_proj (E, H, 2I) →
    gate_projs.N / up_projs.N (I, H), experts.down_proj (E, I, H) → down_projs.N (H, I)."""
    state = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=-1)
            for e in range(tensor.shape[0]):
                state[f"{prefix}.gate_projs.{e}.weight"] = gate[e].T.contiguous()
                state[f"{prefix}.up_projs.{e}.weight"] = up[e].T.contiguous()
        elif leaf == "down_proj" and tensor.ndim == 3:
            for e in range(tensor.shape[0]):
                state[f"{prefix}.down_projs.{e}.weight"] = tensor[e].T.contiguous()
        else:
            state[name] = tensor
    return state


@pytest.fixture
def llama4(tiny_project):
    """A two-layer Llama 4 text MoE saved twice beside the tiny project's tokenizer: as
    transformers saves it (fused experts) and in the linearized layout."""
    from safetensors.torch import save_file

    from sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_project())
    model = tiny_llama4(len(tokenizer))
    fused = tiny_project.tmp_path / "llama4"
    model.save_pretrained(fused)
    tokenizer.save_pretrained(fused)
    linearized = tiny_project.tmp_path / "llama4-linearized"
    model.save_pretrained(linearized)  # config, generation config
    tokenizer.save_pretrained(linearized)
    (linearized / "model.safetensors").unlink()
    save_file(_linearized_state_dict(model), linearized / "model.safetensors")
    return fused, linearized


def test_a_linearized_checkpoint_loads_and_computes_what_the_fused_model_does(tiny_project, llama4):
    fused, linearized = llama4
    stock = _loaded(tiny_project(f"base_model={fused}")).eval()
    linear = _loaded(tiny_project(f"base_model={linearized}", "llama4_linearized_experts=true"))
    experts = linear.model.layers[0].feed_forward.experts
    assert type(experts).__name__ == "LinearizedLlama4Experts"
    assert len(experts.gate_projs) == 4 and isinstance(experts.down_projs[3], torch.nn.Linear)
    ids = torch.randint(0, stock.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(linear.eval()(ids).logits, stock(ids).logits)
    # transformers' own class is back for the next model
    from transformers.models.llama4 import modeling_llama4

    again = modeling_llama4.Llama4TextMoe(stock.config)
    assert type(again.experts) is modeling_llama4.Llama4TextExperts


def test_lora_trains_single_experts_of_a_linearized_checkpoint(tiny_project, llama4):
    _, linearized = llama4
    config = tiny_project(
        f"base_model={linearized}",
        "llama4_linearized_experts=true",
        "adapter=lora",
        r"lora_target_modules='.*(q_proj|experts\.gate_projs\.[0-9]+)'",  # one regex
        "max_steps=2",
    )
    result = train(config)
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.train_loss))
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    experts = sorted(name for name in saved if "experts.gate_projs" in name)
    assert len(experts) == 2 * 2 * 4, experts  # A and B, 2 layers, 4 experts
    assert any(saved[name].abs().sum() > 0 for name in experts if "lora_B" in name)
    assert "linearized layout" in (result.output_dir / "README.md").read_text()

    # chat and merge-lora load the base in the same layout; a merged model written elsewhere
    # (no sft_config.yaml beside it) is recognised by its weights
    from sft.cli import main
    from sft.inference import load_trained, locate

    adapted, _ = load_trained(locate(result.output_dir))
    merged_dir = tiny_project.tmp_path / "elsewhere" / "merged"
    assert main(["merge-lora", str(result.output_dir), "--output", str(merged_dir)]) == 0
    merged, _ = load_trained(locate(merged_dir))
    assert type(merged.model.layers[1].feed_forward.experts).__name__ == "LinearizedLlama4Experts"
    ids = torch.randint(0, merged.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_fused_checkpoint_with_the_key_is_refused_not_trained_from_noise(tiny_project, llama4):
    fused, _ = llama4
    with pytest.raises(ModelError, match=r"experts are stored fused") as error:
        _loaded(tiny_project(f"base_model={fused}", "llama4_linearized_experts=true"))
    assert "remove llama4_linearized_experts" in str(error.value)


def test_a_linearized_checkpoint_without_the_key_is_refused_not_trained_from_noise(
    tiny_project, llama4
):
    _, linearized = llama4
    with pytest.raises(ModelError, match=r"stores its Llama 4 experts linearized") as error:
        _loaded(tiny_project(f"base_model={linearized}"))
    assert "set llama4_linearized_experts = true" in str(error.value)


def test_the_key_on_another_model_is_refused(tiny_project):
    with pytest.raises(ModelError, match=r"is not a Llama 4 model"):
        _loaded(tiny_project("llama4_linearized_experts=true"))


def test_a_list_entry_that_names_no_module_is_refused_not_left_out(tiny_project, llama4):
    """Axolotl's Llama 4 example lists `experts.gate_projs.[0-9]+$`: peft matches list entries
    as names, so that one would attach nothing, silently."""
    from sft.model import apply_adapter

    _, linearized = llama4
    config = tiny_project(
        f"base_model={linearized}",
        "llama4_linearized_experts=true",
        "adapter=lora",
        "lora_target_modules=['q_proj', 'experts.gate_projs.[0-9]+$']",
    )
    with pytest.raises(
        ModelError, match=r"'experts.gate_projs.\[0-9\]\+\$' names no module"
    ) as error:
        apply_adapter(_loaded(config), config)
    assert "as one string" in str(error.value)
    config = tiny_project("adapter=lora", "lora_target_modules=['q_proj', 'w1']")
    with pytest.raises(ModelError, match=r"(?s)'w1' names no module.*linear modules are: .*q_proj"):
        apply_adapter(_loaded(config), config)


def test_the_multimodal_class_trains_on_text_with_linearized_experts(tiny_project, llama4):
    """Axolotl's Llama 4 examples load `Llama4ForConditionalGeneration` (the checkpoints are
    multimodal) and train it on text."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    fused, _ = llama4
    tokenizer = AutoTokenizer.from_pretrained(fused)
    model = tiny_llama4(len(tokenizer), multimodal=True)
    path = tiny_project.tmp_path / "llama4-multimodal-linearized"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "model.safetensors").unlink()
    save_file(_linearized_state_dict(model), path / "model.safetensors")
    config = tiny_project(
        f"base_model={path}",
        "model_type=Llama4ForConditionalGeneration",
        "llama4_linearized_experts=true",
        "adapter=lora",
        "lora_target_modules=['self_attn.q_proj', 'shared_expert.gate_proj']",
        "sample_packing=true",
        "chunked_cross_entropy=true",  # what Axolotl's CutCrossEntropyPlugin there maps to
        "max_steps=2",
    )
    (warning,) = [w for w in config.warnings if w.path == "model_type"]
    assert "trains here on text only" in warning.message
    result = train(config)
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.train_loss))
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    trained = [n for n in saved if "language_model" in n and "lora_B" in n]
    assert trained and all(saved[n].abs().sum() > 0 for n in trained), sorted(saved)
    # chat and merge-lora load the base with the class the run used
    from sft.cli import main
    from sft.inference import load_trained, locate

    adapted, _ = load_trained(locate(result.output_dir))
    assert type(adapted.base_model.model).__name__ == "Llama4ForConditionalGeneration"
    assert main(["merge-lora", str(result.output_dir)]) == 0
    merged, _ = load_trained(locate(result.output_dir / "merged"))
    ids = torch.randint(0, merged.config.text_config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoints_rebuild_the_model_in_the_runs_layout(tiny_project, llama4):
    """`sft merge-sharded` builds the run's model around the shards: linearized experts too."""
    from sft.sharded import _skeleton

    _, linearized = llama4
    config = tiny_project(f"base_model={linearized}", "llama4_linearized_experts=true")
    names = list(_skeleton(config, False, None).state_dict())
    assert any(".experts.gate_projs.3." in name for name in names)
    assert not any("gate_up_proj" in name for name in names)


def test_an_encoder_decoder_class_is_refused_when_it_loads(tiny_project):
    from transformers import T5Config, T5ForConditionalGeneration

    from sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_project())
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)
    )
    path = tiny_project.tmp_path / "t5"
    t5.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = tiny_project(f"base_model={path}", "model_type=T5ForConditionalGeneration")
    with pytest.raises(ModelError, match=r"an encoder-decoder model: sft fine-tunes decoder-only"):
        _loaded(config)
