"""Cross-entropy of a plain linear LM head, fused: the loss of one chunk of hidden states
without keeping (or differentiating through) its `[tokens × vocab]` log-softmax.

Forward computes the logits, their log-sum-exp and the target logits, and keeps only the chunk's
hidden states and log-sum-exps. Backward recomputes the logits with the same matmul and turns
them into softmax − one-hot in place: one pass over the vocabulary each way, where autograd's
`log_softmax` path makes four (the log-softmax and its recomputation under checkpointing, and
its backward). All of it happens in one reused scratch tensor (see LinearCrossEntropy). Same
loss and gradients to float rounding (tests/plugins/test_chunked_ce.py).
"""

from __future__ import annotations

from typing import Any

import torch


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(softcap(hidden @ weight.T), targets).

    `scratch` is an fp32 `[≥ rows, vocab]` tensor that holds each chunk's logits in turn,
    forward and backward: every chunk of a step (and every step, when the caller keeps it)
    writes into the same pages. A fresh `[chunk × vocab]` tensor per matmul and per
    elementwise op would be a new mapping of hundreds of MiB each time, and on CPU its page
    faults cost as much as the head's matmul itself. Its contents are never read across calls
    (backward recomputes the logits), so one scratch serves any number of chunks and forwards.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        softcap: float,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        ctx.compute_dtype = compute_dtype(hidden, weight)
        logits = head_logits(hidden, weight, scratch, ctx.compute_dtype)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        peak.masked_fill_(~torch.isfinite(peak), 0.0)  # as torch.logsumexp: rows of ±inf
        lse = logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(1))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap = softcap
        ctx.scratch = scratch  # not saved: it is overwritten by the next chunk, by design
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad = head_logits(hidden, weight, ctx.scratch, dtype)  # recomputed, then turned in place
        capped = None  # into d loss / d logits = softmax − one-hot
        if ctx.softcap:
            capped = torch.tanh(grad.div_(ctx.softcap))
            grad.copy_(capped).mul_(ctx.softcap)
        grad.sub_(lse[:, None]).exp_()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] -= 1
        grad.mul_(grad_loss)
        if capped is not None:  # through softcap · tanh(z / softcap): 1 − tanh²
            grad.mul_(1 - capped.square_())
        h, w, g = hidden.to(dtype), weight.to(dtype), grad.to(dtype)
        grad_hidden = (g @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (g.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's own forward would compute in: autocast's where it is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, scratch: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`hidden @ weight.T` computed in dtype, as fp32 in the first rows of scratch."""
    logits = scratch[: hidden.shape[0]]
    with torch.autocast(hidden.device.type, enabled=False):
        if dtype == torch.float32:
            torch.mm(hidden.float(), weight.float().T, out=logits)
        else:
            logits.copy_(hidden.to(dtype) @ weight.to(dtype).T)
    return logits


def logits_scratch(rows: int, weight: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """An fp32 `[rows, vocab]` scratch for LinearCrossEntropy: `kept` when it is large enough
    and on the head's device, else a new one."""
    vocab = weight.shape[0]
    if (
        kept is not None
        and kept.device == weight.device
        and kept.shape[1] == vocab
        and kept.shape[0] >= rows
    ):
        return kept
    return torch.empty(rows, vocab, dtype=torch.float32, device=weight.device)


def fusable_head(head: Any) -> bool:
    """A plain `nn.Linear` without bias whose weight is an ordinary tensor: not wrapped by an
    adapter, sharded (FSDP's DTensor, DeepSpeed ZeRO-3) or hooked (an engine gathering it in a
    forward hook), so its weight can be read outside its forward."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and type(head.weight) is torch.nn.Parameter
        and not hasattr(head.weight, "ds_id")
        and not head._forward_hooks
        and not head._forward_pre_hooks
    )
