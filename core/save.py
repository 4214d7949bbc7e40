"""The core's default save (an `sft_save_model` implementation, `trylast`), model card, config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import sft
from sft import hookimpl
from sft.config.convert import to_dict
from sft.config.schema import Config
from sft.distributed import is_main_process
from sft.errors import ModelError
from sft.paths import REDACTED, redact

RESOLVED_CONFIG = "sft_config.yaml"
# Credentials a key may hold: written as null (the library then reads its own login or
# environment variable), so sft_config.yaml can be shared and pushed to the Hub.
SECRET_KEYS = ("comet_api_key",)


@hookimpl(trylast=True)
def sft_save_model(
    config: Config, model: Any, tokenizer: Any, output_dir: str, trainer: Any
) -> str:
    """Adapter (adapter_model.safetensors + adapter_config.json) or full model, + tokenizer.

    Through `trainer.save_model` when there is a trainer: it unwraps DDP and gathers FSDP and
    DeepSpeed ZeRO-3 weights (a collective: every rank calls it), and only the main process
    writes.
    """
    kind = "adapter" if config.adapter else "model"
    inner = getattr(model, "config", None)
    if inner is not None and hasattr(inner, "use_cache"):
        inner.use_cache = True  # training turned the cache off; generation wants it on
    if trainer is not None:
        trainer.save_model(output_dir)
    elif is_main_process():
        model.save_pretrained(output_dir, safe_serialization=True)
    if is_main_process():
        tokenizer.save_pretrained(output_dir)
    return kind


def write_resolved_config(config: Config, output_dir: Path) -> Path:
    """Every key with its effective value; `sft validate` / `sft run` accept the file as it is."""
    path = output_dir / RESOLVED_CONFIG
    data = to_dict(config)
    for name in SECRET_KEYS:
        if data.get(name) is not None:
            data[name] = None
    for entry in (*data["datasets"], *data["test_datasets"]):
        entry["path"] = redact(entry["path"])  # https://user:token@host/...
        if entry.get("storage_options"):  # may hold cloud credentials
            entry["storage_options"] = dict.fromkeys(entry["storage_options"], REDACTED)
    header = f"# resolved config written by sft {sft.__version__} (every key, defaults included)\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def read_resolved_config(directory: Path) -> dict[str, Any] | None:
    """The `sft_config.yaml` of a directory sft wrote (or None). A downloaded directory is
    untrusted input: the YAML is read with the config loader's bounds."""
    from sft.config.loader import YamlRefused, load_yaml

    path = directory / RESOLVED_CONFIG
    if not path.exists():
        return None
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (YamlRefused, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} cannot be read: {exc}") from None
    return data if isinstance(data, dict) else None


def write_model_card(config: Config, output_dir: Path, summary: dict[str, Any]) -> Path:
    # What was written decides (a plugin may save a full model from an adapter run: ReLoRA)
    adapter = config.adapter if (output_dir / "adapter_config.json").exists() else None
    kind = (
        f"{adapter} adapter (r={config.lora_r}, alpha={config.lora_alpha})"
        if adapter
        else "full fine-tune"
        if not config.adapter
        else f"full model: the base with the {config.adapter} updates merged"
    )
    datasets = "\n".join(
        f"- `{redact(d.path)}` ({d.type or 'pre-tokenized'})" for d in config.datasets
    )
    from sft.train.tracking import pushing

    # Pushed to the Hub, the card is read there: load from the repo, with the Hub's metadata.
    where = config.hub_model_id if pushing(config) else str(output_dir)
    load = (
        "from peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})"
        if adapter
        else "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({where!r})"
    )
    lines = [
        *(_hub_metadata(config) if pushing(config) else []),
        f"# {output_dir.name}",
        "",
        f"Fine-tuned from `{config.base_model}` with sft {sft.__version__}: {kind}.",
        "",
        "## Data",
        "",
        datasets,
        "",
        "## Training",
        "",
        f"- optimizer `{config.optimizer}`, learning rate {config.learning_rate:g}, schedule `{config.lr_scheduler}`",
        f"- micro batch {config.micro_batch_size} × accumulation {config.gradient_accumulation_steps}, sequence_len {config.sequence_len}",
        *(f"- {key}: {value}" for key, value in summary.items()),
        "",
        "## Use",
        "",
        "```python",
        load,
        "```",
        "",
        f"or `sft chat {output_dir}`. The full resolved config is in `{RESOLVED_CONFIG}`.",
        "",
        *(
            [
                "The Llama 4 experts are in the linearized layout (one `nn.Linear` per expert "
                "and projection, `llama4_linearized_experts`): transformers' own Llama 4 class "
                "does not load them; `sft chat` and `sft merge-lora` do.",
                "",
            ]
            if config.llama4_linearized_experts
            else []
        ),
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def _hub_metadata(config: Config) -> list[str]:
    """The model card's YAML header the Hub reads: library, tags, and the base model when it
    is a Hub id (a local path says nothing there)."""
    from pathlib import Path

    from sft.data.sources import is_local_path

    meta: dict[str, Any] = {"library_name": "peft" if config.adapter else "transformers"}
    base = config.base_model
    if not Path(base).expanduser().exists() and not is_local_path(base):
        meta["base_model"] = base
    meta["tags"] = ["sft", *(["lora"] if config.adapter else [])]
    return ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
