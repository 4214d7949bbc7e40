"""`chunked_cross_entropy = true`: the LM head and cross-entropy only where labels are trained,
in chunks, recomputed in backward — never the full `[tokens × vocab]` fp32 logits tensor.

Works on CPU and GPU with any causal LM whose `forward` splits into the decoder (the model's
text decoder: `text_decoder`, multimodal models' language model included) and the output
embeddings. The loss equals the plain path's
(sum over trained tokens / `num_items_in_batch`), tested to 1e-5 in fp32 with its gradients.
Generation and calls without labels go through the model's own forward.

The token-weighted objectives Axolotl offers run on the same path, each token's cross-entropy
times a weight computed without gradient:

- `use_dft` (Dynamic Fine-Tuning, Axolotl's `use_dynamic_finetuning` too): the model's
  probability of the label token, `p = exp(-CE)`.
- `use_eaft` (Entropy-Aware Focal Training): the entropy of the softmax over the `eaft_k`
  largest logits, to the power `eaft_alpha`.

The eval loss is the weighted loss as well (as in Axolotl, whose loss function serves both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.data.sample import IGNORE_INDEX
from sft.errors import ModelError, Problem


@attrs.frozen
class ChunkedCEKeys:
    chunked_cross_entropy: bool = key(
        False,
        doc="LM head + cross-entropy only on trained tokens, in recomputed chunks (less memory).",
    )
    chunked_cross_entropy_chunk: int = key(
        1024, ge=16, doc="Tokens per chunk of the chunked cross-entropy."
    )
    use_dft: bool = key(
        False,
        doc="Dynamic Fine-Tuning: each trained token's cross-entropy is weighted by the model's "
        "probability of that token (no gradient through the weight).",
    )
    use_dynamic_finetuning: bool = key(
        False, doc="Axolotl's other name for use_dft (its DFT on chunked cross-entropy)."
    )
    use_eaft: bool = key(
        False,
        doc="Entropy-Aware Focal Training: each trained token's cross-entropy is weighted by "
        "the entropy of the model's top-eaft_k prediction, to the power eaft_alpha.",
    )
    eaft_alpha: float = key(1.0, gt=0.0, doc="EAFT: exponent of the entropy weight.")
    eaft_k: int = key(20, ge=2, doc="EAFT: the largest logits whose softmax gives the entropy.")
    cut_cross_entropy: bool | None = key(
        None,
        doc="Axolotl's Cut Cross-Entropy: runs as chunked_cross_entropy (the same saving, no full "
        "logits tensor); on by default when plugins lists its CutCrossEntropyPlugin.",
    )


CCE_INTEGRATION = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


# weight(logits [n, vocab] fp32, token cross-entropies [n]) -> [n], computed without gradient
TokenWeight = Callable[[Any, Any], Any]


def dft_weight(logits: Any, cross_entropy: Any) -> Any:
    """DFT: the probability the model gives the label token."""
    return (-cross_entropy).exp()


def eaft_weight(alpha: float, k: int) -> TokenWeight:
    """EAFT: the entropy of the softmax over the k largest logits, to the power alpha."""

    def weight(logits: Any, cross_entropy: Any) -> Any:
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).values
        log_p = top.log_softmax(dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        return entropy.clamp_min(0.0).pow(alpha)

    return weight


def token_weight(config: Config) -> TokenWeight | None:
    keys = config.section(ChunkedCEKeys)
    if keys.use_dft or keys.use_dynamic_finetuning:
        return dft_weight
    if keys.use_eaft:
        return eaft_weight(keys.eaft_alpha, keys.eaft_k)
    return None


def enabled(config: Config) -> bool:
    """chunked_cross_entropy, a token-weighted objective (DFT, EAFT), or Axolotl's Cut
    Cross-Entropy asked for (its key, or its plugin listed in `plugins`, where the key defaults
    to on as in Axolotl)."""
    keys = config.section(ChunkedCEKeys)
    if keys.chunked_cross_entropy or keys.cut_cross_entropy or token_weight(config):
        return True
    return CCE_INTEGRATION in (config.plugins or ()) and keys.cut_cross_entropy is None


def chunked_loss(
    hidden: Any,
    labels: Any,
    head: Any,
    chunk: int,
    softcap: float | None,
    num_items: Any = None,
    weight: TokenWeight | None = None,
    scratch: list[Any] | None = None,
) -> Any:
    """Sum of token cross-entropies (each times `weight`'s, when given) over trained positions
    / (num_items or their count). `scratch`, a one-item list, keeps the fused head's logits
    scratch from call to call (see fused.py)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from sft.plugins.chunked_ce.fused import LinearCrossEntropy, fusable_head, logits_scratch

    shifted = labels[:, 1:]
    trained = shifted != IGNORE_INDEX
    states = hidden[:, :-1][trained]
    targets = shifted[trained]

    def piece(h: Any, t: Any) -> Any:
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if weight is None:
            return F.cross_entropy(logits, t, reduction="sum")
        losses = F.cross_entropy(logits, t, reduction="none")
        with torch.no_grad():
            weights = weight(logits, losses)
        return (losses * weights).sum()

    if weight is None and fusable_head(head):
        kept = scratch[0] if scratch else None
        buffer = logits_scratch(min(chunk, states.shape[0]), head.weight, kept)
        if scratch is not None and buffer.device.type == "cpu":  # see fused.py
            scratch[:] = [buffer]
        with_grad = torch.is_grad_enabled() and (states.requires_grad or head.weight.requires_grad)
        total = LinearCrossEntropy.apply(
            states, head.weight, targets, softcap or 0.0, chunk, buffer, with_grad
        )
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, states.shape[0], chunk):
            h, t = states[start : start + chunk], targets[start : start + chunk]
            total = total + checkpoint(piece, h, t, use_reentrant=False)
    count = num_items if num_items is not None else trained.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def text_decoder(model: Any) -> Any:
    """The module that turns input ids into the last hidden states the LM head reads: a causal
    LM's base model, or a multimodal model's language model (its text-only forward is the
    same). A language model that is itself a whole causal LM (Llama 4's) is descended into."""
    decoder = model.get_decoder()
    while decoder.get_output_embeddings() is not None:  # a whole LM, head and all
        inner = next(
            (
                module
                for name in ("model", "language_model", "transformer")
                if (module := getattr(decoder, name, None)) is not None
                and module is not decoder
                and hasattr(module, "forward")
            ),
            None,
        )
        if inner is None:
            raise ModelError(
                f"chunked cross-entropy cannot find the decoder inside {type(model).__name__} "
                "(the module whose forward gives the hidden states the LM head reads)\n"
                "  fix: set chunked_cross_entropy = false for this model"
            )
        decoder = inner
    return decoder


def patch(model: Any, chunk: int, weight: TokenWeight | None = None) -> None:
    import threading

    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    decoder = text_decoder(model)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    # the fused head's logits scratch, kept from step to step on CPU (its pages stay mapped);
    # one per thread, as two threads' forwards would otherwise write the same scratch
    per_thread = threading.local()

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
            weight,
            per_thread.__dict__.setdefault("scratch", []),
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
    fields = attrs.fields(ChunkedCEKeys)
    problems = [
        Problem(
            name,
            "has no effect: use_eaft is off",
            hint=f"set use_eaft = true, or remove {name}",
        )
        for name in ("eaft_alpha", "eaft_k")
        if not keys.use_eaft and getattr(keys, name) != getattr(fields, name).default
    ]
    dft = "use_dft" if keys.use_dft else "use_dynamic_finetuning"
    if keys.use_eaft and (keys.use_dft or keys.use_dynamic_finetuning):
        problems.append(
            Problem("use_eaft", f"conflicts with {dft}: each weights the loss, choose one")
        )
    if not enabled(config):
        if keys.chunked_cross_entropy_chunk != fields.chunked_cross_entropy_chunk.default:
            problems.append(
                Problem(
                    "chunked_cross_entropy_chunk",
                    "has no effect: chunked_cross_entropy is off",
                    hint="set chunked_cross_entropy = true, or remove chunked_cross_entropy_chunk",
                )
            )
        return problems
    if keys.chunked_cross_entropy:
        switch = "chunked_cross_entropy"
    elif keys.use_eaft:
        switch = "use_eaft"
    elif token_weight(config):
        switch = dft
    else:
        switch = "cut_cross_entropy"
    problems += [
        Problem(
            switch,
            f"conflicts with {other}: both replace the LM head and loss, and only one can",
            hint=f"keep one of {switch} and {other}",
        )
        for other in REPLACES_LOSS
        if getattr(config, other, False)
    ]
    if switch == "cut_cross_entropy":
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
        keys = config.section(ChunkedCEKeys)
        patch(model, keys.chunked_cross_entropy_chunk, token_weight(config))
