"""PyTorch scaled-dot-product attention (`attn_implementation = "sdpa"`, the default).

With `sample_packing`, the model attends within each packed sample only (`segments.py`): the
same result as transformers' block-diagonal mask over the whole row, at the cost of the samples
rather than of the row (`sdpa_per_sample`, on by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import plugin
from sft.plugins.sdpa import segments


@attrs.frozen
class SdpaKeys:
    sdpa_per_sample: bool = plugin.key(
        True,
        doc="With sample_packing on sdpa: attend within each packed sample (one SDPA call per "
        "sample) rather than through a block-diagonal mask over the whole row. The same "
        "result; attention then costs what the samples cost, not the square of the row. "
        "Models with logit soft-capping or a sliding window shorter than sequence_len use the "
        "mask either way.",
    )


@plugin.hookimpl
def sft_config_keys() -> Sequence[plugin.ConfigKeys]:
    return [plugin.ConfigKeys(SdpaKeys)]


@plugin.hookimpl
def sft_validate_config(config: plugin.Config) -> list[plugin.Problem]:
    if config.section(SdpaKeys).sdpa_per_sample:
        return []
    if config.sample_packing and config.attention == "sdpa":
        return []
    return [
        plugin.Problem(
            "sdpa_per_sample",
            "has no effect: it chooses how packed rows attend on sdpa, and this run "
            + ("does not pack" if not config.sample_packing else f"uses {config.attention}"),
            hint="remove sdpa_per_sample",
            warning=True,
        )
    ]


@plugin.hookimpl
def sft_register_attention_backends(register: Callable[[plugin.AttentionBackend], None]) -> None:
    register(
        plugin.AttentionBackend(
            name="sdpa",
            hf_implementation="sdpa",
            packing="mask",
            description="torch scaled_dot_product_attention; packed samples attend within "
            "themselves (per-sample SDPA, or a block-diagonal mask where a model needs one)",
        )
    )


@plugin.hookimpl
def sft_patch_model(model: Any, config: plugin.Config) -> None:
    if (
        config.sample_packing
        and config.attention == "sdpa"
        and config.section(SdpaKeys).sdpa_per_sample
        and segments.applies(model.config, config.sequence_len)
    ):
        segments.install(model)
