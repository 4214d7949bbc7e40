"""ReLoRA's restarts: merge, restart LoRA, prune the optimizer state; checkpoint and final save."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sft.config.schema import Config
from sft.errors import ModelError
from sft.plugins.relora import PRUNE_DEFAULT, keys_of

STATE_DIR = "relora"  # inside a checkpoint
STATE_FILE = "state.safetensors"
INFO_FILE = "state.json"
ADAPTER = "default"
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state


def _is_4bit(layer: torch.nn.Module) -> bool:
    return type(layer.weight).__name__ == "Params4bit"


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """The model's LoRA layers by the name of their base layer in the plain model
    (`model.layers.0.self_attn.q_proj`); anything ReLoRA cannot merge is a `ModelError`."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if ADAPTER not in module.lora_A and ADAPTER not in module.lora_embedding_A:
            continue
        plain = isinstance(base, (torch.nn.Linear, torch.nn.Embedding)) or _is_4bit(base)
        if not plain or module.use_dora.get(ADAPTER) or module.lora_bias.get(ADAPTER):
            raise ModelError(
                f"relora: cannot merge the adapter on {name} ({type(base).__name__}"
                f"{', DoRA' if module.use_dora.get(ADAPTER) else ''}"
                f"{', lora_bias' if module.lora_bias.get(ADAPTER) else ''}): ReLoRA merges "
                "plain LoRA on linear, embedding and 4-bit linear layers\n  fix: target those "
                "layers only (lora_target_modules), or remove relora"
            )
        found[name.removeprefix("base_model.model.")] = module
    if not found:
        raise ModelError("relora: the model has no LoRA layers to merge\n  fix: set adapter")
    return found


def _prune(values: torch.Tensor, method: str, ratio: float) -> None:
    """Zero a `ratio` share of `values` in place: the smallest magnitudes, or random ones."""
    if method == "magnitude":
        magnitude = values.abs().flatten().float()
        keep = magnitude > torch.quantile(magnitude, ratio) if magnitude.numel() else magnitude
        values.mul_(keep.reshape(values.shape).to(values.dtype))
    else:
        values.mul_((torch.rand(values.shape, device=values.device) > ratio).to(values.dtype))


def prune_optimizer_state(
    optimizer: Any, params: list[torch.Tensor], method: str, ratio: float
) -> int:
    """Prune the AdamW state of `params` (torch's moments, bitsandbytes' 32-bit states, or its
    8-bit ones through their block scales); return how many tensors were pruned."""
    import bitsandbytes.functional as bnb_functional

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    pruned = 0
    for param in params:
        state = inner.state.get(param) or {}
        for name, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue
            if value.dtype == torch.uint8:  # bitsandbytes: codes + one scale per block
                index = name.removeprefix("state")
                code, absmax = state[f"qmap{index}"], state[f"absmax{index}"]
                values = bnb_functional.dequantize_blockwise(
                    value, absmax=absmax, code=code, blocksize=BNB_BLOCK
                )
                _prune(values, method, ratio)
                codes, quant_state = bnb_functional.quantize_blockwise(
                    values, code=code, blocksize=BNB_BLOCK
                )
                value.copy_(codes)
                absmax.copy_(quant_state.absmax)
            elif value.is_floating_point():
                _prune(value, method, ratio)
            else:
                continue
            pruned += 1
    return pruned


class ReloraCallback(TrainerCallback):  # type: ignore[misc]
    """Merges and restarts at the start of every `jagged_restart_steps`-th optimizer step.

    For a 4-bit base it keeps, per layer, the packed weights it was loaded with and the sum of
    the updates merged since (`merged`); a float base holds its merges itself.
    """

    def __init__(self, config: Config) -> None:
        keys = keys_of(config)
        self.config = config
        self.every = int(keys.jagged_restart_steps or 0)
        self.method = keys.relora_prune_method or "magnitude"
        ratio = keys.relora_prune_ratio
        self.ratio = PRUNE_DEFAULT[self.method] if ratio is None else float(ratio)
        self.cpu_offload = keys.relora_cpu_offload
        self.restarts = 0
        self.original: dict[str, tuple[torch.Tensor, Any]] = {}  # 4-bit: packed weights, state
        self.merged: dict[str, torch.Tensor] = {}  # 4-bit: the sum of merged updates (CPU)

    # -- training ------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if args.world_size > 1:
            raise ModelError(
                f"relora runs in one process, and this run has {args.world_size}\n  fix: run "
                "it without a launcher (or with --nproc-per-node 1)"
            )

    def on_step_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **_: Any,
    ) -> None:
        step = state.global_step
        if step == 0 or step % self.every or step // self.every <= self.restarts:
            return
        layers = lora_layers(model)
        with torch.no_grad():
            for name, layer in layers.items():
                self._merge(name, layer)
                layer.reset_lora_parameters(ADAPTER, init_lora_weights=True)
        params = [p for layer in layers.values() for p in _adapter_params(layer)]
        prune_optimizer_state(optimizer, params, self.method, self.ratio)
        self.restarts += 1

    def _delta(self, layer: Any) -> torch.Tensor:
        return layer.get_delta_weight(ADAPTER).detach()

    def _merge(self, name: str, layer: Any) -> None:
        base = layer.get_base_layer()
        delta = self._delta(layer)
        if not _is_4bit(base):
            base.weight.data += delta.to(base.weight.dtype)
            return
        self._keep_original(name, base)
        total = self.merged.get(name)
        self.merged[name] = delta.cpu() if total is None else total + delta.cpu()
        self._requantize(name, base)

    def _keep_original(self, name: str, base: Any) -> None:
        if name not in self.original:
            weight = base.weight
            state = copy.deepcopy(weight.quant_state)
            self.original[name] = (weight.data.detach().cpu().clone(), _on(state, "cpu"))

    def _requantize(self, name: str, base: Any) -> None:
        """The 4-bit weights become round(original + merged updates)."""
        import bitsandbytes.functional as bnb_functional

        weight = base.weight
        packed, quant_state = self.original[name]
        device = torch.device("cpu") if self.cpu_offload else weight.device
        full = bnb_functional.dequantize_4bit(packed.to(device), _on(quant_state, device))
        full = full + self.merged[name].to(device, full.dtype)
        repacked, new_state = bnb_functional.quantize_4bit(
            full,
            blocksize=quant_state.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
            quant_storage=weight.quant_storage,
        )
        weight.data = repacked.to(weight.device)
        weight.quant_state = _on(new_state, weight.device)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, model: Any, checkpoint_dir: str) -> None:
        """What the merges changed: the merged float weights, or a 4-bit base's summed updates."""
        from safetensors.torch import save_file

        if not self.restarts:
            return
        target = Path(checkpoint_dir) / STATE_DIR
        target.mkdir(parents=True, exist_ok=True)
        layers = lora_layers(model)
        tensors = {}
        for name, layer in layers.items():
            base = layer.get_base_layer()
            if _is_4bit(base):
                tensors[f"{name}.merged"] = self.merged[name].contiguous()
            else:
                tensors[f"{name}.weight"] = base.weight.detach().cpu().contiguous()
        save_file(tensors, str(target / STATE_FILE))
        (target / INFO_FILE).write_text(json.dumps({"restarts": self.restarts}) + "\n")

    def resume(self, model: Any, checkpoint_dir: str) -> None:
        from safetensors.torch import load_file

        source = Path(checkpoint_dir) / STATE_DIR
        trainer_state = Path(checkpoint_dir) / "trainer_state.json"
        step = (
            json.loads(trainer_state.read_text())["global_step"] if trainer_state.is_file() else 0
        )
        expected = max(0, (step - 1) // self.every)
        if not (source / INFO_FILE).is_file():
            if expected:
                raise ModelError(
                    f"relora: {checkpoint_dir} holds no ReLoRA state ({STATE_DIR}/), but "
                    f"{expected} restart(s) merged updates into the model before it was "
                    "written: resuming would lose them\n  fix: resume from a checkpoint this "
                    "run's ReLoRA wrote, or start the run again"
                )
            return
        self.restarts = int(json.loads((source / INFO_FILE).read_text())["restarts"])
        tensors = load_file(str(source / STATE_FILE))
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                base = layer.get_base_layer()
                if _is_4bit(base):
                    self._keep_original(name, base)
                    self.merged[name] = tensors[f"{name}.merged"]
                    self._requantize(name, base)
                else:
                    base.weight.data.copy_(tensors[f"{name}.weight"])

    # -- the final model -----------------------------------------------------------------------

    def save_merged(self, model: Any, tokenizer: Any, output_dir: str) -> str:
        """The base with every update merged, the last adapter's included: a full model."""
        layers = lora_layers(model)
        if not any(_is_4bit(layer.get_base_layer()) for layer in layers.values()):
            merged = model.merge_and_unload()  # the merges so far are in the base already
        else:
            merged = self._full_precision_merge(layers)
        merged.config.use_cache = True
        merged.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        return f"model (ReLoRA: {self.restarts} restarts, every update merged)"

    def _full_precision_merge(self, layers: dict[str, Any]) -> Any:
        """A 4-bit base: its full-precision weights (loaded again, on the CPU) + the merged
        updates + the last adapter's."""
        from sft.inference import load_base

        config = self.config
        dtype = torch.bfloat16 if config.bf16 is True else torch.float32
        base = load_base(
            config.base_model,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            llama4_linearized_experts=config.llama4_linearized_experts,
            model_type=config.model_type,
        )
        with torch.no_grad():
            for name, layer in layers.items():
                weight = base.get_submodule(name).weight
                update = self._delta(layer).cpu()
                if name in self.merged:
                    update = update + self.merged[name]
                weight.add_(update.to(weight.dtype))
        return base


def _adapter_params(layer: Any) -> list[torch.Tensor]:
    return [p for n, p in layer.named_parameters() if "lora_" in n and p.requires_grad]


def _on(quant_state: Any, device: torch.device | str) -> Any:
    """A bitsandbytes QuantState moved to `device` (its `to` moves it in place)."""
    quant_state.to(device)
    return quant_state
