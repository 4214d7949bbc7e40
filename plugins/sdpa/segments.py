"""Attention per packed sample: SDPA over each sample of a packed row, not over the whole bin.

With `sample_packing`, transformers' sdpa path builds a dense block-diagonal causal mask over
the whole bin, so attention time and memory grow with the square of the bin although samples
never attend to each other. Here each sample's queries attend to its own keys only: causal SDPA
per segment, the segments read from the positions that restart at 0 for every sample. The cost
is the sum of the samples' squares, no mask is built, and the result equals the masked one.

Used only where that holds (`applies`): a causal decoder with one attention kind for every layer
and neither logit soft-capping nor a sliding window shorter than a packed row. Batches without positions (or with a mask)
go through transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Any

NAME = "sft_sdpa_segments"
# Attention arguments some models pass that change the result (sinks, biases, capping, windows):
# with any of them the call goes to transformers' own sdpa function.
MODIFIERS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")
# Segments shorter than this run CPU SDPA in fp32 when the model computes in bf16/fp16: torch
# 2.13's CPU kernels take about twice as long in bf16 below ~256 tokens (forward + backward,
# 9 heads of 64, measured on AMX; equal at 256, bf16 ahead above).
CPU_UPCAST_BELOW = 256
_last_lengths = threading.local()


def applies(model_config: Any, sequence_len: int | None = None) -> bool:
    """Whether attention per segment equals the model's own attention on packed rows of
    `sequence_len` tokens (a sliding window at least that long never cuts a sample)."""
    configs = [model_config, getattr(model_config, "text_config", None)]
    for config in filter(None, configs):
        window = getattr(config, "sliding_window", None)
        if window and (sequence_len is None or window < sequence_len):
            return False
        if getattr(config, "attn_logit_softcapping", None):
            return False
        if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            return False
    return not getattr(model_config, "is_encoder_decoder", False)


def install(model: Any) -> None:
    """Register the segment attention with transformers and switch the model to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention)
    model.set_attn_implementation(NAME)


def sample_lengths(position_ids: Any, batch: int, length: int) -> list[list[int]]:
    """The lengths of the packed samples in each of the `batch` rows of `length` tokens: a
    sample starts where the positions restart at 0 (a row that starts mid-sample counts its
    first tokens as one sample). Every layer of a forward passes the same position tensor, so
    the answer for the last one is kept: one device-to-host read per forward, not per layer and
    row."""
    import torch

    key = (id(position_ids), position_ids._version, batch, length)
    cached = getattr(_last_lengths, "entry", None)
    if cached is not None and cached[0] == key and cached[1]() is position_ids:
        return cached[2]  # type: ignore[no-any-return]
    restarts = torch.nonzero(position_ids.expand(batch, length) == 0).tolist()
    starts: list[list[int]] = [[0] for _ in range(batch)]
    for row, column in restarts:
        if column:
            starts[row].append(column)
    lengths = [[end - start for start, end in itertools.pairwise([*row, length])] for row in starts]
    _last_lengths.entry = (key, weakref.ref(position_ids), lengths)
    return lengths


def segment_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function contract: (batch, heads, length, dim) in, the output as
    (batch, length, heads, dim) and no weights out."""
    import torch

    position_ids = kwargs.get("position_ids")
    if (
        attention_mask is not None
        or position_ids is None
        or not getattr(module, "is_causal", True)
        or any(kwargs.get(name) is not None for name in MODIFIERS)
        or query.shape[2] != key.shape[2]  # decoding with a cache
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    batch, heads, length, _ = query.shape
    grouped = key.shape[1] != heads
    dropout_p = dropout if module.training else 0.0
    # CPU SDPA in bf16/fp16 is slower than in fp32 on short sequences (its backward most):
    # those segments are computed in fp32, which is also the more precise result.
    low_precision_cpu = query.device.type == "cpu" and query.dtype in (
        torch.bfloat16,
        torch.float16,
    )
    upcast_below = CPU_UPCAST_BELOW if low_precision_cpu else 0

    def attend(q: Any, k: Any, v: Any) -> Any:
        """One sample's (1, heads, length, dim) inputs; its output as (1, length, heads, dim)."""
        upcast = q.shape[2] < upcast_below
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        # autocast would cast the fp32 inputs back to bf16
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=scaling, enable_gqa=grouped
            )
        return (out.to(query.dtype) if upcast else out).transpose(1, 2)

    # unbind and split rather than slicing: their backward writes each input's gradient once
    # (stack, cat), where every slice's backward would fill a zero tensor of the whole input
    # and autograd would add one such tensor per sample
    pieces = []
    rows = (query.unbind(0), key.unbind(0), value.unbind(0))
    for lengths, q_row, k_row, v_row in zip(
        sample_lengths(position_ids, batch, length), *rows, strict=True
    ):
        samples = (t.split(lengths, dim=1) for t in (q_row, k_row, v_row))
        for q, k, v in zip(*samples, strict=True):
            pieces.append(attend(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)))
    # the samples of all rows in order fill (batch × length): one copy into the layout
    # transformers expects, (batch, length, heads, dim)
    output = torch.cat(pieces, dim=1)
    return output.view(batch, length, *output.shape[2:]), None
