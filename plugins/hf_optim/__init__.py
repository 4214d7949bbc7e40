"""Every optimizer transformers' Trainer knows (its `OptimizerNames`) that no other built-in
plugin registers — GaLore, APOLLO, LOMO, schedule-free, torchao 4/8-bit, AdEMAMix, ... — built
the way the Trainer builds it (`Trainer.get_optimizer_cls_and_kwargs`), and `muon`
(`torch.optim.Muon` on the hidden matrices, AdamW on the rest).

An optimizer whose package is missing, or that needs a GPU this machine lacks, is refused by
`sft validate` naming what to install; one that would silently ignore a key (weight decay,
warmup, a LoRA+ ratio, an `optim_args` option it does not read) is refused too.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, Optimizer
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem


@attrs.frozen
class HfOptimKeys:
    optim_args: str | dict[str, Any] | None = key(
        None,
        doc="Options of a transformers-built optimizer, as 'rank=64,scale=0.25' or a table "
        "{rank = 64} (GaLore, APOLLO, schedule-free, AdEMAMix, torchao, muon, ...).",
    )
    optim_target_modules: str | tuple[str, ...] | None = key(
        None,
        doc="GaLore / APOLLO: the linear modules whose gradients are projected: names, a "
        "regex string, or 'all_linear'.",
    )


@attrs.frozen
class Family:
    """What a group of optimizer names needs and reads."""

    package: tuple[str, str] | None  # (import name, pip name)
    options: frozenset[str]  # the optim_args it reads
    cuda: bool = False
    uses_model: bool = False


def _family(
    package: tuple[str, str] | None,
    options: Sequence[str] = (),
    cuda: bool = False,
    uses_model: bool = False,
) -> Family:
    return Family(package, frozenset(options), cuda, uses_model)


BNB = ("bitsandbytes", "bitsandbytes")
GALORE = ("galore_torch", "galore-torch")
APOLLO = ("apollo_torch", "apollo-torch")
LOMO = ("lomo_optim", "lomo-optim")
SCHEDULE_FREE = ("schedulefree", "schedulefree")
TORCHAO = ("torchao", "torchao")
GALORE_OPTIONS = ("rank", "update_proj_gap", "scale", "proj_type")
APOLLO_OPTIONS = ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type")
ADEMAMIX_OPTIONS = ("beta1", "beta2", "beta3", "alpha", "eps", "t_alpha", "t_beta3")
RMSPROP_OPTIONS = ("momentum", "alpha", "eps", "centered")
SCHEDULE_FREE_OPTIONS = ("weight_lr_power", "r")
MUON_OPTIONS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn", "eps")

# name → (family, description). The names other built-in plugins register (adamw_torch,
# adamw_torch_fused, sgd, adafactor, adamw_8bit, adamw_bnb_8bit, paged_adamw_8bit,
# paged_adamw_32bit, lion_8bit) are theirs; tests check that the two together cover every
# name of transformers' `OptimizerNames`.
OPTIMIZERS: dict[str, tuple[Family, str]] = {
    "adamw_torch_xla": (_family(("torch_xla", "torch-xla")), "torch_xla syncfree AdamW (TPU)"),
    "adamw_torch_npu_fused": (_family(("torch_npu", "torch-npu")), "torch_npu fused AdamW (NPU)"),
    "adamw_anyprecision": (
        _family(
            ("torchdistx", "torchdistx"),
            (
                "use_kahan_summation",
                "momentum_dtype",
                "variance_dtype",
                "compensation_buffer_dtype",
            ),
        ),
        "torchdistx AnyPrecisionAdamW (bf16 state, Kahan summation)",
    ),
    "adamw_torch_4bit": (
        _family(TORCHAO, ("block_size", "bf16_stochastic_round")),
        "torchao AdamW with 4-bit state (compiled on first step)",
    ),
    "adamw_torch_8bit": (
        _family(TORCHAO, ("block_size", "bf16_stochastic_round")),
        "torchao AdamW with 8-bit state (compiled on first step)",
    ),
    "ademamix": (_family(BNB, ADEMAMIX_OPTIONS), "bitsandbytes AdEMAMix (32-bit state)"),
    "ademamix_8bit": (_family(BNB, ADEMAMIX_OPTIONS), "bitsandbytes AdEMAMix, 8-bit state"),
    "paged_ademamix_32bit": (
        _family(BNB, ADEMAMIX_OPTIONS, cuda=True),
        "bitsandbytes AdEMAMix, state paged (CUDA)",
    ),
    "paged_ademamix_8bit": (
        _family(BNB, ADEMAMIX_OPTIONS, cuda=True),
        "bitsandbytes AdEMAMix, 8-bit state paged (CUDA)",
    ),
    "lion_32bit": (_family(BNB), "bitsandbytes Lion (32-bit state)"),
    "paged_lion_32bit": (_family(BNB, cuda=True), "bitsandbytes Lion, state paged (CUDA)"),
    "paged_lion_8bit": (_family(BNB, cuda=True), "bitsandbytes Lion, 8-bit state paged (CUDA)"),
    "rmsprop": (_family(None, RMSPROP_OPTIONS), "torch.optim.RMSprop"),
    "rmsprop_bnb": (_family(BNB, RMSPROP_OPTIONS), "bitsandbytes RMSprop"),
    "rmsprop_bnb_8bit": (_family(BNB, RMSPROP_OPTIONS), "bitsandbytes RMSprop, 8-bit state"),
    "rmsprop_bnb_32bit": (_family(BNB, RMSPROP_OPTIONS), "bitsandbytes RMSprop, 32-bit state"),
    "adagrad": (_family(None, ("lr_decay", "eps")), "torch.optim.Adagrad"),
    "galore_adamw": (
        _family(GALORE, GALORE_OPTIONS, uses_model=True),
        "GaLore AdamW: low-rank gradient projection (full fine-tune, optim_target_modules)",
    ),
    "galore_adamw_8bit": (
        _family(GALORE, GALORE_OPTIONS, cuda=True, uses_model=True),
        "GaLore AdamW with 8-bit state (CUDA)",
    ),
    "galore_adafactor": (
        _family(GALORE, GALORE_OPTIONS, uses_model=True),
        "GaLore Adafactor",
    ),
    "galore_adamw_layerwise": (
        _family(GALORE, GALORE_OPTIONS, uses_model=True),
        "GaLore AdamW, one optimizer step per parameter during backward (less memory)",
    ),
    "galore_adamw_8bit_layerwise": (
        _family(GALORE, GALORE_OPTIONS, cuda=True, uses_model=True),
        "GaLore AdamW 8-bit, layer-wise (CUDA)",
    ),
    "galore_adafactor_layerwise": (
        _family(GALORE, GALORE_OPTIONS, uses_model=True),
        "GaLore Adafactor, layer-wise",
    ),
    "apollo_adamw": (
        _family(APOLLO, APOLLO_OPTIONS, uses_model=True),
        "APOLLO: AdamW-level results with SGD-like memory (full fine-tune, optim_target_modules)",
    ),
    "apollo_adamw_layerwise": (
        _family(APOLLO, APOLLO_OPTIONS, uses_model=True),
        "APOLLO, layer-wise",
    ),
    "lomo": (
        _family(LOMO, uses_model=True),
        "LOMO: the update is fused into backward (no optimizer state, full fine-tune)",
    ),
    "adalomo": (
        _family(LOMO, cuda=True, uses_model=True),
        "AdaLomo: LOMO with adaptive learning rates (CUDA)",
    ),
    "grokadamw": (
        _family(
            ("grokadamw", "grokadamw"),
            ("alpha_init", "lamb", "gamma", "grokking_signal_decay_rate", "gradient_clipping"),
        ),
        "GrokAdamW",
    ),
    "schedule_free_adamw": (
        _family(SCHEDULE_FREE, SCHEDULE_FREE_OPTIONS),
        "schedule-free AdamW (lr_scheduler = 'constant'; warmup inside the optimizer)",
    ),
    "schedule_free_radam": (
        _family(SCHEDULE_FREE, SCHEDULE_FREE_OPTIONS),
        "schedule-free RAdam (no warmup needed)",
    ),
    "schedule_free_sgd": (
        _family(SCHEDULE_FREE, SCHEDULE_FREE_OPTIONS),
        "schedule-free SGD",
    ),
    "stable_adamw": (
        _family(("optimi", "torch-optimi"), ("decouple_lr", "max_lr", "kahan_sum")),
        "torch-optimi StableAdamW",
    ),
}
MUON = _family(None, MUON_OPTIONS, uses_model=True)
MUON_MIN_TORCH = (2, 9)

LOW_RANK = ("galore_", "apollo_")
NEED_WHOLE_MODEL = (*LOW_RANK, "lomo", "adalomo")  # update the model's own weights


def parse_optim_args(value: str | dict[str, Any] | None) -> dict[str, str]:
    """`optim_args` as transformers reads it: 'a=1,b=2' (spaces dropped) or a table."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): _text(v) for k, v in value.items()}
    parsed = {}
    for item in value.replace(" ", "").split(","):
        name, sep, text = item.partition("=")
        if not sep or not name or "=" in text:
            raise ValueError(f"{item!r} is not name=value")
        parsed[name] = text
    return parsed


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _truth(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


# -- checks (no torch import) --------------------------------------------------------------


def _installed(module: str) -> bool:
    from sft.hardware import installed

    return installed(module)


def _torch_version() -> tuple[int, int]:
    try:
        parts = importlib.metadata.version("torch").split(".")
        return int(parts[0]), int(parts[1])
    except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
        return (0, 0)


def _check(name: str) -> Callable[[Config], Sequence[Problem]]:
    family = MUON if name == "muon" else OPTIMIZERS[name][0]

    def check(config: Config) -> Sequence[Problem]:
        from sft.hardware import cuda_present

        problems = []
        keys = config.section(HfOptimKeys)
        if family.package and not _installed(family.package[0]):
            pip = family.package[1]
            problems.append(
                Problem(
                    "optimizer",
                    f"{name} needs the {pip} package, which is not installed here",
                    hint=f"pip install {pip}",
                    machine=True,
                )
            )
        if name == "muon" and _torch_version() < MUON_MIN_TORCH:
            problems.append(
                Problem(
                    "optimizer",
                    "muon is torch.optim.Muon, new in torch 2.9",
                    hint="pip install -U torch",
                    machine=True,
                )
            )
        if family.cuda and not cuda_present():
            problems.append(
                Problem(
                    "optimizer",
                    f"{name} runs on CUDA GPUs only, and none is visible here",
                    hint="choose another optimizer on this machine (sft plugins list)",
                    machine=True,
                )
            )
        try:
            options = parse_optim_args(keys.optim_args)
        except ValueError as exc:
            problems.append(
                Problem("optim_args", f"{exc}", hint="write 'name=value,name=value' or a table")
            )
            options = {}
        for option in sorted(set(options) - family.options):
            reads = ", ".join(sorted(family.options))
            problems.append(
                Problem(
                    f"optim_args.{option}",
                    f"{name} does not read this option",
                    hint=f"its options: {reads}" if reads else f"{name} reads no optim_args",
                )
            )
        low_rank = name.startswith(LOW_RANK)
        if low_rank and not keys.optim_target_modules:
            problems.append(
                Problem(
                    "optim_target_modules",
                    f"{name} projects the gradients of the linear modules named here",
                    hint="e.g. optim_target_modules = ['q_proj', 'v_proj'] or 'all_linear'",
                )
            )
        if keys.optim_target_modules and not low_rank:
            problems.append(
                Problem(
                    "optim_target_modules",
                    f"applies to GaLore and APOLLO optimizers, not {name}",
                    hint="remove it",
                )
            )
        if name.startswith(NEED_WHOLE_MODEL) and config.adapter:
            problems.append(
                Problem(
                    "optimizer",
                    f"{name} updates the model's own weights: it is for a full fine-tune, not "
                    f"an adapter (adapter = {config.adapter!r})",
                    hint="remove adapter, or choose adamw_torch",
                )
            )
        if name.startswith(NEED_WHOLE_MODEL) and config.loraplus_lr_ratio:
            problems.append(Problem("loraplus_lr_ratio", f"{name} builds its own parameter groups"))
        if name.endswith("_layerwise") or "lomo" in name:
            problems += _in_backward_problems(name, config)
        if name.startswith("schedule_free_"):
            problems += _schedule_free_problems(name, config)
        return problems

    return check


def _in_backward_problems(name: str, config: Config) -> list[Problem]:
    """Layer-wise GaLore/APOLLO and LOMO update each weight inside backward."""
    problems = []
    if config.gradient_accumulation_steps > 1:
        problems.append(
            Problem(
                "gradient_accumulation_steps",
                f"{name} updates each weight during backward, so gradients cannot be "
                "accumulated over micro-batches",
                hint="set gradient_accumulation_steps = 1 (raise micro_batch_size instead)",
            )
        )
    if config.max_grad_norm > 0:
        problems.append(
            Problem(
                "max_grad_norm",
                f"{name} updates each weight during backward, before the gradients could be "
                "clipped",
                hint="set max_grad_norm = 0",
            )
        )
    if name.endswith("_layerwise") and config.lr_scheduler in ("rex", "one_cycle"):
        problems.append(
            Problem(
                "lr_scheduler",
                f"{name} schedules each parameter's optimizer with a transformers schedule; "
                f"{config.lr_scheduler} is not one",
                hint="choose cosine, linear, constant, ... (docs/training.md)",
            )
        )
    return problems


def _schedule_free_problems(name: str, config: Config) -> list[Problem]:
    problems = []
    if config.lr_scheduler != "constant":
        problems.append(
            Problem(
                "lr_scheduler",
                f"{name} needs no schedule (it averages the iterates instead), found "
                f"{config.lr_scheduler!r}",
                hint="set lr_scheduler = 'constant' (warmup runs inside the optimizer)",
            )
        )
    if config.warmup_ratio is not None:
        problems.append(
            Problem(
                "warmup_ratio",
                f"{name} warms up inside the optimizer, which takes a step count",
                hint="use warmup_steps",
            )
        )
    elif config.warmup_steps is not None and 0 < config.warmup_steps < 1:
        problems.append(
            Problem(
                "warmup_steps",
                f"{name} warms up inside the optimizer, which takes a step count, not a "
                f"fraction ({config.warmup_steps:g})",
                hint="give warmup_steps as a whole number of steps",
            )
        )
    if name == "schedule_free_radam" and config.warmup_steps:
        problems.append(
            Problem("warmup_steps", "schedule_free_radam needs no warmup", hint="remove it")
        )
    return problems


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    """optim_args / optim_target_modules set for an optimizer of another plugin."""
    keys = config.section(HfOptimKeys)
    if config.optimizer in OPTIMIZERS or config.optimizer == "muon":
        return []
    return [
        Problem(
            key_name,
            f"applies to the optimizers of the hf_optim plugin, not {config.optimizer!r}",
            hint=f"remove it, or set {config.optimizer}'s own keys (docs/training.md)",
        )
        for key_name in ("optim_args", "optim_target_modules")
        if getattr(keys, key_name)
    ]


# -- building ------------------------------------------------------------------------------


def _training_args(name: str, config: Config) -> Any:
    """What `Trainer.get_optimizer_cls_and_kwargs` reads from TrainingArguments, from sft's keys."""
    import types

    from transformers.training_args import ParallelMode

    from sft.distributed import world_size

    keys = config.section(HfOptimKeys)
    options = parse_optim_args(keys.optim_args)
    targets: Any = keys.optim_target_modules
    if isinstance(targets, tuple):
        targets = list(targets)
    elif isinstance(targets, str) and targets.replace("-", "_") == "all_linear":
        targets = "all-linear"
    return types.SimpleNamespace(
        optim=name,
        optim_args=",".join(f"{k}={v}" for k, v in options.items()) or None,
        optim_target_modules=targets,
        learning_rate=config.learning_rate,
        adam_beta1=getattr(config, "adam_beta1", 0.9),
        adam_beta2=getattr(config, "adam_beta2", 0.999),
        adam_epsilon=getattr(config, "adam_epsilon", 1e-8),
        weight_decay=config.weight_decay,
        warmup_steps=int(config.warmup_steps or 0),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        parallel_mode=(
            ParallelMode.DISTRIBUTED if world_size() > 1 else ParallelMode.NOT_DISTRIBUTED
        ),
    )


def _fix_kwargs(name: str, kwargs: dict[str, Any], config: Config) -> None:
    """Where transformers reads an option wrongly, read it right (and pass sft's keys it drops)."""
    options = parse_optim_args(config.section(HfOptimKeys).optim_args)
    if name.startswith("rmsprop_bnb"):  # transformers passes these on as strings
        for option, text in options.items():
            kwargs[option] = _truth(text) if option == "centered" else float(text)
    if name == "stable_adamw":  # bool("False") is True in transformers' reading
        for option in ("decouple_lr", "kahan_sum"):
            if option in options:
                kwargs[option] = _truth(options[option])
    if name in ("lomo", "adalomo"):
        kwargs["weight_decay"] = config.weight_decay


def _decay_groups(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """GaLore/APOLLO groups with sft's weight decay: projected matrices and other trainable
    matrices decay, biases and norms do not; frozen parameters are left out."""
    result = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        options = {k: v for k, v in group.items() if k != "params"}
        if "rank" in options:  # the projected (target) group
            result.append({**options, "params": params, "weight_decay": weight_decay})
            continue
        matrices = [p for p in params if p.ndim >= 2]
        vectors = [p for p in params if p.ndim < 2]
        if matrices:
            result.append({**options, "params": matrices, "weight_decay": weight_decay})
        if vectors:
            result.append({**options, "params": vectors, "weight_decay": 0.0})
    return [group for group in result if group["params"]]


def _low_rank(name: str, config: Config, model: Any) -> Any:
    """GaLore / APOLLO through transformers, with sft's weight decay; the layer-wise variants
    get one optimizer per parameter stepped from a gradient hook, as transformers does (its
    own layer-wise Adafactor is built with relative_step on and fails)."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    layerwise = name.endswith("_layerwise")
    args = _training_args(name.removesuffix("_layerwise"), config)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = _decay_groups(kwargs.pop("params"), config.weight_decay)
    if not layerwise:
        return cls(groups, **kwargs)
    if args.parallel_mode.value == "distributed":
        raise ModelError(f"{name} does not run on several processes\n  fix: use {args.optim}")
    per_parameter: dict[Any, Any] = {}
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for parameter in group["params"]:
            per_parameter[parameter] = cls([{"params": [parameter], **options}], **kwargs)

    def step(parameter: torch.Tensor) -> None:
        if parameter.grad is not None:
            per_parameter[parameter].step()
            per_parameter[parameter].zero_grad()

    for parameter in per_parameter:
        parameter.register_post_accumulate_grad_hook(step)
    return LayerWiseDummyOptimizer(optimizer_dict=per_parameter, **kwargs)


def _factory(name: str) -> Callable[..., Any]:
    family = OPTIMIZERS[name][0]

    def build(param_groups: Any, config: Config, model: Any = None) -> Any:
        from transformers import Trainer
        from transformers.trainer_optimizer import is_optimizer_factory

        try:
            if name.startswith(LOW_RANK):
                return _low_rank(name, config, model)
            args = _training_args(name, config)
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
                args, model if family.uses_model else None
            )
            _fix_kwargs(name, kwargs, config)
            if is_optimizer_factory(cls):
                return cls()(model, **kwargs)
            groups = kwargs.pop("model") if "model" in kwargs else param_groups
            return cls(groups, **kwargs)
        except ImportError as exc:
            pip = family.package[1] if family.package else "the optimizer's package"
            raise ModelError(
                f"optimizer {name!r} cannot be built: {exc}\n  fix: pip install {pip}"
            ) from exc
        except (ValueError, TypeError, NotImplementedError, AssertionError) as exc:
            raise ModelError(
                f"optimizer {name!r} cannot be built: {exc}\n"
                "  fix: check optim_args / optim_target_modules (docs/training.md)"
            ) from exc

    return build


# -- muon ----------------------------------------------------------------------------------


def _muon(param_groups: Any, config: Config, model: Any) -> Any:
    """torch.optim.Muon for the hidden weight matrices; AdamW for embeddings, the output head
    and every 1-D parameter (Muon orthogonalises 2-D updates only)."""
    from sft.plugins.hf_optim.muon import MuonWithAdamW

    options = parse_optim_args(config.section(HfOptimKeys).optim_args)
    muon_options: dict[str, Any] = {"adjust_lr_fn": options.get("adjust_lr_fn", "match_rms_adamw")}
    for option, convert in (("momentum", float), ("ns_steps", int), ("eps", float)):
        if option in options:
            muon_options[option] = convert(options[option])
    if "nesterov" in options:
        muon_options["nesterov"] = _truth(options["nesterov"])
    adamw_options = {
        "betas": (getattr(config, "adam_beta1", 0.9), getattr(config, "adam_beta2", 0.999)),
        "eps": getattr(config, "adam_epsilon", 1e-8),
    }
    try:
        return MuonWithAdamW(
            param_groups,
            model,
            lr=config.learning_rate,
            muon_options=muon_options,
            adamw_options=adamw_options,
        )
    except ValueError as exc:
        raise ModelError(
            f"optimizer 'muon' cannot be built: {exc}\n  fix: check optim_args"
        ) from exc


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(HfOptimKeys)]


@hookimpl
def sft_register_optimizers(register: Callable[[Optimizer], None]) -> None:
    for name, (family, description) in OPTIMIZERS.items():
        register(
            Optimizer(
                name,
                _factory(name),
                _check(name),
                f"{description} — via transformers",
                uses_model=family.uses_model,
            )
        )
    register(
        Optimizer(
            "muon",
            _muon,
            _check("muon"),
            "torch.optim.Muon on hidden matrices, AdamW on embeddings, head and vectors",
            uses_model=True,
        )
    )
