"""`chunked_cross_entropy = true`: the LM head and cross-entropy only where labels are trained,
in chunks, recomputed in backward — never the full `[tokens × vocab]` fp32 logits tensor.

Works on CPU and GPU with any causal LM whose `forward` splits into the decoder (the model's
`base_model_prefix` attribute) and the output embeddings. The loss equals the plain path's
(sum over trained tokens / `num_items_in_batch`), tested to 1e-5 in fp32 with its gradients.
Generation and calls without labels go through the model's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.errors import Problem

IGNORE = -100


@attrs.frozen
class ChunkedCEKeys:
    chunked_cross_entropy: bool = key(
        False,
        doc="LM head + cross-entropy only on trained tokens, in recomputed chunks (less memory).",
    )
    chunked_cross_entropy_chunk: int = key(
        1024, ge=16, doc="Tokens per chunk of the chunked cross-entropy."
    )
    cut_cross_entropy: bool | None = key(
        None,
        doc="Axolotl's Cut Cross-Entropy: runs as chunked_cross_entropy (the same saving, no full "
        "logits tensor); on by default when plugins lists its CutCrossEntropyPlugin.",
    )


CCE_INTEGRATION = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


def enabled(config: Config) -> bool:
    """chunked_cross_entropy, or Axolotl's Cut Cross-Entropy asked for (its key, or its plugin
    listed in `plugins`, where the key defaults to on as in Axolotl)."""
    keys = config.section(ChunkedCEKeys)
    if keys.chunked_cross_entropy or keys.cut_cross_entropy:
        return True
    return CCE_INTEGRATION in (config.plugins or ()) and keys.cut_cross_entropy is None


def chunked_loss(
    hidden: Any, labels: Any, head: Any, chunk: int, softcap: float | None, num_items: Any = None
) -> Any:
    """Sum of token cross-entropies over trained positions / (num_items or their count)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    shifted = labels[:, 1:]
    trained = shifted != IGNORE
    states = hidden[:, :-1][trained]
    targets = shifted[trained]

    def piece(h: Any, t: Any) -> Any:
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk):
        total = total + checkpoint(
            piece,
            states[start : start + chunk],
            targets[start : start + chunk],
            use_reentrant=False,
        )
    count = num_items if num_items is not None else trained.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def patch(model: Any, chunk: int) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    decoder = getattr(model, model.base_model_prefix)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(
        input_ids: Any = None, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any
    ) -> Any:
        if labels is None:
            return original(input_ids=input_ids, **kwargs)
        kwargs.pop("use_cache", None)
        outputs = decoder(input_ids=input_ids, use_cache=False, **kwargs)
        loss = chunked_loss(
            outputs.last_hidden_state,
            labels,
            model.get_output_embeddings(),
            chunk,
            softcap,
            num_items_in_batch,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = forward


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(ChunkedCEKeys, axolotl_integrations=(CCE_INTEGRATION,))]


# Keys of other plugins that replace the same LM head + loss path: whichever patched the
# model last would win, silently.
REPLACES_LOSS = ("liger_fused_linear_cross_entropy",)


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    keys = config.section(ChunkedCEKeys)
    default_chunk = attrs.fields(ChunkedCEKeys).chunked_cross_entropy_chunk.default
    if not enabled(config):
        if keys.chunked_cross_entropy_chunk != default_chunk:
            return [
                Problem(
                    "chunked_cross_entropy_chunk",
                    "has no effect: chunked_cross_entropy is off",
                    hint="set chunked_cross_entropy = true, or remove chunked_cross_entropy_chunk",
                )
            ]
        return []
    switch = "chunked_cross_entropy" if keys.chunked_cross_entropy else "cut_cross_entropy"
    problems = [
        Problem(
            switch,
            f"conflicts with {other}: both replace the LM head and loss, and only one can",
            hint=f"keep one of {switch} and {other}",
        )
        for other in REPLACES_LOSS
        if getattr(config, other, False)
    ]
    if not keys.chunked_cross_entropy:
        problems.append(
            Problem(
                switch,
                "Axolotl's Cut Cross-Entropy runs as sft's chunked cross-entropy: the same "
                "memory saving (no full logits tensor), the same loss",
                hint="set chunked_cross_entropy = true to silence this",
                warning=True,
            )
        )
    return problems


@hookimpl
def sft_patch_model(model: Any, config: Config) -> None:
    if enabled(config):
        patch(model, config.section(ChunkedCEKeys).chunked_cross_entropy_chunk)
