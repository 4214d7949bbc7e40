"""Cross-entropy of a plain linear LM head, fused: the loss of one chunk of hidden states
without keeping (or differentiating through) its `[tokens × vocab]` log-softmax.

Forward computes the logits, their log-sum-exp and the target logits, and keeps only the chunk's
hidden states and log-sum-exps. Backward recomputes the logits with the same matmul and turns
them into softmax − one-hot in place: one pass over the vocabulary each way, where autograd's
`log_softmax` path makes four (the log-softmax and its recomputation under checkpointing, and
its backward). Same loss and gradients to float rounding (tests/plugins/test_chunked_ce.py).
"""

from __future__ import annotations

from typing import Any

import torch


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(softcap(hidden @ weight.T), targets)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float
    ) -> torch.Tensor:
        projected = hidden @ weight.T  # under autocast: in its dtype, as the head's own forward
        logits = projected.float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lse = torch.logsumexp(logits, dim=-1)
        loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap = softcap
        ctx.compute_dtype = projected.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        grad = (h @ w.T).float()  # the forward's logits, recomputed, then turned in place into
        capped = None  # d loss / d logits = softmax − one-hot
        if ctx.softcap:
            capped = torch.tanh(grad.div_(ctx.softcap))
            grad = torch.mul(capped, ctx.softcap)
        grad.sub_(lse[:, None]).exp_()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] -= 1
        grad.mul_(grad_loss)
        if capped is not None:  # through softcap · tanh(z / softcap): 1 − tanh²
            grad.mul_(1 - capped.square_())
        grad = grad.to(dtype)
        grad_hidden = (grad @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


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
