"""bitsandbytes optimizers on FSDP2's sharded parameters.

Under FSDP2 every parameter is a DTensor whose local shard is a plain tensor. bitsandbytes'
update kernels take plain tensors only (given a DTensor they fail: "got mixed torch.Tensor and
DTensor"), but they are elementwise over blocks of the flattened tensor: run on each process's
shard, they are the same optimizer with its blocks laid over the shard. `on_local_shards(cls)`
makes such an optimizer: each step hands bitsandbytes the shards and their gradients' shards,
and keeps the state keyed by the real parameters.

Checkpoints: a shard's 8-bit state (codes plus one scale per 256-value block of that shard) has
no place in the DTensor layout torch's distributed checkpointing expects, and bitsandbytes' own
FSDP wrapping would keep rank 0's shard only. So `state_dict()` gathers every process's shard
state of each parameter into one entry (`SHARDS`: process index → that process's state, on the
CPU, gathered over a gloo group), which is the same on every process: a full checkpoint written by rank 0 and a sharded one
written once both hold all of it. `load_state_dict()` takes this process's part back, bit for
bit, so a resumed run continues exactly; a checkpoint from another number of processes is
refused (its blocks fall on other shards). Gathering costs each process the whole 8-bit state
(2 bytes per parameter) in CPU memory while a checkpoint is written; resuming from a full state
dict with `rank0_only`, torch's loader broadcasts it through the GPU.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

SHARDS = "bnb_shards"  # the key of the gathered per-process states in a saved parameter state


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _to(state: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


_CPU_GROUPS: dict[int, Any] = {}


def _cpu_group() -> Any:
    """A gloo group over all processes (created once, by all of them: `state_dict` is a
    collective), so the gathered states stay in CPU memory; None when the default is gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    world = id(dist.group.WORLD)
    if world not in _CPU_GROUPS:
        _CPU_GROUPS[world] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[world]


def on_local_shards(cls: type) -> type:
    """A subclass of the bitsandbytes optimizer `cls` that updates DTensor parameters through
    their local shards (plain parameters as `cls` does)."""

    class OnLocalShards(cls):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            params = [p for group in self.param_groups for p in group["params"]]
            if not any(_is_sharded(p) for p in params):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            groups = [group["params"] for group in self.param_groups]
            by_param = self.state  # type: ignore[has-type]
            shards = [_local(p) for p in params]
            for param, shard in zip(params, shards, strict=True):
                if not shard.is_contiguous():  # bitsandbytes would update a copy
                    raise RuntimeError(f"a non-contiguous parameter shard {tuple(shard.shape)}")
                shard.grad = None if param.grad is None else _local(param.grad)
            # bitsandbytes reads and fills `self.state[shard]`: the same dicts, keyed by shard
            by_shard = {
                s: by_param[p] for p, s in zip(params, shards, strict=True) if p in by_param
            }
            self.state = defaultdict(dict, by_shard)
            try:
                for group in self.param_groups:
                    group["params"] = [_local(p) for p in group["params"]]
                super().step()
            finally:
                for group, own in zip(self.param_groups, groups, strict=True):
                    group["params"] = own
                for param, shard in zip(params, shards, strict=True):
                    if self.state.get(shard):
                        by_param[param] = self.state[shard]
                    shard.grad = None
                self.state = by_param
            return loss

        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            params = [p for group in self.param_groups for p in group["params"]]
            if not any(_is_sharded(p) for p in params):  # the same answer on every process
                return state
            import torch.distributed as dist

            mine = {}
            for i, param in enumerate(params):
                if _is_sharded(param) and (raw := self._raw_state(param)):
                    mine[i] = _to(raw, "cpu")
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine, group=_cpu_group())
            for i, param in enumerate(params):
                parts = {
                    str(rank): states[i] for rank, states in enumerate(everyone) if i in states
                }
                if _is_sharded(param) and parts:
                    step = state["state"].get(i, {}).get("step", 0)
                    state["state"][i] = {"step": step, SHARDS: parts}
            return state

        def _raw_state(self, param: torch.Tensor) -> dict[str, Any]:
            return {k: v for k, v in self.state.get(param, {}).items() if k != "step"}

        def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
            import torch.distributed as dist

            saved = [i for group in state_dict["param_groups"] for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            states = dict(state_dict["state"])
            gathered = {}
            for saved_id, param in zip(saved, params, strict=False):  # sizes: bitsandbytes checks
                entry = states.get(saved_id)
                if isinstance(entry, dict) and SHARDS in entry:
                    gathered[param] = (entry["step"], states.pop(saved_id)[SHARDS])
            super().load_state_dict({**state_dict, "state": states}, move_to_device)
            if not gathered:
                return
            distributed = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
            for param, (step, shards) in gathered.items():
                if len(shards) != world:
                    from sft.errors import ModelError

                    raise ModelError(
                        f"this checkpoint's {type(self).__name__} state was saved by "
                        f"{len(shards)} processes, and this run has {world}: bitsandbytes' "
                        "8-bit state is laid out over each process's shard of a parameter\n"
                        f"  fix: resume with {len(shards)} processes"
                    )
                self.state[param] = {"step": step, **_to(shards[str(rank)], _local(param).device)}

    OnLocalShards.__name__ = OnLocalShards.__qualname__ = f"{cls.__name__}OnLocalShards"
    return OnLocalShards
