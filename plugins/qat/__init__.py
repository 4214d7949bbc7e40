"""`qat`: quantization-aware training with torchao's fake quantization (Axolotl's `qat` table).

The linear layers (and with `quantize_embedding` the embeddings) compute with weights rounded to
`weight_dtype` (integers in groups of `group_size`; float8 per row) and activations rounded per
token to `activation_dtype`, while the float weights train (straight-through gradients): the
model learns weights that survive quantization. `mxfp4` (OCP microscaling FP4, blocks of 32)
rounds weights and activations together, as torchao's MX QAT does; `nvfp4` (NVIDIA FP4, blocks of
16) rounds the weights, and the activations too when activation_dtype is nvfp4 (torchao's rounding,
an emulated matmul, so it runs on any device); `ternary` is Axolotl's BitNet b1.58 QAT, with int8
activations (rounding.py has both). `fake_quant_after_n_steps` trains in full precision first.
Before the final save the fake-quantized layers are swapped back to plain ones (ternary ones
holding their ternary values, as Axolotl saves them), so the saved model is an ordinary float model, ready for quantization with the same settings (e.g. torchao's
Int8DynamicActivationInt4WeightConfig). Full fine-tunes only, as in Axolotl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem

INT_DTYPES = tuple(f"int{bits}" for bits in range(1, 9))
FLOAT8_NAMES = ("float8_e4m3fn", "float8", "fp8")  # Axolotl's spellings of one type
MX_BLOCK = 32  # the OCP MX block size, the only one Axolotl's mxfp4 takes
NVFP4_BLOCK = 16  # NVFP4's block size
DTYPES = (*INT_DTYPES, *FLOAT8_NAMES, "mxfp4", "nvfp4", "ternary")
FIELDS = {
    "weight_dtype": "int1 … int8, float8_e4m3fn, mxfp4, nvfp4 or ternary: the weights' type",
    "activation_dtype": "int1 … int8, float8_e4m3fn, mxfp4, nvfp4 or blank: the activations' type",
    "group_size": "weights per quantization group (default 32)",
    "quantize_embedding": "also fake-quantize the input embeddings (default false)",
    "fake_quant_after_n_steps": "train in full precision for this many steps first",
}


@attrs.frozen
class QatKeys:
    qat: dict[str, Any] | None = key(
        None,
        doc="Quantization-aware training (torchao fake quantization of the linear layers): "
        "{weight_dtype = 'int4', activation_dtype = 'int8', group_size = 32, quantize_embedding "
        "= false, fake_quant_after_n_steps = N}; types int1…int8, float8_e4m3fn (fp8), "
        "mxfp4 (weights and activations), nvfp4 and ternary (int8 activations); full fine-tunes "
        "only.",
    )


@attrs.frozen
class QatSettings:
    weight_dtype: str
    activation_dtype: str | None = None
    group_size: int = 32
    quantize_embedding: bool = False
    fake_quant_after_n_steps: int | None = None


def settings_of(config: Config | None) -> QatSettings | None:
    table = config.section(QatKeys).qat if config is not None else None
    if not table:
        return None
    return QatSettings(**{k: v for k, v in table.items() if v is not None and v != ""})


def _table_problems(table: dict[str, Any]) -> list[Problem]:
    from sft.registry import did_you_mean

    problems = []
    for name in table:
        if name not in FIELDS:
            guess = did_you_mean(name, list(FIELDS))
            problems.append(
                Problem(
                    f"qat.{name}",
                    "unknown key" + (f"; did you mean {guess!r}?" if guess else ""),
                    hint="qat's keys: " + "; ".join(f"{k} ({v})" for k, v in FIELDS.items()),
                )
            )
    for name in ("weight_dtype", "activation_dtype"):
        value = table.get(name)
        if value in (None, ""):
            if name == "weight_dtype":
                problems.append(Problem("qat.weight_dtype", "is required", hint="e.g. 'int4'"))
            continue
        if value not in DTYPES:
            problems.append(
                Problem(
                    f"qat.{name}",
                    f"{value!r} is not supported by sft",
                    hint=f"one of {', '.join(DTYPES)}",
                )
            )
    problems += _mx_problems(table)
    problems += _nvfp4_problems(table)
    problems += _ternary_problems(table)
    per_row = {"ternary": "ternary", **{name: "float8" for name in FLOAT8_NAMES}}
    if table.get("weight_dtype") in per_row and table.get("group_size") not in (None, ""):
        problems.append(
            Problem(
                "qat.group_size",
                f"has no effect with {per_row[table['weight_dtype']]} weights: they are scaled "
                "per row",
                hint="remove group_size",
                warning=True,
            )
        )
    for name, low in (("group_size", 1), ("fake_quant_after_n_steps", 0)):
        value = table.get(name)
        if value not in (None, "") and (not isinstance(value, int) or value < low):
            problems.append(Problem(f"qat.{name}", f"expected an integer ≥ {low}, found {value!r}"))
    embedding = table.get("quantize_embedding")
    if embedding not in (None, "") and not isinstance(embedding, bool):
        problems.append(
            Problem("qat.quantize_embedding", f"expected true or false, found {embedding!r}")
        )
    return problems


def _mx_problems(table: dict[str, Any]) -> list[Problem]:
    """mxfp4 is one setting for weights and activations (torchao has no weight-only MX QAT),
    in blocks of 32, and its layers have no off switch."""
    weights, activations = table.get("weight_dtype"), table.get("activation_dtype")
    if "mxfp4" not in (weights, activations):
        return []
    problems = []
    # Axolotl's reading: mxfp4 weights with no activation_dtype round the activations too
    if weights != activations and activations not in (None, ""):
        other = "activation_dtype" if weights == "mxfp4" else "weight_dtype"
        problems.append(
            Problem(
                f"qat.{other}",
                "mxfp4 rounds weights and activations together: torchao's MX QAT has no "
                f"weight-only or mixed form, found {other} = {table.get(other)!r}",
                hint="set weight_dtype and activation_dtype both to 'mxfp4'",
            )
        )
    problems += _block_size_problems(table, "mxfp4", MX_BLOCK)
    for name, why in (
        ("quantize_embedding", "torchao's MX QAT has no embedding layer"),
        ("fake_quant_after_n_steps", "torchao's MX layers cannot be switched off"),
    ):
        if table.get(name) not in (None, "", False, 0):
            problems.append(
                Problem(f"qat.{name}", f"cannot be used with mxfp4: {why}", hint=f"remove {name}")
            )
    return problems


def _block_size_problems(table: dict[str, Any], dtype: str, block: int) -> list[Problem]:
    if table.get("group_size") in (None, "", block):
        return []
    return [
        Problem(
            "qat.group_size",
            f"{dtype} scales blocks of {block} values, found {table['group_size']!r}",
            hint=f"set group_size = {block} or remove it",
        )
    ]


def _ternary_problems(table: dict[str, Any]) -> list[Problem]:
    """Axolotl's ternary QAT: int8 activations (per-token absmax) or none."""
    weights, activations = table.get("weight_dtype"), table.get("activation_dtype")
    if weights == "ternary" and activations not in (None, "", "int8"):
        return [
            Problem(
                "qat.activation_dtype",
                f"ternary weights go with int8 activations or none, found {activations!r}",
                hint="set activation_dtype = 'int8', or remove it to round the weights only",
            )
        ]
    if activations == "ternary":
        return [
            Problem(
                "qat.activation_dtype",
                "ternary is a weight type",
                hint="set weight_dtype = 'ternary' and activation_dtype = 'int8'",
            )
        ]
    return []


def _nvfp4_problems(table: dict[str, Any]) -> list[Problem]:
    """nvfp4 weights, optionally with nvfp4 activations; blocks of 16; linear layers only."""
    weights, activations = table.get("weight_dtype"), table.get("activation_dtype")
    if "nvfp4" not in (weights, activations):
        return []
    problems = []
    if weights != "nvfp4":
        problems.append(
            Problem(
                "qat.weight_dtype",
                f"nvfp4 activations need nvfp4 weights, found weight_dtype = {weights!r}",
                hint="set weight_dtype = 'nvfp4'",
            )
        )
    elif activations not in (None, "", "nvfp4"):
        problems.append(
            Problem(
                "qat.activation_dtype",
                f"nvfp4 weights go with nvfp4 activations or none, found {activations!r}",
                hint="set activation_dtype = 'nvfp4', or remove it to round the weights only",
            )
        )
    problems += _block_size_problems(table, "nvfp4", NVFP4_BLOCK)
    if table.get("quantize_embedding") not in (None, "", False):
        problems.append(
            Problem(
                "qat.quantize_embedding",
                "cannot be used with nvfp4: torchao quantizes only linear layers to NVFP4, so "
                "the saved model's embeddings could not be quantized as they were trained",
                hint="remove quantize_embedding",
            )
        )
    return problems


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(QatKeys)]


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    table = config.section(QatKeys).qat
    if not table:
        return []
    problems = _table_problems(table)
    half = next((name for name in ("fp16", "float16") if getattr(config, name, False)), None)
    if "nvfp4" in (table.get("weight_dtype"), table.get("activation_dtype")) and half:
        problems.append(
            Problem(
                half,
                "cannot be used with nvfp4 QAT: torchao's NVFP4 rounding takes bfloat16 or "
                "float32 values only",
                hint="use bf16 = true (or full precision) with nvfp4",
            )
        )
    if config.adapter:
        problems.append(
            Problem(
                "qat",
                "quantization-aware training trains the model's own weights through fake "
                "quantization; it cannot be combined with an adapter (as in Axolotl)",
                hint="remove adapter for a full fine-tune, or remove qat",
            )
        )
    if config.load_in_4bit or config.load_in_8bit:
        problems.append(
            Problem("qat", "needs float weights to train; it conflicts with load_in_4bit/8bit")
        )
    from sft.hardware import installed

    if not installed("torchao"):
        problems.append(
            Problem(
                "qat",
                "needs torchao, which is not installed",
                hint="pip install torchao",
                machine=True,
            )
        )
    return problems


def _fake_quantize_config(dtype: str, group_size: int, activations: bool) -> Any:
    import torch

    if dtype == "mxfp4":
        from torchao.prototype.qat import MXFakeQuantizeConfig

        return MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=MX_BLOCK)
    if dtype in FLOAT8_NAMES:
        from torchao.quantization.qat import Float8FakeQuantizeConfig

        return Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)  # scaled per row
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if activations:
        return IntxFakeQuantizeConfig(getattr(torch, dtype), "per_token", is_symmetric=False)
    return IntxFakeQuantizeConfig(getattr(torch, dtype), group_size=group_size)


def _fake_quantize_configs(settings: QatSettings) -> tuple[Any, Any]:
    weights = _fake_quantize_config(settings.weight_dtype, settings.group_size, False)
    activation_dtype = settings.activation_dtype
    if settings.weight_dtype == "mxfp4":
        activation_dtype = "mxfp4"  # torchao's MX QAT rounds both (validated: not another type)
    activations = None
    if activation_dtype:
        activations = _fake_quantize_config(activation_dtype, settings.group_size, True)
    return activations, weights


def _check_mx_layers(model: Any, is_linear: Callable[[Any, str], bool]) -> None:
    """torchao's MX layers need input sizes in whole blocks, and do not train biases (their
    backward returns no bias gradient): both refused before training, naming a layer."""
    for name, module in model.named_modules():
        if not is_linear(module, name):
            continue
        if module.in_features % MX_BLOCK:
            raise ModelError(
                f"qat mxfp4: {name} takes {module.in_features} inputs, not a multiple of the "
                f"{MX_BLOCK}-value MX block\n  fix: use an integer or float8 qat type for this model"
            )
        if module.bias is not None:
            raise ModelError(
                f"qat mxfp4: {name} has a bias, which torchao's MX layers do not train (their "
                "backward gives it no gradient)\n  fix: use an integer or float8 qat type for "
                "this model"
            )


def _quiet_torchao_import() -> None:
    import logging

    # torchao built for another torch logs that its optional C++/CUDA kernels did not load;
    # fake quantization is plain PyTorch and needs none of them.
    logging.getLogger("torchao").setLevel(logging.ERROR)


@hookimpl
def sft_patch_model(model: Any, config: Config) -> None:
    settings = settings_of(config)
    if settings is None:
        return
    import torch

    _quiet_torchao_import()
    head = model.get_output_embeddings()

    def is_linear(module: Any, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    if settings.weight_dtype in ("nvfp4", "ternary"):
        _prepare_rounding_layers(model, settings, is_linear)
    else:
        _prepare_with_torchao(model, settings, is_linear)
    if settings.fake_quant_after_n_steps:
        set_fake_quant(model, enabled=False)


def _prepare_rounding_layers(
    model: Any, settings: QatSettings, is_linear: Callable[..., bool]
) -> None:
    from sft.plugins.qat import rounding

    if settings.weight_dtype == "nvfp4":
        activations = rounding.round_to_nvfp4 if settings.activation_dtype else None
        rounding.prepare(model, rounding.round_to_nvfp4, activations, is_linear, NVFP4_BLOCK)
        return
    activations = rounding.round_to_int8_per_token if settings.activation_dtype else None
    rounding.prepare(model, rounding.round_to_ternary, activations, is_linear)
    if settings.quantize_embedding:  # int8 rows, as Axolotl's ternary QAT does
        import torch
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        rows = IntxFakeQuantizeConfig(torch.int8, granularity="per_channel")
        quantize_(
            model,
            QATConfig(weight_config=rows, step="prepare"),
            filter_fn=lambda module, _name: isinstance(module, torch.nn.Embedding),
        )


def _prepare_with_torchao(
    model: Any, settings: QatSettings, is_linear: Callable[..., bool]
) -> None:
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activations, weights = _fake_quantize_configs(settings)
    if settings.weight_dtype == "mxfp4":
        _check_mx_layers(model, is_linear)
    try:
        quantize_(
            model,
            QATConfig(activation_config=activations, weight_config=weights, step="prepare"),
            filter_fn=is_linear,
        )
        if settings.quantize_embedding:
            quantize_(
                model,
                QATConfig(weight_config=weights, step="prepare"),
                filter_fn=lambda module, _name: isinstance(module, torch.nn.Embedding),
            )
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise ModelError(
            f"qat: torchao cannot fake-quantize this model with {settings}: {exc}\n  fix: "
            "choose a qat.group_size that divides the layers' input sizes (e.g. 32)"
        ) from exc


def set_fake_quant(model: Any, enabled: bool) -> int:
    """Turn every fake quantizer on or off; return how many there are."""
    count = 0
    for module in model.modules():
        for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
            quantizer = getattr(module, name, None)
            if quantizer is not None:
                quantizer.enabled = enabled
                count += 1
    return count


@hookimpl
def sft_trainer_callbacks(config: Config) -> Sequence[Any]:
    settings = settings_of(config)
    if settings is None or not settings.fake_quant_after_n_steps:
        return []
    from transformers import TrainerCallback

    start = settings.fake_quant_after_n_steps

    class StartFakeQuantization(TrainerCallback):  # type: ignore[misc]
        """Full precision for the first `start` steps, fake quantization from then on (also
        after a resume past that step)."""

        def on_step_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
        ) -> None:
            if model is not None:
                set_fake_quant(model, enabled=state.global_step >= start)

    return [StartFakeQuantization()]


@hookimpl
def sft_before_save(config: Config, model: Any, output_dir: str, trainer: Any) -> None:
    """The trained float weights, in plain layers: what a quantizer then reads."""
    settings = settings_of(config)
    if settings is None:
        return
    _quiet_torchao_import()
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from sft.plugins.qat import rounding

    target = trainer.model if trainer is not None else model
    rounding.convert(target, bake=settings.weight_dtype == "ternary")
    quantize_(
        target,
        QATConfig(step="convert"),  # no base config: only the swap back to plain layers
        filter_fn=lambda module, _name: isinstance(module, (torch.nn.Linear, torch.nn.Embedding)),
    )
