"""Cross-entropy of a plain linear LM head, fused: the loss over trained tokens without ever
holding (or differentiating through) a `[tokens × vocab]` log-softmax.

The tokens go through in chunks. For each chunk, forward computes the logits into one fp32
scratch, their log-sum-exp and the loss, and — when a backward will follow — turns the same
scratch into d loss / d logits = softmax − one-hot in place and multiplies it straight into the
gradients of the hidden states (`[tokens × hidden]`) and, for a trainable head, of its weight.
Backward only scales those by the incoming gradient. So the head's matmul runs once per chunk
plus the gradient matmuls, nothing is recomputed, and the only vocabulary-sized memory is the
scratch. On CPU the scratch is kept from call to call: a fresh `[chunk × vocab]` tensor for
every op would be a new mapping of hundreds of MiB each time, whose page faults cost as much as
the matmul (on a GPU the caching allocator already reuses the memory, so it is not held there).

The loss is a sum, so its gradient is these tensors times one scalar: computing them early is
exact. The price: a forward with gradients on holds them until its backward (for a trainable
head, one `[vocab × hidden]` tensor in the weight's dtype), and a forward whose backward never
comes has computed them for nothing (evaluate under no_grad). Same loss and gradients as
autograd's path to float rounding (tests/plugins/test_chunked_ce.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

# rows of a chunk whose softcapped logits are exponentiated at a time (a temporary of
# ROWS_PER_PASS × vocab, beside the scratch, holds them)
ROWS_PER_PASS = 64


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(softcap(hidden @ weight.T), targets), `chunk` rows at a
    time through `scratch` (fp32, at least `[min(chunk, rows), vocab]`). `with_grad`: compute
    the gradients now for the backward that follows (false under no_grad: the loss only)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        softcap: float,
        chunk: int,
        scratch: torch.Tensor,
        with_grad: bool,
    ) -> torch.Tensor:
        dtype = compute_dtype(hidden, weight)
        # no trained token: no gradient (None), as autograd's path gives none to scale by 1/0
        with_grad = with_grad and hidden.shape[0] > 0
        want_hidden = with_grad and ctx.needs_input_grad[0]
        want_weight = with_grad and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            logits = scratch[: h.shape[0]]
            with torch.autocast(hidden.device.type, enabled=False):
                if dtype == torch.float32:
                    torch.mm(h, w.T, out=logits)
                else:  # as the head's own forward under autocast: the matmul in its dtype
                    logits.copy_(h @ w.T)
            total += cross_entropy_grad_(
                logits, targets[start : start + chunk], softcap, want_hidden or want_weight
            )
            if not (want_hidden or want_weight):
                continue
            grad = logits if dtype == torch.float32 else logits.to(dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = grad @ w
                if grad_weight is not None and grad_weight.dtype == dtype:
                    grad_weight.addmm_(grad.T, h)
                elif grad_weight is not None:
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no second derivative
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss if grad_hidden is not None else None,
            grad_weight * grad_loss if grad_weight is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def cross_entropy_grad_(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float, with_grad: bool
) -> torch.Tensor:
    """Sum over rows of cross_entropy(softcap(logits), targets), with `logits` (fp32) turned in
    place into d sum / d logits when `with_grad` (into scratch values otherwise)."""
    if not softcap:
        return _softmax_pass_(logits, targets, with_grad)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], ROWS_PER_PASS):
        rows = logits[start : start + ROWS_PER_PASS]
        capped = rows.div_(softcap).tanh_()  # softcap · tanh(z / softcap) = softcap · capped
        scaled = capped * softcap
        total += _softmax_pass_(scaled, targets[start : start + ROWS_PER_PASS], with_grad)
        if with_grad:  # through softcap · tanh(z / softcap): 1 − tanh²
            capped.square_().neg_().add_(1).mul_(scaled)
    return total


def _softmax_pass_(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """The rows' summed cross-entropy; `logits` becomes softmax − one-hot (or, without
    `with_grad`, the unnormalised softmax)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(dim=-1, keepdim=True)
    peak.masked_fill_(~torch.isfinite(peak), 0.0)  # as torch.logsumexp: rows of ±inf
    sums = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    loss = (sums.log() + peak).squeeze(1).sub_(picked).sum()
    if with_grad:
        logits.div_(sums)
        logits[torch.arange(logits.shape[0], device=logits.device), targets] -= 1
    return loss


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's own forward would compute in: autocast's where it is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def logits_scratch(rows: int, weight: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """An fp32 `[rows, vocab]` scratch for LinearCrossEntropy: `kept` when it is large enough
    and on the head's device, else a new one — an ordinary tensor even under inference_mode
    (an inference tensor could not be written by a later training step)."""
    vocab = weight.shape[0]
    if (
        kept is not None
        and kept.device == weight.device
        and kept.shape[1] == vocab
        and kept.shape[0] >= rows
        and not kept.is_inference()
    ):
        return kept
    with torch.inference_mode(False):
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
