"""Load the base model a config asks for, and attach the adapter (or prepare a full fine-tune)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sft.classes import transformers_class
from sft.config.schema import Config
from sft.errors import ModelError
from sft.gguf import materialise_gguf

if TYPE_CHECKING:
    from sft.manager import SftPlugins


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(config: Config) -> Any:
    """The training dtype: `bf16 = auto` means bf16 where the GPU supports it, else fp32."""
    import torch

    if config.float16:
        return torch.float16  # pure float16 (Axolotl's float16): also on CPU
    if config.fp16:
        if not cuda_available():
            raise ModelError(
                "fp16 = true needs a CUDA GPU (mixed precision with loss scaling)\n  fix: remove fp16 to train in float32 on CPU"
            )
        return torch.float16
    if config.bf16 is True:
        return torch.bfloat16
    if config.bf16 == "auto" and cuda_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_hardware(config: Config) -> None:
    """Refuse what this machine cannot do, before any model is loaded."""
    from sft.hardware import bitsandbytes_runs_on_cpu, package_version

    quantized = config.load_in_4bit or config.load_in_8bit
    if quantized and not cuda_available() and not bitsandbytes_runs_on_cpu():
        flag = "load_in_4bit" if config.load_in_4bit else "load_in_8bit"
        raise ModelError(
            f"{flag} = true quantizes the model with bitsandbytes; no CUDA GPU is visible "
            f"here, and the installed bitsandbytes ({package_version('bitsandbytes') or 'none'}) "
            "quantizes on CUDA only\n"
            "  fix: pip install 'bitsandbytes>=0.48' (it quantizes on CPU too), or remove "
            f"{flag} (and use adapter = 'lora' instead of 'qlora')"
        )


def model_path(base_model: str) -> str:
    """A path or Hub id from_pretrained can load (GGUF files dequantised and cached)."""
    if base_model.endswith(".gguf"):
        return materialise_gguf(base_model)
    return base_model


def load_model(config: Config, tokenizer: Any, plugins: SftPlugins) -> Any:
    """The base model, patched by kernel plugins, resized for new tokens, ready for the adapter."""
    from transformers import AutoModelForCausalLM

    check_hardware(config)
    dtype = resolve_dtype(config)
    backend = plugins.attention_backends().get(config.attention)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in backend.dtypes:
        raise ModelError(
            f"attention backend {backend.name!r} runs in {' or '.join(backend.dtypes)}, not {dtype_name}\n"
            "  fix: set bf16 = 'auto' on a GPU that supports it, or fp16 = true"
        )
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": backend.hf_implementation,
        "trust_remote_code": config.trust_remote_code,
    }
    if config.revision_of_model:
        kwargs["revision"] = config.revision_of_model
    if config.load_in_4bit or config.load_in_8bit:
        kwargs["quantization_config"] = bitsandbytes_config(config, dtype)
    elif config.model_quantization_config:
        kwargs["quantization_config"] = quantization_config(config)
    source = model_path(config.base_model)
    if config.rope_scaling or config.model_config or config.cls_model_config:
        kwargs["config"] = adjusted_model_config(source, config)
    if config.experts_implementation not in (None, "scattermoe"):  # scattermoe: see checks
        kwargs["experts_implementation"] = config.experts_implementation
    from sft.distributed import selected_backends

    for engine in selected_backends(config, plugins):
        if engine.model_kwargs is not None:
            kwargs.update(engine.model_kwargs(config))
    model_class = transformers_class(config.model_type, "model_type") or AutoModelForCausalLM
    from sft.experts import linearized_llama4_experts

    try:
        with linearized_llama4_experts(config.llama4_linearized_experts):
            if config.reinit_weights:
                model = _random_model(model_class, source, config, kwargs)
            else:
                model, loading = model_class.from_pretrained(  # type: ignore[misc]
                    source, output_loading_info=True, **kwargs
                )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load base_model {config.base_model!r}: {exc}\n"
            "  fix: check the Hub id or path (a Hub id needs network access or a local cache)"
        ) from exc
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(
            f"{config.base_model!r} loaded as {type(model).__name__}, an encoder-decoder model: "
            "sft fine-tunes decoder-only causal LMs (its packed, masked rows are a decoder's "
            "input)\n  fix: use a decoder-only model, or remove model_type"
        )
    if not config.reinit_weights:
        _check_experts_layout(model, loading, config)
    model.config.use_cache = False  # a cache disables the packed-sequence mask and wastes memory
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(kwargs.get("quantization_config"), "dequantize", False):
        # Loaded dequantized (e.g. Mxfp4Config(dequantize=True)): the weights are plain, so the
        # model trains and saves as an unquantized one.
        quantizer.remove_quantization_config(model)
    if config.quantize_moe_experts:
        from sft.experts import quantize_expert_weights

        bnb = kwargs["quantization_config"]
        quantize_expert_weights(
            model,
            bits=4 if config.load_in_4bit else 8,
            quant_type=bnb.bnb_4bit_quant_type,
            double_quant=bnb.bnb_4bit_use_double_quant,
        )
    if config.load_in_4bit:
        from sft.bnb_cpu import fix_cpu_dequantize_if_needed

        fix_cpu_dequantize_if_needed(model)
    plugins.patch_model(model, config)
    _fit_vocabulary(model, tokenizer, config)
    if config.gradient_checkpointing:
        options = {"use_reentrant": False, **(config.gradient_checkpointing_kwargs or {})}
        # activation_offloading: transformers wraps each checkpointed layer in torch's
        # save_on_cpu, so the activations kept for the recompute wait in pinned CPU memory.
        extra = {"offload": True} if config.offloads_activations else {}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **extra)
    return model


def named_arguments(cls: type) -> list[str]:
    """The arguments a class's constructor names. Quantization configs also take **kwargs and
    silently drop what they do not know, so a misspelt key is checked against these."""
    import inspect

    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]  # not self
    return [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def bitsandbytes_config(config: Config, dtype: Any) -> Any:
    """load_in_4bit/8bit's BitsAndBytesConfig: the bnb_4bit_* keys, then bnb_config_kwargs."""
    import torch
    from transformers import BitsAndBytesConfig

    if config.bnb_4bit_compute_dtype:
        compute = getattr(torch, config.bnb_4bit_compute_dtype)
    else:  # fp32 training computes in bf16 on a GPU (its tensor cores), in fp32 on a CPU
        compute = torch.bfloat16 if dtype == torch.float32 and cuda_available() else dtype
    arguments: dict[str, Any] = {
        "load_in_4bit": config.load_in_4bit,
        "load_in_8bit": config.load_in_8bit,
        "bnb_4bit_quant_type": config.bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": config.bnb_4bit_use_double_quant,
        "bnb_4bit_compute_dtype": compute,
    }
    extra = dict(config.bnb_config_kwargs or {})
    known = set(named_arguments(BitsAndBytesConfig))
    unknown = sorted(set(extra) - known)
    if unknown or {"load_in_4bit", "load_in_8bit"} & set(extra):
        raise ModelError(
            f"bnb_config_kwargs: {', '.join(unknown) or 'load_in_4bit/load_in_8bit'} is not an "
            "argument sft passes to BitsAndBytesConfig\n  fix: use its arguments "
            f"({', '.join(sorted(known - {'load_in_4bit', 'load_in_8bit'}))}); set load_in_4bit "
            "or load_in_8bit as keys of their own"
        )
    if isinstance(extra.get("bnb_4bit_compute_dtype"), str):
        extra["bnb_4bit_compute_dtype"] = getattr(torch, extra["bnb_4bit_compute_dtype"])
    try:
        return BitsAndBytesConfig(**{**arguments, **extra})
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"bnb_config_kwargs: {exc}") from exc


def quantization_config(config: Config) -> Any:
    """The transformers quantization config `model_quantization_config` names."""
    import transformers
    from transformers.utils.quantization_config import QuantizationConfigMixin

    name = config.model_quantization_config
    cls = getattr(transformers, name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, QuantizationConfigMixin)):
        raise ModelError(
            f"model_quantization_config = {name!r} is not a quantization config class of the "
            f"installed transformers {transformers.__version__}\n  fix: name one such as "
            "Mxfp4Config, TorchAoConfig or HqqConfig"
        )
    if cls is transformers.BitsAndBytesConfig:
        raise ModelError(
            "model_quantization_config = 'BitsAndBytesConfig': sft loads bitsandbytes through "
            "its own keys (they also prepare the model for training)\n  fix: set load_in_4bit "
            "or load_in_8bit, with bnb_config_kwargs for further arguments"
        )
    arguments = dict(config.model_quantization_config_kwargs or {})
    takes = named_arguments(cls)
    if unknown := sorted(set(arguments) - set(takes)):
        raise ModelError(
            f"model_quantization_config_kwargs: {name} takes no argument {', '.join(unknown)}\n"
            f"  fix: use its arguments: {', '.join(takes)}"
        )
    try:
        return cls(**arguments)
    except (TypeError, ValueError, ImportError) as exc:
        raise ModelError(
            f"model_quantization_config = {name!r} with {arguments}: {exc}\n  fix: install what "
            "it names, or check model_quantization_config_kwargs"
        ) from exc


def rope_scaling_parameters(current: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """The model's RoPE parameters with `rope_scaling` on top (`type` read as `rope_type`);
    its other parameters (rope_theta, ...) are kept. A model with a RoPE per attention type
    (Gemma 3: full_attention, sliding_attention) takes a table per type."""
    if current and all(isinstance(v, dict) for v in current.values()):
        unknown = set(scaling) - set(current)
        if unknown or not all(isinstance(v, dict) for v in scaling.values()):
            raise ModelError(
                f"this model has a RoPE per attention type ({', '.join(sorted(current))}): "
                f"rope_scaling must name them\n  fix: e.g. rope_scaling = {{{next(iter(current))} "
                "= {rope_type = 'linear', factor = 2.0}}"
            )
        return {k: rope_scaling_parameters(v, scaling.get(k, {})) for k, v in current.items()}
    merged = dict(current or {})
    scaling = dict(scaling)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    merged.update(scaling)
    return merged


def _random_model(model_class: Any, source: str, config: Config, kwargs: dict[str, Any]) -> Any:
    """`reinit_weights`: base_model's architecture with freshly initialised weights.

    Seeded by `seed`, so every process of a multi-process run builds the same weights.
    """
    import torch

    model_config = kwargs.get("config") or adjusted_model_config(source, config)
    options = {
        name: kwargs[name]
        for name in ("dtype", "attn_implementation", "trust_remote_code", "experts_implementation")
        if name in kwargs
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if hasattr(model_class, "from_config"):  # an Auto class
            return model_class.from_config(model_config, **options)
        options.pop("trust_remote_code", None)
        return model_class._from_config(model_config, **options)


def adjusted_model_config(source: str, config: Config) -> Any:
    """The base model's config, read by `cls_model_config` (AutoConfig by default), with
    `model_config` values and `rope_scaling` applied (transformers 5 replaces the whole RoPE
    table when given `rope_scaling` alone, losing rope_theta: so it is merged here)."""
    from transformers import AutoConfig

    reader = transformers_class(config.cls_model_config, "cls_model_config") or AutoConfig
    options: dict[str, Any] = {}
    if reader is AutoConfig:
        options["trust_remote_code"] = config.trust_remote_code
    if config.revision_of_model:
        options["revision"] = config.revision_of_model
    try:
        model_config = reader.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the config of base_model {config.base_model!r}: {exc}"
        ) from exc
    for name, value in (config.model_config or {}).items():
        if not hasattr(model_config, name):
            raise ModelError(
                f"model_config.{name}: {type(model_config).__name__} has no field {name!r}, so "
                "setting it would change nothing\n  fix: check the spelling against the model's "
                "config.json"
            )
        setattr(model_config, name, value)
    if not config.rope_scaling:
        return model_config
    current = getattr(model_config, "rope_parameters", None)
    if current is None:
        raise ModelError(
            f"rope_scaling is set, but {type(model_config).__name__} has no rotary position "
            "embedding to scale\n  fix: remove rope_scaling"
        )
    assert config.rope_scaling is not None
    model_config.rope_parameters = rope_scaling_parameters(dict(current), config.rope_scaling)
    return model_config


def _fit_vocabulary(model: Any, tokenizer: Any, config: Config) -> None:
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= embeddings:
        return
    if config.adapter:
        trained = set(config.lora_modules_to_save or ())
        if not {"embed_tokens", "lm_head"} <= trained:
            raise ModelError(
                f"the tokenizer has {len(tokenizer) - embeddings} new token(s) (tokens / "
                "special_tokens) but an adapter leaves the embeddings frozen, so they would never "
                "be learned\n  fix: lora_modules_to_save = ['embed_tokens', 'lm_head']"
            )
    model.resize_token_embeddings(
        len(tokenizer),
        pad_to_multiple_of=32 if config.resize_token_embeddings_to_32x else None,
        mean_resizing=True,
    )


def linear_module_names(model: Any) -> list[str]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        ):
            names.add(name.rsplit(".", 1)[-1])
    names.discard("lm_head")
    return sorted(names)


def apply_adapter(model: Any, config: Config) -> Any:
    """Attach LoRA/QLoRA/DoRA (peft), or freeze for `unfrozen_parameters`; return the model."""
    if not config.adapter:
        if config.unfrozen_parameters:
            patterns = [re.compile(p) for p in config.unfrozen_parameters]
            kept = 0
            for name, parameter in model.named_parameters():
                parameter.requires_grad = any(p.search(name) for p in patterns)
                kept += parameter.requires_grad
            if not kept:
                raise ModelError(
                    "unfrozen_parameters matches no parameter name\n"
                    "  fix: use regexes over names like 'model.layers.0.mlp.down_proj.weight'"
                )
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if config.load_in_4bit or config.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(config.gradient_checkpointing)
        )
    elif config.gradient_checkpointing:
        model.enable_input_require_grads()
    if config.lora_model_dir:
        return PeftModel.from_pretrained(model, config.lora_model_dir, is_trainable=True)
    if config.lora_target_linear:
        targets: Any = "all-linear"
    elif isinstance(config.lora_target_modules, str):
        targets = config.lora_target_modules  # peft: a regex matched against full module names
    elif config.lora_target_modules:
        targets = list(config.lora_target_modules)
        _check_each_target_names_a_module(model, targets)
    elif config.lora_target_parameters:
        targets = []  # parameters only (peft's rule for target_parameters alone)
    else:
        targets = None  # peft's defaults for the architecture
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        target_parameters=_target_parameters(model, config),
        modules_to_save=list(config.lora_modules_to_save) if config.lora_modules_to_save else None,
        use_dora=config.peft_use_dora,
        use_rslora=config.peft_use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(
            f"cannot attach the adapter: {exc}\n  fix: set lora_target_modules to module names "
            f"of this model ({', '.join(linear_module_names(model))}) or lora_target_linear = true"
        ) from exc


def _check_experts_layout(model: Any, loading: dict[str, Any], config: Config) -> None:
    """The Llama 4 experts layout the config asks for is the checkpoint's: either way round,
    a mismatch leaves the experts' weights uninitialised."""
    from sft.experts import check_linearized_llama4_load, stores_linearized_llama4_experts

    if config.llama4_linearized_experts:
        check_linearized_llama4_load(model, list(loading["missing_keys"]), config.base_model)
    elif stores_linearized_llama4_experts(list(loading["unexpected_keys"])):
        raise ModelError(
            f"{config.base_model!r} stores its Llama 4 experts linearized (experts.gate_projs.N, "
            "up_projs.N, down_projs.N), which transformers' Llama 4 class does not load: its "
            "experts would train from uninitialised weights\n"
            "  fix: set llama4_linearized_experts = true"
        )


def _check_each_target_names_a_module(model: Any, targets: list[str]) -> None:
    """peft matches a list entry as a module name or a name's last parts, and attaches nothing
    for an entry that matches no module, silently (only a list matching nothing at all is an
    error there): the run would train fewer layers than the config says."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if any(name == target or name.endswith(f".{target}") for name in names):
            continue
        if re.search(r"[\\^$*+?()\[\]{}|]", target):
            hint = (
                "a list entry is a module name, not a regex; for a regex, give "
                "lora_target_modules as one string, matched against whole module names "
                f"(e.g. '.*{target.removesuffix('$')}')"
            )
        else:
            hint = f"the model's linear modules are: {', '.join(linear_module_names(model))}"
        raise ModelError(
            f"lora_target_modules entry {target!r} names no module of this model, so the "
            f"adapter would not reach it\n  fix: {hint}"
        )


def _target_parameters(model: Any, config: Config) -> list[str] | None:
    """`lora_target_parameters` for peft; refused when it names no parameter of the model
    (peft only warns, and the adapter would leave the experts untouched)."""
    if not config.lora_target_parameters:
        return None
    targets = tuple(config.lora_target_parameters)
    if config.quantize_moe_experts:
        from sft.experts import full_target_parameters

        found = full_target_parameters(model, targets)
    else:
        names = [name for name, _ in model.named_parameters()]
        found = [t for t in targets if any(n == t or n.endswith(f".{t}") for n in names)]
    if not found:
        raise ModelError(
            f"lora_target_parameters = {list(targets)} names no parameter of this model\n"
            "  fix: use name suffixes of its fused expert weights, e.g. "
            "'mlp.experts.gate_up_proj' (see model.named_parameters())"
        )
    return found if config.quantize_moe_experts else list(targets)


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
