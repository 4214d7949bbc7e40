"""Generate `docs/axolotl.md`: which Axolotl keys sft supports, maps or refuses, by topic.

`python -m sft.config.axolotl_doc` prints the page, `--write` rewrites docs/axolotl.md; a test
fails when the committed page is stale. Supported keys come from the schema (the core and the
built-in plugins), refused and mapped keys from `sft.config.axolotl`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from sft.config import axolotl
from sft.config.schema import Config, DatasetConfig, doc_of, public_fields

if TYPE_CHECKING:
    from sft.manager import SftPlugins

DOC_PATH = Path(__file__).resolve().parent.parent.parent / "docs" / "axolotl.md"

TOPICS: tuple[str, ...] = tuple(axolotl.UNSUPPORTED_ROOT_BY_TOPIC)
DATASETS_TOPIC = "Datasets & formats"  # every `datasets:` entry key lands here


@attrs.frozen
class _Rule:
    topic: str
    keys: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()


def _rule(topic: str, keys: str = "", prefixes: str = "") -> _Rule:
    return _Rule(topic, frozenset(keys.split()), tuple(prefixes.split()))


# The topic of each top-level key sft reads: a key named here wins over a prefix; a key matching
# no name must match exactly one topic's prefixes (`topic_of` raises otherwise).
RULES: tuple[_Rule, ...] = (
    _rule(
        "Model & tokenizer",
        "revision_of_model trust_remote_code special_tokens tokens rope_scaling "
        "resize_token_embeddings_to_32x cls_model_config reinit_weights",
        "base_model tokenizer_ model_",
    ),
    _rule(
        "Quantization & adapters",
        "adapter unfrozen_parameters quantize_moe_experts llama4_linearized_experts qat "
        "model_quantization_config "
        "model_quantization_config_kwargs",
        "load_in_ lora_ peft_ loraplus_ bnb_",
    ),
    _rule(
        DATASETS_TOPIC,
        "datasets test_datasets val_set_size shuffle_merged_datasets curriculum_sampling sequence_len "
        "excess_length_strategy min_sample_len invalid_rows train_on_inputs pad_to_sequence_len "
        "eval_sample_packing default_system_message eot_tokens streaming "
        "streaming_multipack_buffer_size",
        "dataset_ sample_pack chat_template",
    ),
    _rule(
        "Training & optimizers",
        "seed batch_size micro_batch_size gradient_accumulation_steps num_epochs max_steps "
        "learning_rate weight_decay max_grad_norm neftune_noise_alpha dataloader_drop_last "
        "group_by_length use_dft use_dynamic_finetuning use_eaft objective",
        "optim adam_ sgd_ loss_watchdog_ eaft_ lisa_ relora",
    ),
    _rule("Schedules", "", "lr_ cosine_ warmup_ jagged_restart_"),
    _rule(
        "Precision & memory",
        "bf16 bfloat16 fp16 float16 tf32 activation_offloading lean_activations",
        "gradient_checkpointing",
    ),
    _rule(
        "Attention & kernels",
        "attn_implementation plugins experts_implementation xformers_attention sdpa_per_sample",
        "liger_ torch_compile chunked_cross_entropy cut_cross_entropy",
    ),
    _rule(
        "Evaluation",
        "early_stopping_patience load_best_model_at_end metric_for_best_model greater_is_better",
        "eval",
    ),
    _rule(
        "Saving & hub",
        "output_dir overwrite_output_dir push_to_hub auto_resume_from_checkpoints",
        "save hub_ resume_",
    ),
    _rule(
        "Tracking",
        "logging_steps use_tensorboard hf_mlflow_log_artifacts use_otel_metrics",
        "wandb_ use_wandb mlflow_ use_mlflow comet_ use_comet otel_metrics_",
    ),
    _rule(
        "Distributed",
        "dp_shard_size dp_replicate_size expert_parallel_size",
        "fsdp deepspeed ddp",
    ),
    _rule("RL & multimodal"),
)


def topic_of(name: str) -> str:
    """The topic of a top-level key sft reads; `ValueError` when none or several claim it."""
    named = [rule.topic for rule in RULES if name in rule.keys]
    if not named:
        named = [rule.topic for rule in RULES if name.startswith(rule.prefixes)]
    if len(named) != 1:
        claims = ", ".join(named) or "no topic"
        raise ValueError(f"key {name!r} is claimed by {claims}: name it in one RULES entry")
    return named[0]


@attrs.frozen
class Row:
    key: str  # as shown: `name`, or `datasets[].name`
    status: str
    notes: str


def _builtin(plugins: SftPlugins) -> set[str]:
    # Only sft's own plugins: the page must not depend on what else is installed.
    return {name for name, record in plugins.records.items() if record.package == "sft-train"}


def supported_keys(plugins: SftPlugins) -> list[tuple[str, str, str, str]]:
    """(scope, name, owner, doc) of every key sft reads: the core's, then built-in plugins'."""
    found = [("root", f.name, "core", doc_of(f)) for f in public_fields(Config)]
    found += [("dataset", f.name, "core", doc_of(f)) for f in public_fields(DatasetConfig)]
    builtin = _builtin(plugins)
    for plugin, keys in plugins.config_keys():
        if plugin in builtin:
            found += [(keys.scope, f.name, plugin, doc_of(f)) for f in public_fields(keys.cls)]
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _refused(entry: axolotl.Unsupported) -> str:
    notes = entry.what[0].upper() + entry.what[1:]
    if entry.instead:
        lead = "for the speed" if entry.speed_only else "instead"
        notes += f"; {lead}, {entry.instead}"
    return notes


SPEED_ONLY = "accepted, no effect: speed only"


def status_of(entry: axolotl.Unsupported) -> str:
    """The `sft` column of a key sft does not support: refused, or when it changes nothing."""
    if entry.speed_only:
        return SPEED_ONLY
    if entry.no_effect:
        return f"accepted, no effect (a warning): {entry.no_effect}"
    if entry.only_for_types:
        kinds = " / ".join(f"`{kind}`" for kind in entry.only_for_types)
        return f"refused with type {kinds}; no effect (a warning) with other types"
    if entry.only_with:
        keys = " / ".join(f"`{key}`" for key in entry.only_with)
        return f"refused; no effect (a warning) while {keys} are blank"
    if entry.detected_by_name:
        return (
            "refused; no effect (a warning) when base_model's name contains "
            f"`{entry.detected_by_name}`"
        )
    return "refused"


def rows_by_topic(plugins: SftPlugins) -> dict[str, list[Row]]:
    """Every supported and refused key, grouped by topic (mapped keys have their own table)."""
    rows: dict[str, list[Row]] = {topic: [] for topic in TOPICS}
    for scope, name, owner, doc in supported_keys(plugins):
        if scope == "root" and name in axolotl.MAPPED_KEYS:
            continue
        status = "supported" if owner == "core" else f"supported (plugin `{owner}`)"
        if scope == "dataset":
            rows[DATASETS_TOPIC].append(Row(f"`datasets[].{name}`", status, _cell(doc)))
        else:
            rows[topic_of(name)].append(Row(f"`{name}`", status, _cell(doc)))
    for topic, table in axolotl.UNSUPPORTED_ROOT_BY_TOPIC.items():
        rows[topic] += [Row(f"`{n}`", status_of(e), _cell(_refused(e))) for n, e in table.items()]
    rows[DATASETS_TOPIC] += [
        Row(f"`datasets[].{name}`", status_of(entry), _cell(_refused(entry)))
        for name, entry in axolotl.UNSUPPORTED_DATASET_KEYS.items()
    ]
    return rows


INTRO = """\
# Axolotl compatibility

<!-- generated by `python -m sft.config.axolotl_doc --write`; do not edit by hand -->

sft runs Axolotl's YAML configs: it uses Axolotl's key names and meanings. This page lists, by
topic, every Axolotl key sft knows and what it does with it:

- **supported**: sft reads the key, with Axolotl's meaning ([config reference](config.md) has
  its type and default). A few are sft's own.
- **mapped**: sft reads it as another key, or handles it its own way (table below).
- **refused**: sft does not support it. Set to a value that would change the run, the key is an
  error that says what it does in Axolotl and, where sft has one, what to use instead. A few
  refused keys change nothing in some configs, and are then a warning: one Axolotl only reads
  through another key while that key is blank, or a model-family hint Axolotl already sets
  itself from base_model's name.
- **accepted, no effect: speed only**: the key only picks a faster kernel for the same
  computation (the speed-only keys are listed in their own table below). sft trains the same
  model without it: set, it is a warning (`sft validate` and `sft run` show it), not an error.

A blank, null or `""` value of any key is the same as leaving the key out (Axolotl's example
configs list many keys blank, e.g. `wandb_project:`); a refused key set to `false` or an empty
list or table is accepted too. Any other key (a misspelling, or a key Axolotl itself would drop
unread) is an error, with a did-you-mean when a known key is close.

As in Axolotl, 0 means "none" for {zero_keys}.

Check a config on any machine, without a GPU: `sft validate --portable config.yaml`.
"""


def integrations(plugins: SftPlugins) -> list[tuple[str, str]]:
    """(Axolotl integration, built-in sft plugin standing in for it), for `plugins:` entries."""
    builtin = _builtin(plugins)
    return sorted(
        (path, plugin)
        for plugin, keys in plugins.config_keys()
        if plugin in builtin
        for path in keys.axolotl_integrations
    )


def axolotl_markdown(plugins: SftPlugins) -> str:
    zero_keys = ", ".join(f"`{key}`" for key in sorted(axolotl.ZERO_IS_BLANK))
    lines = [INTRO.format(zero_keys=zero_keys)]
    lines += ["## Mapped keys", "", "| key | what sft does |", "|---|---|"]
    lines += [f"| `{key}` | {_cell(does)} |" for key, does in axolotl.MAPPED_KEYS.items()]
    lines += [
        "",
        "## Accepted, no effect: speed only",
        "",
        "These only choose a faster kernel; the trained model is the same without them.\n"
        "Set, each is a warning, not an error (remove it to silence the warning).",
        "",
        "| key | what it does in Axolotl |",
        "|---|---|",
    ]
    lines += [
        f"| `{name}` | {_cell(_refused(entry))} |"
        for name, entry in axolotl.UNSUPPORTED_ROOT_KEYS.items()
        if entry.speed_only
    ]
    lines += [
        "",
        "## Keys Axolotl itself drops",
        "",
        "Some of Axolotl's example configs set keys that are not in Axolotl's schema: Axolotl\n"
        "drops them unread. sft accepts them with a warning that says what was presumably meant.",
        "",
        "| key | what was presumably meant |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | {_cell(meant)} |" for key, meant in axolotl.NOT_AXOLOTL_KEYS.items()]
    lines += [
        "",
        "## Axolotl integrations (`plugins:`)",
        "",
        "A `plugins:` entry loads when an installed sft plugin stands in for it:",
        "",
        "| Axolotl integration | sft plugin |",
        "|---|---|",
    ]
    lines += [f"| `{path}` | `{plugin}` |" for path, plugin in integrations(plugins)]
    lines += [
        f"| `{path}` | none: speed only ({_cell(what)}), a warning |"
        for path, what in axolotl.SPEED_ONLY_INTEGRATIONS.items()
    ]
    for topic, rows in rows_by_topic(plugins).items():
        lines += ["", f"## {topic}", "", "| key | sft | notes |", "|---|---|---|"]
        lines += [f"| {row.key} | {row.status} | {row.notes} |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.config.axolotl_doc", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"rewrite {DOC_PATH}")
    args = parser.parse_args(argv)

    from sft.manager import SftPlugins

    text = axolotl_markdown(SftPlugins.load(environ={}))
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
