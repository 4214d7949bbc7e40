"""Muon for the hidden matrices and AdamW for the rest, as one `torch.optim.Optimizer`.

Muon orthogonalises 2-D updates; embeddings, the output head and 1-D parameters (norms,
biases) are meant for AdamW (Keller Jordan's write-up; Axolotl does the same). The two inner
optimizers share this optimizer's param groups and state, so the Trainer's scheduler, gradient
clipping and checkpoints see one optimizer.
"""

from __future__ import annotations

from typing import Any

import torch


def _adamw_parameters(model: Any) -> set[int]:
    """Ids of the parameters Muon must not take: embeddings and the output head."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            ids.update(id(p) for p in module.parameters())
    for name, parameter in model.named_parameters():
        if "lora_embedding" in name:  # LoRA on an embedding layer
            ids.add(id(parameter))
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None:
        ids.update(id(p) for p in head.parameters())
    return ids


class MuonWithAdamW(torch.optim.Optimizer):
    """`param_groups` (sft's: weight decay and lr per group) split into Muon and AdamW groups."""

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        model: Any,
        lr: float,
        muon_options: dict[str, Any],
        adamw_options: dict[str, Any],
    ) -> None:
        excluded = _adamw_parameters(model)
        muon_groups, adamw_groups = [], []
        for group in param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            hidden = [p for p in group["params"] if p.ndim == 2 and id(p) not in excluded]
            rest = [p for p in group["params"] if p.ndim != 2 or id(p) in excluded]
            if hidden:
                muon_groups.append({**options, "params": hidden})
            if rest:
                adamw_groups.append({**options, "params": rest})
        if not muon_groups:
            raise ValueError("no hidden weight matrix is trainable: Muon would have nothing to do")
        self.muon = torch.optim.Muon(muon_groups, lr=lr, **muon_options)
        self.adamw = (
            torch.optim.AdamW(adamw_groups, lr=lr, **adamw_options) if adamw_groups else None
        )
        groups = self.muon.param_groups + (self.adamw.param_groups if self.adamw else [])
        for group in self.muon.param_groups:
            group["muon"] = True
        for group in self.adamw.param_groups if self.adamw else []:
            group["muon"] = False
        # The same group dicts: a scheduler's lr change reaches the inner optimizers.
        super().__init__(groups, {})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after a load)."""
        self.muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self.muon.state = self.state
        if self.adamw is not None:
            self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
            self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss
