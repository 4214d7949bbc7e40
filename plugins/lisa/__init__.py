"""LISA (layerwise importance sampling, arXiv 2403.17919; Axolotl's `lisa_*` keys): a full
fine-tune in which only `lisa_n_layers` randomly chosen decoder layers train at a time, a new
choice every `lisa_step_interval` optimizer steps. Embeddings, the head and the final norm train
throughout, as in Axolotl. The choice at step s is drawn from (`seed`, s), so a resumed run
trains the same layers as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem


@attrs.frozen
class LisaKeys:
    lisa_n_layers: int | None = key(
        None, ge=1, doc="LISA: how many decoder layers train at a time (full fine-tune)."
    )
    lisa_step_interval: int | None = key(
        None, ge=1, doc="LISA: optimizer steps between two draws of the trained layers."
    )
    lisa_layers_attribute: str = key(
        "model.layers", doc="LISA: where the decoder layers are, from the model (a dotted path)."
    )


def _settings(config: Config | None) -> LisaKeys | None:
    if config is None:
        return None
    keys = config.section(LisaKeys)
    return keys if keys.lisa_n_layers and keys.lisa_step_interval else None


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(LisaKeys)]


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    keys = config.section(LisaKeys)
    if bool(keys.lisa_n_layers) != bool(keys.lisa_step_interval):
        missing = "lisa_step_interval" if keys.lisa_n_layers else "lisa_n_layers"
        given = "lisa_n_layers" if keys.lisa_n_layers else "lisa_step_interval"
        return [
            Problem(given, f"LISA needs {missing} too", hint=f"set {missing}, or remove {given}")
        ]
    if _settings(config) is None:
        return []
    problems = []
    for name, why in (
        ("adapter", "LISA chooses which layers of a full fine-tune train; remove adapter"),
        ("unfrozen_parameters", "both choose which weights train; keep one of them"),
    ):
        if getattr(config, name):
            problems.append(Problem("lisa_n_layers", f"conflicts with {name}", hint=why))
    from sft.distributed import selected_backends, world_size

    if world_size() > 1:
        problems.append(
            Problem(
                "lisa_n_layers",
                f"LISA switches the trained layers while training, which DDP does not follow: "
                f"it runs in one process, and this run has {world_size()}",
                hint="launch one process (or remove lisa_n_layers / lisa_step_interval)",
                machine=True,
            )
        )
    for backend in selected_backends(config, config.plugin_set):
        # DeepSpeed's ZeRO steps every weight of its flat partitions (a frozen layer's missing
        # gradient is a zero, which Adam's moments and weight decay still move); FSDP shards
        # the requires_grad flags it saw when wrapping.
        problems.append(
            Problem(
                "lisa_n_layers",
                f"LISA freezes and unfreezes layers while training, which {backend.name} does "
                "not follow (it keeps updating the frozen layers or their shards)",
                hint=f"train without {backend.name} (one GPU), or remove lisa_n_layers",
            )
        )
    return problems


def decoder_layers(model: Any, attribute: str) -> Any:
    """The module list `attribute` names (e.g. "model.layers"), or a ModelError saying what the
    model has instead."""
    import torch

    found: Any = model
    for part in attribute.split("."):
        if not hasattr(found, part):
            children = ", ".join(name for name, _ in found.named_children()) or "none"
            raise ModelError(
                f"lisa_layers_attribute = {attribute!r}: {type(found).__name__} has no "
                f"{part!r} (its modules: {children})\n"
                "  fix: set lisa_layers_attribute to the dotted path of the decoder layers"
            )
        found = getattr(found, part)
    if not isinstance(found, torch.nn.ModuleList):
        raise ModelError(
            f"lisa_layers_attribute = {attribute!r} is a {type(found).__name__}, not a list of "
            "layers\n  fix: point it at the decoder layers' ModuleList (e.g. 'model.layers')"
        )
    return found


def draw(layer_count: int, n_layers: int, seed: int, step: int) -> list[int]:
    """The layers trained from `step` on: `n_layers` of `layer_count`, from (seed, step)."""
    import numpy as np

    rng = np.random.default_rng([seed, step])
    return sorted(int(i) for i in rng.choice(layer_count, n_layers, replace=False))


@hookimpl
def sft_patch_model(model: Any, config: Config) -> None:
    """Check the layers exist and outnumber lisa_n_layers, before any data is trained."""
    keys = _settings(config)
    if keys is None:
        return
    layers = decoder_layers(model, keys.lisa_layers_attribute)
    assert keys.lisa_n_layers is not None
    if keys.lisa_n_layers > len(layers):
        raise ModelError(
            f"lisa_n_layers = {keys.lisa_n_layers}, but {keys.lisa_layers_attribute} has "
            f"{len(layers)} layers\n  fix: set lisa_n_layers to at most {len(layers)}"
        )


@hookimpl
def sft_trainer_callbacks(config: Config) -> Sequence[Any]:
    keys = _settings(config)
    if keys is None:
        return []
    from transformers import TrainerCallback  # one process: sft_validate_config saw to it

    assert keys.lisa_n_layers is not None and keys.lisa_step_interval is not None
    n_layers, interval, seed = keys.lisa_n_layers, keys.lisa_step_interval, config.seed
    attribute = keys.lisa_layers_attribute

    class SwitchLayers(TrainerCallback):  # type: ignore[misc]
        """At every interval (and at the start or resume point): freeze every decoder layer
        but the ones drawn for this interval."""

        def __init__(self) -> None:
            self.active: list[int] | None = None

        def on_step_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
        ) -> None:
            if model is None or (self.active is not None and state.global_step % interval):
                return
            start = state.global_step - state.global_step % interval
            layers = decoder_layers(model, attribute)
            self.active = draw(len(layers), n_layers, seed, start)
            for index, layer in enumerate(layers):
                for parameter in layer.parameters():
                    parameter.requires_grad = index in self.active

    return [SwitchLayers()]
