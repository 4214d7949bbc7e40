"""GPU-only checks (marker `gpu`): skipped on CPU with the reason printed; run them with
`bash scripts/gpu_check.sh` on a CUDA machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs(module: str, install: str) -> pytest.MarkDecorator:
    """Skip, with the reason printed, unless CUDA and `module` are available."""
    if not torch.cuda.is_available():
        return pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    if not _installed(module):
        return pytest.mark.skip(reason=f"{module} is not installed ({install})")
    return pytest.mark.skipif(False, reason="")


def assert_packed_equals_unpacked(arch: str, attention: str, device: str = "cuda") -> None:
    """Three samples packed into one row give each sample's logits alone (bf16 tolerance)."""
    import datasets

    from sft.data.collate import Collator
    from sft.data.packing import PackedDataset
    from sft.testing import build_model, build_tokenizer

    tokenizer = build_tokenizer(eos_token="</s>")
    model = build_model(
        tokenizer, arch, attn_implementation=attention, hidden_size=128, num_heads=4
    ).to(device, torch.bfloat16)
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(5, 500, (n,), generator=generator).tolist()}
        for n in (9, 31, 17)
    ]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([r["input_ids"]], device=device)).logits[0].float()
            for r in rows
        ]
        batch = Collator(pad_id=0)(
            [PackedDataset(datasets.Dataset.from_list(rows), [[0, 1, 2]])[0]]
        )
        packed = (
            model(
                input_ids=batch["input_ids"].to(device),
                position_ids=batch["position_ids"].to(device),
            )
            .logits[0]
            .float()
        )
    start = 0
    for row, logits in zip(rows, alone, strict=True):
        n = len(row["input_ids"])
        torch.testing.assert_close(packed[start : start + n], logits, atol=3e-2, rtol=3e-2)
        start += n


@needs("flash_attn", "pip install 'sft-train[flash-attn]' --no-build-isolation")
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_flash_attention_2_packed_equals_unpacked_on_cuda(arch):
    assert_packed_equals_unpacked(arch, "flash_attention_2")


@needs("liger_kernel", "pip install 'sft-train[liger]'")
def test_liger_kernels_train_on_cuda(tiny_project):
    """In its own process: liger patches the transformers modeling modules for the whole
    process, so a later CPU model of the same architecture would get its Triton kernels."""
    import os
    import subprocess
    import sys

    from conftest import TINY_CONFIG

    tmp = tiny_project.tmp_path
    path = tmp / "liger.toml"
    path.write_text(TINY_CONFIG.replace("{tmp}", str(tmp)))
    sets = [
        "max_steps=3",
        "adapter=lora",
        "bf16=true",
        "liger_rms_norm=true",
        "liger_glu_activation=true",
        "liger_rope=true",
        "liger_fused_linear_cross_entropy=true",
    ]
    command = [sys.executable, "-m", "sft", "run", str(path)]
    command += [x for s in sets for x in ("--set", s)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "step 3/3" in done.stdout and (tmp / "out" / "adapter_model.safetensors").is_file()


def _cuda_only() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible on this machine")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_packed_equals_unpacked_on_cuda(arch):
    _cuda_only()
    assert_packed_equals_unpacked(arch, "flex_attention")


def test_flex_attention_trains_packed_on_cuda(tiny_project):
    _cuda_only()
    from sft.train.run import train

    result = train(
        tiny_project(
            "max_steps=3",
            "adapter=lora",
            "bf16=true",
            "sample_packing=true",
            "sequence_len=256",
            "attn_implementation=flex_attention",
        )
    )
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.train_loss))


def test_quantized_moe_experts_train_with_lora_on_cuda_in_bf16(tiny_project, tiny_moe):
    """On a GPU the weights are bf16, so peft takes its other proxy path (the full delta)."""
    _cuda_only()
    from safetensors.torch import load_file

    from sft.train.run import train

    result = train(
        tiny_project(
            f"base_model={tiny_moe}",
            "adapter=qlora",
            "load_in_4bit=true",
            "bf16=true",
            "quantize_moe_experts=true",
            "lora_target_modules=[q_proj]",
            "lora_target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']",
            "max_steps=3",
        )
    )
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.train_loss))
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    expert_lora = [name for name in saved if "experts" in name]
    assert len(expert_lora) == 4 and all(saved[n].abs().sum() > 0 for n in expert_lora)
