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
        if not magnitude.numel():
            return
        # kthvalue, not quantile: quantile refuses tensors of more than 2**24 values
        rank = min(magnitude.numel(), max(1, round(ratio * magnitude.numel())))
        keep = magnitude > magnitude.kthvalue(rank).values
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

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        if args.world_size > 1:
            raise ModelError(
                f"relora runs in one process, and this run has {args.world_size}\n  fix: run "
                "it without a launcher (or with --nproc-per-node 1)"
            )
        if model is not None:
            lora_layers(model)  # a layer ReLoRA cannot merge: said now, not at the first restart

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
        update = delta.to("cpu", getattr(base, "compute_dtype", None) or delta.dtype)
        total = self.merged.get(name)
        self.merged[name] = update if total is None else total + update
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
        if any(_is_4bit(m) for m in model.modules() if hasattr(m, "weight")):
            self._dequantize_from_the_original(model, layers)
        merged = model.merge_and_unload()  # the float layers hold their merges already
        merged.config.use_cache = True
        merged.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        return f"model (ReLoRA: {self.restarts} restarts, every update merged)"

    def _dequantize_from_the_original(self, model: Any, layers: dict[str, Any]) -> None:
        """Swap every 4-bit linear layer for a float one: its full-precision weights (the base
        checkpoint's, read again on the CPU) + the updates merged into it + the last adapter's.
        The rest (float layers and their merges, modules_to_save, new tokens, the run's model
        config) stays the live model's."""
        import bitsandbytes as bnb

        inner = model.get_base_model()
        quantized = {
            name.removesuffix(".base_layer"): module
            for name, module in inner.named_modules()
            if isinstance(module, bnb.nn.Linear4bit)
        }
        dtype = inner.get_input_embeddings().weight.dtype
        originals = self._original_weights(sorted(quantized), dtype)
        with torch.no_grad():
            for name, module in quantized.items():
                weight = originals[name]
                if tuple(weight.shape) != (module.out_features, module.in_features):
                    raise ModelError(
                        f"relora: {name} of {self.config.base_model} is {tuple(weight.shape)} "
                        f"on disk but {(module.out_features, module.in_features)} in the run: "
                        "the final model cannot be rebuilt from the checkpoint\n  fix: the last "
                        "checkpoint-N holds the trained state"
                    )
                if name in layers:
                    update = self._delta(layers[name]).cpu()
                    if name in self.merged:
                        update = update + self.merged[name].to(update.dtype)
                    weight = weight + update.to(weight.dtype)
                plain = torch.nn.Linear(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    device="meta",
                )
                plain.weight = torch.nn.Parameter(weight, requires_grad=False)
                if module.bias is not None:
                    plain.bias = torch.nn.Parameter(module.bias.detach().cpu().to(dtype))
                parent, _, child = name.rpartition(".")
                setattr(inner.get_submodule(parent) if parent else inner, child, plain)
        for name in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(inner.config, name):
                delattr(inner.config, name)
        inner.hf_quantizer = None
        inner.is_loaded_in_4bit = False
        inner.config.dtype = dtype

    def _original_weights(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from sft.inference import load_base

        config = self.config
        base = load_base(
            config.base_model,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            llama4_linearized_experts=config.llama4_linearized_experts,
            model_type=config.model_type,
            revision=config.revision_of_model,
        )
        weights = {name: base.get_submodule(name).weight.detach() for name in names}
        del base
        return weights


def _adapter_params(layer: Any) -> list[torch.Tensor]:
    return [p for n, p in layer.named_parameters() if "lora_" in n and p.requires_grad]


def _on(quant_state: Any, device: torch.device | str) -> Any:
    """A bitsandbytes QuantState moved to `device` (its `to` moves it in place)."""
    quant_state.to(device)
    return quant_state
