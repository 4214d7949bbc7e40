"""Axolotl's FSDP keys → one normalised `FsdpSettings`, every problem collected (no torch here).

Axolotl has written FSDP three ways over time, and all three are read:

- `fsdp_version = 2` + `[fsdp_config]` with plain names (`state_dict_type`, `offload_params`, ...);
- the same table with `fsdp_`-prefixed names (`fsdp_state_dict_type`, ...; also `fsdp_version`
  inside the table), as in its older examples;
- the list switch `fsdp = ["full_shard", "auto_wrap"]` (or the string `"full_shard auto_wrap"`;
  `offload` in it means `offload_params`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from sft.errors import Problem
from sft.registry import did_you_mean

STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
SHARDING_STRATEGIES = (
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "HYBRID_SHARD_ZERO2",
)
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
LIST_OPTIONS = ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2")
LIST_OPTIONS_ALL = (*LIST_OPTIONS, "offload", "auto_wrap")

# `fsdp_config` keys: name → expected kind. "bool", "int", "names" (a class name or a list of
# them), or a tuple of allowed (upper-case) strings.
TABLE_KEYS: dict[str, Any] = {
    "version": (1, 2),
    "reshard_after_forward": "bool",
    "sharding_strategy": SHARDING_STRATEGIES,
    "state_dict_type": (*STATE_DICT_TYPES, "LOCAL_STATE_DICT"),
    "final_state_dict_type": (*STATE_DICT_TYPES, "LOCAL_STATE_DICT"),
    "auto_wrap_policy": WRAP_POLICIES,
    "transformer_layer_cls_to_wrap": "names",
    "min_num_params": "int",
    "offload_params": "bool",
    "cpu_ram_efficient_loading": "bool",
    "activation_checkpointing": "bool",
    # FSDP1 only: FSDP2 has no such setting.
    "sync_module_states": "bool",
    "use_orig_params": "bool",
    "limit_all_gathers": "bool",
    "forward_prefetch": "bool",
    "backward_prefetch": BACKWARD_PREFETCH,
}
# FSDP1-only settings, and why each changes nothing under FSDP2 (which accelerate would only
# warn about, or refuse): given with FSDP2, each is a warning and is not passed on.
FSDP1_ONLY: dict[str, str] = {
    "sync_module_states": "every rank loads the same weights, and with "
    "cpu_ram_efficient_loading FSDP2 broadcasts rank 0's by itself",
    "use_orig_params": "FSDP2 always trains the original parameters",
    "limit_all_gathers": "it throttles FSDP1's all-gathers; FSDP2 schedules its own",
    "forward_prefetch": "it only changes speed, and FSDP2 prefetches by itself",
    "backward_prefetch": "it only changes speed, and FSDP2 prefetches by itself",
}
# Axolotl `fsdp_config` keys whose feature sft does not offer (named as such, never dropped).
UNSUPPORTED_TABLE_KEYS = {
    "mixed_precision_policy": "the mixed precision follows bf16 / fp16",
    "cpu_offload_pin_memory": "offloaded parameters are always kept in pinned memory",
    "activation_checkpointing_offload": "",
}


@attrs.frozen
class FsdpSettings:
    """What a config asks of FSDP, in one shape whichever way it was written."""

    version: int = 2
    # FSDP2: reshard after forward (True = ZeRO-3 like, False = ZeRO-2 like). FSDP1: a sharding
    # strategy name (full_shard, shard_grad_op, no_shard, hybrid_shard, hybrid_shard_zero2).
    reshard_after_forward: bool | str = True
    state_dict_type: str = "FULL_STATE_DICT"
    auto_wrap_policy: str = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: tuple[str, ...] | None = None
    min_num_params: int | None = None
    offload_params: bool = False
    cpu_ram_efficient_loading: bool = False
    activation_checkpointing: bool = False
    fsdp1: Mapping[str, Any] = attrs.field(factory=dict)  # FSDP1-only settings given

    def fsdp_config(self, layer_classes: tuple[str, ...] | None = None) -> dict[str, Any]:
        """`TrainingArguments.fsdp_config` (transformers' own key names; `fsdp=True` beside it).

        `layer_classes` are the decoder layer classes found on the model, used for
        TRANSFORMER_BASED_WRAP when the config names none.
        """
        result: dict[str, Any] = {
            "version": self.version,
            "reshard_after_forward": self.reshard_after_forward,
            "state_dict_type": self.state_dict_type,
            "auto_wrap_policy": self.auto_wrap_policy,
            "cpu_offload": self.offload_params,
            "cpu_ram_efficient_loading": self.cpu_ram_efficient_loading,
            "activation_checkpointing": self.activation_checkpointing,
        }
        if self.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
            classes = self.transformer_layer_cls_to_wrap or layer_classes
            if classes:
                result["transformer_layer_cls_to_wrap"] = list(classes)
        if self.auto_wrap_policy == "SIZE_BASED_WRAP" and self.min_num_params is not None:
            result["min_num_params"] = self.min_num_params
        result.update(self.fsdp1)
        return result


def list_options(value: Any) -> list[str]:
    """The options of Axolotl's `fsdp` switch: `true`, a list, or a space-separated string."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return []  # true/false/None, or a wrong type (reported by `resolve`)


def is_on(fsdp: Any, fsdp_version: Any, fsdp_config: Any) -> bool:
    """FSDP is selected by `fsdp` (true or a non-empty option list), `fsdp_version` or an
    `fsdp_config` table; `fsdp = false` turns it off whatever else is set."""
    if fsdp is False:
        return False
    return bool(fsdp is True or list_options(fsdp) or fsdp_version is not None) or (
        fsdp_config is not None
    )


def _table(fsdp_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[Problem]]:
    """The table with `fsdp_` prefixes removed; a key written both ways is a problem."""
    table: dict[str, Any] = {}
    written: dict[str, str] = {}
    problems = []
    for name, value in (fsdp_config or {}).items():
        plain = name.removeprefix("fsdp_")
        if plain in written:
            problems.append(
                Problem(
                    f"fsdp_config.{name}",
                    f"is {written[plain]!r} written again; keep one spelling",
                )
            )
            continue
        written[plain] = name
        table[plain] = value
    return table, problems


def _check_value(name: str, spelled: str, value: Any) -> tuple[Any, Problem | None]:
    """The value normalised (upper-case choices, names as a tuple), or a problem."""
    kind = TABLE_KEYS[name]
    path = f"fsdp_config.{spelled}"
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false"):  # YAML/accelerate style
            return value.lower() == "true", None
        return None, Problem(path, f"expected true or false, found {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value, None
        return None, Problem(path, f"expected a whole number ≥ 1, found {value!r}")
    if kind == "names":
        names = value.split(",") if isinstance(value, str) else value
        if (
            isinstance(names, (list, tuple))
            and names
            and all(isinstance(n, str) and n.strip() for n in names)
        ):
            return tuple(n.strip() for n in names), None
        return None, Problem(
            path,
            f"expected a class name or a list of them (e.g. 'LlamaDecoderLayer'), found {value!r}",
        )
    # a choice
    if name == "version":
        if value in kind and not isinstance(value, bool):
            return int(value), None
        return None, Problem(path, f"expected 1 or 2, found {value!r}")
    text = value.upper() if isinstance(value, str) else value
    if text in kind:
        return text, None
    guess = did_you_mean(str(text), list(kind)) if isinstance(text, str) else None
    return None, Problem(
        path,
        f"expected one of {', '.join(kind)}, found {value!r}"
        + (f"; did you mean {guess!r}?" if guess else ""),
    )


def resolve(
    fsdp: Any, fsdp_version: int | None, fsdp_config: Mapping[str, Any] | None
) -> tuple[FsdpSettings, list[Problem]]:
    """Read all three spellings into `FsdpSettings`; every problem found, together."""
    table, problems = _table(fsdp_config)
    if not (
        fsdp is None
        or isinstance(fsdp, (bool, str))
        or (isinstance(fsdp, (list, tuple)) and all(isinstance(o, str) for o in fsdp))
    ):
        problems.append(
            Problem(
                "fsdp",
                f"expected true or false, or a list of FSDP options, found {fsdp!r}",
                hint="e.g. fsdp = ['full_shard', 'auto_wrap'], or use fsdp_version + fsdp_config",
            )
        )
        fsdp = None
    spelled = {
        name.removeprefix("fsdp_"): name for name in (fsdp_config or {})
    }  # for messages: the user's own spelling
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name in UNSUPPORTED_TABLE_KEYS:
            reason = UNSUPPORTED_TABLE_KEYS[name]
            problems.append(
                Problem(
                    f"fsdp_config.{spelled[name]}",
                    "is an Axolotl FSDP setting that sft does not support"
                    + (f" ({reason})" if reason else ""),
                    hint="remove it",
                )
            )
            continue
        if name not in TABLE_KEYS:
            guess = did_you_mean(name, list(TABLE_KEYS))
            problems.append(
                Problem(
                    f"fsdp_config.{spelled[name]}",
                    "unknown FSDP setting" + (f"; did you mean {guess!r}?" if guess else ""),
                    hint=f"known settings: {', '.join(TABLE_KEYS)}",
                )
            )
            continue
        checked, problem = _check_value(name, spelled[name], value)
        if problem is not None:
            problems.append(problem)
        else:
            values[name] = checked

    # -- version: top-level fsdp_version, or (Axolotl's older spelling) inside the table -----
    version = fsdp_version
    if "version" in values:
        if version is not None and values["version"] != version:
            problems.append(
                Problem(
                    f"fsdp_config.{spelled['version']}",
                    f"is {values['version']} but fsdp_version is {version}; keep one",
                )
            )
        version = values["version"]
    version = version or 2

    # -- the list switch: fsdp = ["full_shard", "auto_wrap", "offload"] ------------------------
    strategy: str | None = None
    for option in list_options(fsdp):
        low = option.lower()
        if low in LIST_OPTIONS:
            if strategy is not None and strategy != low:
                problems.append(
                    Problem("fsdp", f"names two sharding strategies: {strategy}, {low}")
                )
            strategy = low
        elif low == "offload":
            if values.get("offload_params") is False:
                problems.append(
                    Problem(
                        "fsdp", "says offload but fsdp_config.offload_params is false; keep one"
                    )
                )
            values["offload_params"] = True
        elif low != "auto_wrap":  # auto wrapping is the default
            guess = did_you_mean(low, list(LIST_OPTIONS_ALL))
            problems.append(
                Problem(
                    "fsdp",
                    f"unknown FSDP option {option!r}"
                    + (f"; did you mean {guess!r}?" if guess else ""),
                    hint=f"options: {', '.join(LIST_OPTIONS_ALL)} (or set fsdp_config instead)",
                )
            )
    if "sharding_strategy" in values:
        named = values["sharding_strategy"].lower()
        if strategy is not None and strategy != named:
            problems.append(
                Problem(
                    f"fsdp_config.{spelled['sharding_strategy']}",
                    f"is {named.upper()} but fsdp says {strategy}; keep one",
                )
            )
        strategy = named

    # -- sharding: FSDP2 reshards after forward or not; FSDP1 names a strategy ----------------
    reshard: bool | str
    given = values.get("reshard_after_forward")
    if version == 2:
        if strategy in ("no_shard", "hybrid_shard", "hybrid_shard_zero2"):
            where = (
                f"fsdp_config.{spelled['sharding_strategy']}"
                if "sharding_strategy" in values
                else "fsdp"
            )
            problems.append(
                Problem(
                    where,
                    f"{strategy} is an FSDP1 sharding strategy; FSDP2 shards fully "
                    "(reshard_after_forward = true) or keeps parameters gathered between forward "
                    "and backward (reshard_after_forward = false)",
                    hint="use full_shard or shard_grad_op, or set fsdp_version = 1",
                )
            )
        implied = None if strategy is None else strategy == "full_shard"
        if given is not None and implied is not None and given != implied:
            problems.append(
                Problem(
                    f"fsdp_config.{spelled['reshard_after_forward']}",
                    f"is {str(given).lower()} but the sharding strategy {strategy} means "
                    f"{str(implied).lower()}; keep one",
                )
            )
        reshard = given if given is not None else (implied if implied is not None else True)
    else:
        if given is not None and strategy is not None:
            problems.append(
                Problem(
                    f"fsdp_config.{spelled['reshard_after_forward']}",
                    "with fsdp_version = 1 the sharding strategy says it; set one of them",
                )
            )
        if strategy is not None:
            reshard = strategy
        else:
            reshard = "shard_grad_op" if given is False else "full_shard"

    # -- checkpoints and the final save ---------------------------------------------------------
    for name in ("state_dict_type", "final_state_dict_type"):
        if values.get(name) == "LOCAL_STATE_DICT":
            problems.append(
                Problem(
                    f"fsdp_config.{spelled[name]}",
                    "LOCAL_STATE_DICT is not supported (FSDP2 has none, and its files load only "
                    "into the same number of processes)",
                    hint="use SHARDED_STATE_DICT (then `sft merge-sharded`) or FULL_STATE_DICT",
                )
            )
    if values.get("final_state_dict_type") == "SHARDED_STATE_DICT":
        problems.append(
            Problem(
                f"fsdp_config.{spelled['final_state_dict_type']}",
                "the final save is always a full state dict (an ordinary safetensors model or "
                "adapter); SHARDED_STATE_DICT applies to checkpoints only",
                hint="remove final_state_dict_type, or set it to FULL_STATE_DICT",
            )
        )

    # -- wrapping --------------------------------------------------------------------------------
    policy = values.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    if "transformer_layer_cls_to_wrap" in values and policy != "TRANSFORMER_BASED_WRAP":
        problems.append(
            Problem(
                f"fsdp_config.{spelled['transformer_layer_cls_to_wrap']}",
                f"is used only with auto_wrap_policy = TRANSFORMER_BASED_WRAP (it is {policy})",
            )
        )
    if "min_num_params" in values and policy != "SIZE_BASED_WRAP":
        problems.append(
            Problem(
                f"fsdp_config.{spelled['min_num_params']}",
                f"is used only with auto_wrap_policy = SIZE_BASED_WRAP (it is {policy})",
            )
        )
    if policy == "SIZE_BASED_WRAP" and "min_num_params" not in values:
        problems.append(
            Problem(
                f"fsdp_config.{spelled.get('auto_wrap_policy', 'auto_wrap_policy')}",
                "SIZE_BASED_WRAP needs min_num_params (the parameter count from which a module "
                "gets its own shard group)",
                hint="set fsdp_config.min_num_params, e.g. 100000000",
            )
        )

    # -- FSDP1-only settings -----------------------------------------------------------------------
    fsdp1 = {name: values[name] for name in FSDP1_ONLY if name in values}
    if version == 2:
        # Axolotl runs a table without any fsdp_version with FSDP1; sft with FSDP2.
        if fsdp_version or "version" in values:
            why = "fsdp_version = 2"
        else:
            why = "sft's default without fsdp_version; Axolotl's is FSDP1"
        for name in fsdp1:
            problems.append(
                Problem(
                    f"fsdp_config.{spelled[name]}",
                    f"has no effect under FSDP2 ({why}): {FSDP1_ONLY[name]}; the trained model "
                    "is the same",
                    hint="remove it to silence this, or set fsdp_version = 1 (deprecated in "
                    "transformers) to use it",
                    warning=True,
                )
            )
        fsdp1 = {}
    elif values.get("cpu_ram_efficient_loading") and fsdp1.get("sync_module_states") is False:
        problems.append(
            Problem(
                f"fsdp_config.{spelled['sync_module_states']}",
                "must be true with cpu_ram_efficient_loading under FSDP1: the other processes "
                "start from empty weights and receive the first process's by broadcast",
            )
        )

    settings = FsdpSettings(
        version=version,
        reshard_after_forward=reshard,
        state_dict_type=values.get("state_dict_type", "FULL_STATE_DICT"),
        auto_wrap_policy=policy,
        transformer_layer_cls_to_wrap=values.get("transformer_layer_cls_to_wrap"),
        min_num_params=values.get("min_num_params"),
        offload_params=values.get("offload_params", False),
        cpu_ram_efficient_loading=values.get("cpu_ram_efficient_loading", False),
        activation_checkpointing=values.get("activation_checkpointing", False),
        fsdp1=fsdp1,
    )
    return settings, problems
