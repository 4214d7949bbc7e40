"""The core's config keys. Plugins declare theirs through `sft_config_keys`.

Key names follow Axolotl's flat names so an Axolotl user's config runs unchanged. Every key
has a one-line doc (`docs/config.md` is generated from them). A key whose feature has not
landed yet is declared with `planned=True`: setting it to anything but its default is reported
as "not supported yet" instead of being silently ignored.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import attrs

from sft.paths import expand_home

if TYPE_CHECKING:
    from sft.manager import SftPlugins

T = TypeVar("T")


def key(
    default: Any = attrs.NOTHING,
    *,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    planned: bool = False,
    example: str | None = None,
    path: bool = False,
) -> Any:
    """Declare a config key: its default, one-line doc and bounds (checked when loading).

    `path = True` marks a file or directory key: `~` is expanded when the config is built (see
    `sft.paths`), so every consumer sees the same path.
    """
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or None as a config default, not a mutable value")
    metadata = {
        "doc": doc,
        "ge": ge,
        "gt": gt,
        "le": le,
        "planned": planned,
        "example": example,
        "path": path,
    }
    converter = expand_home if path else None
    return attrs.field(default=default, metadata=metadata, kw_only=True, converter=converter)


class _Sections:
    """Plugin-owned key groups attached to a config object, looked up by their attrs class."""

    _sections: Mapping[type, Any]

    def section(self, cls: type[T]) -> T:
        """The structured keys of one plugin group (its defaults when the group was not loaded)."""
        try:
            return self._sections[cls]  # type: ignore[no-any-return]
        except KeyError:
            return cls()

    def __getattr__(self, name: str) -> Any:
        # Plugin-owned keys are readable as attributes too: `config.liger_rms_norm`.
        if name.startswith("_"):
            raise AttributeError(name)
        for value in self._sections.values():
            if name in attrs.fields_dict(type(value)):
                return getattr(value, name)
        raise AttributeError(f"config has no key {name!r}")


ExcessLength = Literal["drop", "truncate", "raise"]
# transformers' SchedulerType names, and Axolotl's rex and one_cycle.
LrScheduler = Literal[
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
    "rex",
    "one_cycle",
]
InvalidRows = Literal["raise", "skip"]


@attrs.frozen
class DatasetConfig(_Sections):
    """One `[[datasets]]` entry (core keys; format plugins add theirs)."""

    path: str = key(
        doc="Local file or directory, Hub dataset id, or fsspec URL (s3://, gs://, ...).",
        path=True,
    )
    type: str | None = key(
        None,
        doc="Prompt strategy (dataset format): chat_template, alpaca, completion, input_output, ... "
        "Omit for pre-tokenized rows (input_ids, labels).",
    )
    name: str | None = key(None, doc="Hub dataset configuration name (the `name` of load_dataset).")
    split: str = key("train", doc="Split to use.")
    revision: str | None = key(None, doc="Hub dataset revision (branch, tag or commit).")
    data_files: str | tuple[str, ...] | None = key(
        None, doc="File(s) inside `path` to load (a glob or a list)."
    )
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow", "text"] | None = key(
        None, doc="File format when it cannot be told from the file extension."
    )
    storage_options: dict[str, Any] | None = key(
        None, doc="fsspec storage options for remote paths (credentials, endpoint_url, ...)."
    )
    weight: float = key(
        1.0,
        gt=0.0,
        doc="How often each sample of this dataset is used in the mix: 2 uses each twice, 0.5 a "
        "seeded half (the rest of the data is unchanged).",
    )
    shards: int | None = key(
        None, ge=1, doc="Split the dataset into this many contiguous pieces (with shards_idx)."
    )
    shards_idx: int | None = key(None, ge=0, doc="Which piece of `shards` to use (0-based).")
    _sections: Mapping[builtins.type, Any] = attrs.field(
        factory=dict, repr=False, eq=False, alias="_sections"
    )


@attrs.frozen
class Config(_Sections):
    """A fully structured config. Core keys are attributes; plugin keys via `section()`."""

    # -- model -------------------------------------------------------------------------------
    base_model: str = key(
        doc="Model to fine-tune: Hub id, local directory, or a .gguf file (dequantised on load).",
        example="HuggingFaceTB/SmolLM2-135M-Instruct",
        path=True,
    )
    tokenizer_config: str | None = key(
        None,
        doc="Tokenizer to use when it differs from base_model (Hub id or directory).",
        path=True,
    )
    revision_of_model: str | None = key(None, doc="Hub revision of base_model.")
    model_type: str | None = key(
        None,
        doc="transformers class that loads base_model: AutoModelForCausalLM (the default) or the "
        "model's own causal-LM class, e.g. LlamaForCausalLM; a multimodal …ForConditionalGeneration "
        "class trains on text only (a warning).",
    )
    reinit_weights: bool = key(
        False,
        doc="Start from random weights of base_model's architecture (its config, initialised "
        "by the model's own scheme, seeded by `seed`) instead of its trained weights: "
        "pretraining from scratch. A full fine-tune only (no adapter, no quantization).",
    )
    cls_model_config: str | None = key(
        None,
        doc="transformers config class that reads base_model's config.json instead of "
        "AutoConfig, e.g. Gemma3TextConfig (the text-only config of a multimodal checkpoint).",
    )
    tokenizer_type: str | None = key(
        None,
        doc="transformers class that loads the tokenizer: AutoTokenizer (the default) or a "
        "tokenizer class, e.g. LlamaTokenizer.",
    )
    tokenizer_use_fast: bool = key(
        True,
        doc="Load the fast (Rust) tokenizer; sft needs it for exact label masking (false is refused).",
    )
    tokenizer_use_mistral_common: bool = key(
        False,
        doc="Load Mistral's own tokenizer (tekken.json / tokenizer.model.v*) through mistral-common "
        "(extra `sft-train[mistral]`): chat_template datasets are then encoded by that library, "
        "not by a Jinja template.",
    )
    tokenizer_legacy: bool | None = key(
        None,
        doc="The `legacy` option of sentencepiece-based tokenizers (Llama, T5): how text after "
        "special tokens is split.",
    )
    trust_remote_code: bool = key(
        False, doc="Allow model/tokenizer code from the Hub to run. Off unless you trust it."
    )
    special_tokens: dict[str, str] | None = key(
        None, doc="Override special tokens, e.g. {pad_token = '<|endoftext|>', eos_token = ...}."
    )
    tokens: tuple[str, ...] | None = key(
        None, doc="New tokens to add to the vocabulary (the embeddings are resized)."
    )
    plugins: tuple[str, ...] | None = key(
        None,
        doc="Axolotl integrations (dotted paths, e.g. axolotl.integrations.liger.LigerPlugin): "
        "each must have an installed sft plugin that stands in for it (see docs/axolotl.md). "
        "sft's own plugins need no listing: installed ones are found by entry point.",
    )
    model_config: dict[str, Any] | None = key(
        None,
        doc="Values set on the model's config before it loads, e.g. {output_router_logits = "
        "true}; each must be a field the config has (Axolotl: overrides_of_model_config).",
    )
    resize_token_embeddings_to_32x: bool = key(
        False,
        doc="When the embeddings grow for new tokens, round their rows up to a multiple of 32 "
        "(faster matmuls on GPUs).",
    )
    rope_scaling: dict[str, Any] | None = key(
        None,
        doc="RoPE scaling set on the model config at load, e.g. {rope_type = 'linear', factor = "
        "2.0} (linear, dynamic, yarn, longrope, llama3); `type` is accepted for `rope_type`.",
    )

    # -- precision and quantization ------------------------------------------------------------
    bf16: bool | Literal["auto"] = key(
        "auto", doc="Train in bfloat16: true, false, or auto (when the hardware supports it)."
    )
    bfloat16: bool | Literal["auto"] = key(
        False,
        doc="Axolotl's other name for bf16: true turns bf16 on, 'auto' is bf16 = 'auto'.",
    )
    fp16: bool = key(False, doc="Train in float16 with loss scaling (GPUs without bf16).")
    float16: bool = key(
        False,
        doc="Axolotl's pure float16: the model loads and trains in float16 throughout (no "
        "mixed precision, no loss scaling; an adapter stays float32, as peft keeps it). fp16 is "
        "the mixed-precision way.",
    )
    tf32: bool = key(False, doc="Allow TF32 matmuls on Ampere+ GPUs.")
    load_in_8bit: bool = key(
        False,
        doc="Load the base model in 8-bit (bitsandbytes; CUDA, or CPU with bitsandbytes >= 0.48).",
    )
    load_in_4bit: bool = key(
        False,
        doc="Load the base model in 4-bit NF4 (bitsandbytes; CUDA, or CPU with bitsandbytes "
        ">= 0.48); for QLoRA.",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = key(
        "nf4", doc="4-bit data type of load_in_4bit (and of quantize_moe_experts): nf4 or fp4."
    )
    bnb_4bit_use_double_quant: bool = key(
        True, doc="Quantize load_in_4bit's scales too (about 0.4 bits a weight less)."
    )
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] | None = key(
        None,
        doc="dtype of load_in_4bit's matmuls (default: bf16 on a GPU for float32 training, "
        "else the training dtype).",
    )
    bnb_config_kwargs: dict[str, Any] | None = key(
        None,
        doc="More BitsAndBytesConfig arguments for load_in_4bit/8bit (e.g. "
        "{llm_int8_skip_modules = ['lm_head']}); they override the bnb_4bit_* keys.",
    )
    model_quantization_config: str | None = key(
        None,
        doc="A transformers quantization config class to load the model with, by name (e.g. "
        "Mxfp4Config), built from model_quantization_config_kwargs (e.g. {dequantize = true} "
        "loads gpt-oss's MXFP4 weights as bf16).",
    )
    model_quantization_config_kwargs: dict[str, Any] | None = key(
        None, doc="Arguments of model_quantization_config's class."
    )
    quantize_moe_experts: bool = key(
        False,
        doc="Also quantize the fused 3-D MoE expert weights (which load_in_4bit/8bit leave in the "
        "load dtype) right after loading; LoRA reaches them through lora_target_parameters.",
    )
    llama4_linearized_experts: bool = key(
        False,
        doc="Llama 4: build each MoE expert as its own gate/up/down nn.Linear "
        "(experts.gate_projs.N, up_projs.N, down_projs.N) instead of fused 3-D weights, to load a "
        "checkpoint saved in that layout (e.g. a pre-quantized one) and let LoRA target single "
        "experts. The model is saved in the same layout.",
    )

    # -- adapter -------------------------------------------------------------------------------
    adapter: Literal["lora", "qlora"] | None = key(
        None,
        doc="Adapter to train: lora, qlora (needs load_in_4bit), or omit for a full fine-tune.",
    )
    lora_r: int = key(8, ge=1, doc="LoRA rank.")
    lora_alpha: int = key(
        16, ge=1, doc="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA)."
    )
    lora_dropout: float = key(0.0, ge=0.0, le=1.0, doc="Dropout on the LoRA input.")
    lora_target_modules: str | tuple[str, ...] | None = key(
        None,
        doc="Modules to adapt: a list of name suffixes (['q_proj', 'v_proj']), or one string, a "
        "regex that must match a module's full name ('.*layers\\.[0-3]\\..*_proj').",
    )
    lora_target_parameters: tuple[str, ...] | None = key(
        None,
        doc="Parameters (not modules) to adapt, by name suffix, e.g. ['mlp.experts.gate_up_proj', "
        "'mlp.experts.down_proj']: MoE experts kept as fused 3-D weights (peft target_parameters).",
    )
    lora_target_linear: bool = key(
        False,
        doc="Adapt every linear layer except the output head (overrides lora_target_modules).",
    )
    lora_modules_to_save: tuple[str, ...] | None = key(
        None,
        doc="Modules trained in full next to the adapter (e.g. embed_tokens, lm_head for new tokens).",
    )
    lora_model_dir: str | None = key(
        None, doc="Continue training from this saved adapter.", path=True
    )
    peft_use_dora: bool = key(False, doc="Use DoRA (weight-decomposed LoRA).")
    peft_use_rslora: bool = key(False, doc="Use rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    loraplus_lr_ratio: float | None = key(
        None,
        gt=0.0,
        doc="LoRA+: the LoRA B matrices learn at learning_rate × this ratio (the paper suggests 16).",
    )
    loraplus_lr_embedding: float | None = key(
        None,
        gt=0.0,
        doc="LoRA+: learning rate of LoRA on embedding layers (default 1e-6; needs loraplus_lr_ratio).",
    )
    unfrozen_parameters: tuple[str, ...] | None = key(
        None,
        doc="Full fine-tune only these parameters (regexes on parameter names); freeze the rest.",
    )

    # -- data ----------------------------------------------------------------------------------
    datasets: tuple[DatasetConfig, ...] = key(
        doc="Training datasets ([[datasets]] entries), mixed."
    )
    test_datasets: tuple[DatasetConfig, ...] = key(
        (), doc="Evaluation datasets (instead of val_set_size)."
    )
    val_set_size: float = key(
        0.0, ge=0.0, doc="Held-out eval share: a fraction (< 1) or a row count (>= 1); 0 = no eval."
    )
    dataset_prepared_path: str | None = key(
        None,
        doc="Directory caching prepared (tokenized) data, keyed by everything that changes it.",
        path=True,
    )
    dataset_num_proc: int | None = key(
        None, ge=1, doc="Processes for tokenising (default: CPU count)."
    )
    shuffle_merged_datasets: bool = key(True, doc="Shuffle the mixed datasets (seeded by `seed`).")
    curriculum_sampling: bool = key(
        False,
        doc="Train on the samples in dataset order (curriculum learning): no shuffle of the "
        "mixed datasets, a sequential sampler, and packing in dataset order.",
    )
    streaming: bool = key(
        False,
        doc="Read, tokenise and pack the training data while training, never holding it all: for "
        "data larger than memory. Needs max_steps; no cache, no val_set_size.",
    )
    streaming_multipack_buffer_size: int = key(
        10_000,
        ge=1,
        doc="With streaming: samples held at once for shuffling and packing.",
    )
    dataset_exact_deduplication: bool = key(
        False, doc="Drop rows whose tokens exactly repeat another's."
    )
    sequence_len: int = key(2048, ge=8, doc="Maximum tokens per sample (and per packed sequence).")
    excess_length_strategy: ExcessLength = key(
        "drop", doc="Samples longer than sequence_len: drop, truncate, or raise an error."
    )
    min_sample_len: int | None = key(
        None,
        ge=1,
        doc="Drop samples shorter than this many tokens (counted in the data summary).",
    )
    invalid_rows: InvalidRows = key(
        "raise",
        doc="Malformed rows (missing field, wrong type, unknown role): raise an error naming the "
        "file and row, or skip them (counted by reason in the summary).",
    )
    train_on_inputs: bool = key(
        False, doc="Also train on prompt/user tokens (default: only on the assistant's reply)."
    )
    seed: int = key(42, doc="Seed for shuffling, splits, initialisation and dropout.")

    # -- training ------------------------------------------------------------------------------
    output_dir: str = key(
        "./outputs", doc="Where checkpoints, the final model and logs are written.", path=True
    )
    overwrite_output_dir: bool = key(
        False,
        doc="Let a fresh run write into a non-empty output_dir: sft's own files there are "
        "replaced, other files kept (checkpoints of an earlier run are never deleted).",
    )
    dataloader_drop_last: bool = key(False, doc="Drop the last incomplete batch of each epoch.")
    micro_batch_size: int = key(
        1, ge=1, doc="Samples (or packed sequences) per device per forward."
    )
    eval_batch_size: int | None = key(
        None, ge=1, doc="Eval batch size (default: micro_batch_size)."
    )
    early_stopping_patience: int | None = key(
        None,
        ge=1,
        doc="Stop after this many evaluations in a row without improving metric_for_best_model "
        "(transformers' EarlyStoppingCallback); the best checkpoint is then the final model.",
    )
    load_best_model_at_end: bool = key(
        False,
        doc="End with the weights of the best checkpoint (by metric_for_best_model) instead of "
        "the last step's; checkpoints must be saved at evaluation steps.",
    )
    metric_for_best_model: str | None = key(
        None, doc="The eval metric that ranks checkpoints (default: loss, i.e. eval_loss)."
    )
    greater_is_better: bool | None = key(
        None, doc="Whether a larger metric_for_best_model is better (default: false for loss)."
    )
    gradient_accumulation_steps: int = key(
        1, ge=1, doc="Micro-batches accumulated per optimizer step."
    )
    batch_size: int | None = key(
        None,
        ge=1,
        doc="Axolotl's older way to set accumulation: samples per optimizer step per device; "
        "gradient_accumulation_steps = batch_size / micro_batch_size (set one of the two).",
    )
    num_epochs: float = key(1.0, gt=0.0, doc="Passes over the training data.")
    max_steps: int | None = key(
        None, ge=1, doc="Stop after this many optimizer steps (overrides num_epochs)."
    )
    learning_rate: float = key(2e-4, gt=0.0, doc="Peak learning rate.")
    optimizer: str = key(
        "adamw_torch", doc="Optimizer, by registered name (see `sft plugins list`)."
    )
    objective: str | None = key(
        None,
        doc="Training objective plugin, by registered name: the loss minimised instead of the "
        "model's own causal-LM loss (omit for plain SFT).",
    )
    lr_scheduler: LrScheduler = key(
        "cosine",
        doc="Learning-rate schedule after warmup: any transformers schedule (cosine, linear, "
        "constant, cosine_with_min_lr, warmup_stable_decay, ...), rex or one_cycle.",
    )
    lr_scheduler_kwargs: dict[str, Any] | None = key(
        None,
        doc="Options of the schedule, e.g. {num_decay_steps = 20} for warmup_stable_decay, "
        "{num_cycles = 2} for cosine_with_restarts (see docs/training.md).",
    )
    cosine_min_lr_ratio: float | None = key(
        None,
        ge=0.0,
        le=1.0,
        doc="Floor of cosine (and cosine_with_min_lr, rex) as a fraction of learning_rate.",
    )
    cosine_constant_lr_ratio: float | None = key(
        None,
        ge=0.0,
        le=1.0,
        doc="With lr_scheduler = cosine and cosine_min_lr_ratio: reach the floor at this "
        "fraction of training, then hold it (Axolotl's schedule; 0 or blank: off).",
    )
    lr_quadratic_warmup: bool = key(
        False,
        doc="With lr_scheduler = cosine: warm up along (step / warmup)² instead of linearly "
        "(Axolotl's key); the cosine after it keeps cosine_min_lr_ratio's floor.",
    )
    lr_div_factor: float | None = key(
        None, gt=0.0, doc="one_cycle: the schedule starts at learning_rate / this (default 25)."
    )
    warmup_steps: int | float | None = key(
        None,
        ge=0,
        doc="Linear warmup steps; a number below 1 is a fraction of the total steps (as "
        "transformers reads it: 0.1 warms up over the first 10%).",
    )
    warmup_ratio: float | None = key(
        None, ge=0.0, le=1.0, doc="Warmup as a fraction of total steps."
    )
    weight_decay: float = key(
        0.0, ge=0.0, doc="Decoupled weight decay (not applied to biases and norms)."
    )
    max_grad_norm: float = key(1.0, ge=0.0, doc="Gradient clipping norm (0 disables clipping).")
    gradient_checkpointing: bool | Literal["offload"] = key(
        False,
        doc="Recompute activations in backward to save memory; 'offload' (Axolotl's value) also "
        "keeps the saved activations in CPU memory (= activation_offloading).",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = key(
        None, doc="Passed to gradient_checkpointing_enable, e.g. {use_reentrant = false}."
    )
    activation_offloading: bool | Literal["legacy"] = key(
        False,
        doc="Keep the activations gradient checkpointing saves in CPU memory instead of on the "
        "GPU (needs gradient_checkpointing and a CUDA GPU). 'legacy' (Axolotl's older "
        "implementation of the same) is read as true.",
    )
    neftune_noise_alpha: float | None = key(
        None,
        gt=0.0,
        doc="NEFTune: add uniform noise of this scale to the input embeddings while training "
        "(e.g. 5).",
    )
    noisy_embedding_alpha: float | None = key(
        None, gt=0.0, doc="Axolotl's older name for neftune_noise_alpha."
    )
    torch_compile: bool | Literal["auto"] = key(
        False,
        doc="Compile the model with torch.compile (auto: when torch >= 2.5.1); slow first steps.",
    )
    torch_compile_backend: str | None = key(
        None, doc="torch.compile backend (default inductor); setting it turns torch_compile on."
    )
    torch_compile_mode: (
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None
    ) = key(None, doc="torch.compile mode; setting it turns torch_compile on.")
    loss_watchdog_threshold: float | None = key(
        None,
        doc="Stop training when the logged loss stays above this for loss_watchdog_patience "
        "logs in a row (the diverged model is not saved).",
    )
    loss_watchdog_patience: int | None = key(
        None,
        ge=1,
        doc="Logged losses in a row above loss_watchdog_threshold that stop the run (default 3).",
    )
    logging_steps: int = key(1, ge=1, doc="Log every this many optimizer steps.")
    eval_steps: int | None = key(None, ge=1, doc="Evaluate every this many steps.")
    evals_per_epoch: int | None = key(
        None, ge=1, doc="Evaluations per epoch (instead of eval_steps)."
    )
    # YAML 1.1 reads an unquoted `no` as false: false means "no" here.
    eval_strategy: Literal["steps", "epoch", "no", False] | None = key(
        None,
        doc="When the eval set is evaluated: steps (eval_steps or evals_per_epoch), epoch, or no "
        "(only without an eval set). Default: steps when eval_steps or evals_per_epoch is set, "
        "else each epoch.",
    )
    evaluation_strategy: Literal["steps", "epoch", "no", False] | None = key(
        None, doc="transformers' older name for eval_strategy."
    )
    save_steps: int | None = key(None, ge=1, doc="Save a checkpoint every this many steps.")
    # YAML 1.1 reads an unquoted `no` as false: false means "no" here.
    save_strategy: Literal["steps", "epoch", "best", "no", False] | None = key(
        None,
        doc="When checkpoints are saved: steps (save_steps or saves_per_epoch; every 500 steps "
        "without them), epoch, best (at each evaluation that improves metric_for_best_model, "
        "default the eval loss; needs an eval set) or no (none; an interrupt still saves one). "
        "Default: save_steps, saves_per_epoch, else each epoch.",
    )
    ddp_find_unused_parameters: bool | None = key(
        None,
        doc="DDP searches each step for parameters that got no gradient (slower; needed only "
        "when part of the model is skipped in forward). Default off.",
    )
    save_only_model: bool = key(
        False,
        doc="Checkpoints hold the weights only, no optimizer/scheduler state: smaller, but a run "
        "cannot resume from them exactly.",
    )
    saves_per_epoch: int | None = key(
        None, ge=1, doc="Checkpoints per epoch (instead of save_steps)."
    )
    save_total_limit: int | None = key(None, ge=1, doc="Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = key(
        None, doc="Resume from this checkpoint directory.", path=True
    )
    auto_resume_from_checkpoints: bool = key(
        False, doc="Resume from the newest complete checkpoint in output_dir, if any."
    )
    resume_allow_changes: bool = key(
        False,
        doc="Resume even though data, model, batch, seed or optimizer keys changed since the "
        "checkpoint; a new learning rate or optimizer setting is applied from the next step.",
    )
    use_tensorboard: bool = key(False, doc="Write TensorBoard logs to output_dir/runs.")

    # -- tracking and sharing (sft.train.tracking, sft.train.hub) -----------------------------
    use_wandb: bool = key(False, doc="Log to Weights & Biases (also on when wandb_project is set).")
    wandb_project: str | None = key(None, doc="W&B project; setting it turns W&B logging on.")
    wandb_entity: str | None = key(None, doc="W&B team or user that owns the run.")
    wandb_name: str | None = key(
        None, doc="Run name in W&B (and in MLflow and Comet, which take the same name)."
    )
    wandb_run_id: str | None = key(
        None, doc="W&B run id: a run with this id is continued instead of starting a new one."
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = key(
        None,
        doc="W&B mode: online (default), offline (run files under output_dir/wandb, upload later "
        "with `wandb sync`), or disabled (no W&B logging).",
    )
    wandb_watch: Literal["gradients", "parameters", "all", False] | None = key(
        None, doc="Also log histograms of gradients, parameters, or all (wandb.watch)."
    )
    wandb_log_model: Literal["checkpoint", "end", False] | None = key(
        None, doc="Upload the model to W&B Artifacts at each checkpoint, or once at the end."
    )
    use_mlflow: bool = key(
        False,
        doc="Log to MLflow (also on when mlflow_tracking_uri or mlflow_experiment_name is set).",
    )
    mlflow_tracking_uri: str | None = key(
        None, doc="MLflow tracking server or store, e.g. http://host:5000 or file:./mlruns."
    )
    mlflow_experiment_name: str | None = key(None, doc="MLflow experiment the run is logged to.")
    mlflow_run_name: str | None = key(None, doc="Run name in MLflow (and in Comet).")
    hf_mlflow_log_artifacts: bool = key(
        False, doc="Also upload each checkpoint to MLflow as an artifact."
    )
    use_comet: bool = key(False, doc="Log to Comet (also on when comet_project_name is set).")
    comet_api_key: str | None = key(
        None,
        doc="Comet API key (prefer `comet login` or COMET_API_KEY); never written to "
        "sft_config.yaml.",
    )
    comet_workspace: str | None = key(None, doc="Comet workspace (default: your own).")
    comet_project_name: str | None = key(
        None, doc="Comet project; setting it turns Comet logging on."
    )
    comet_experiment_key: str | None = key(
        None, doc="Comet experiment key: log to that experiment (with comet_mode get)."
    )
    comet_mode: Literal["get", "create", "get_or_create"] | None = key(
        None, doc="Comet: continue an experiment (get), start a new one (create), or either."
    )
    comet_online: bool | None = key(
        None, doc="Comet: false logs offline (an archive to upload later); default online."
    )
    hub_model_id: str | None = key(
        None,
        doc="Hugging Face Hub repo (name or org/name) to push the trained adapter or model to.",
    )
    push_to_hub: bool | None = key(
        None, doc="Push to hub_model_id (default: whenever hub_model_id is set); false: don't."
    )
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = key(
        "every_save",
        doc="What is pushed: the result at the end only; also the model at every save; also "
        "the latest checkpoint (last-checkpoint/); or every checkpoint (checkpoint-N/).",
    )
    hub_private_repo: bool = key(
        True, doc="Create the Hub repo private (as Axolotl does); an existing repo is unchanged."
    )
    hub_revision: str | None = key(
        None, doc="Hub branch to push to (created from main when missing; default main)."
    )

    # -- packing and attention -----------------------------------------------------------------
    sample_packing: bool = key(
        False, doc="Pack several samples into each sequence (kept apart in attention)."
    )
    sample_packer: str = key("multipack", doc="The packer plugin used by sample_packing.")
    eval_sample_packing: bool | None = key(
        None, doc="Pack eval samples too (default: as sample_packing)."
    )
    sample_packing_sequentially: bool = key(
        False,
        doc="Pack in dataset order (next fit: a new bin when the next sample does not fit, as "
        "Axolotl) instead of first-fit decreasing.",
    )
    sample_packing_bin_size: int = key(200, ge=1, doc="Maximum samples per packed sequence.")
    group_by_length: bool = key(
        False,
        doc="Unpacked training: batch samples of similar length together (less padding; "
        "transformers' LengthGroupedSampler). No effect with sample_packing or streaming.",
    )
    pad_to_sequence_len: bool = key(False, doc="Pad every batch to sequence_len (static shapes).")
    experts_implementation: (
        Literal["eager", "batched_mm", "grouped_mm", "deepgemm", "sonicmoe", "scattermoe"] | None
    ) = key(
        None,
        doc="How transformers computes the experts of MoE models: grouped_mm (its default where "
        "the GPU supports it), batched_mm, eager, deepgemm or sonicmoe. No effect on dense models. "
        "Axolotl's scattermoe (its own kernels) runs as transformers' default, with a warning.",
    )
    attn_implementation: str | None = key(
        None,
        doc="Attention backend: sdpa, eager, flex_attention, flash_attention_2, ... (default sdpa).",
    )
    flash_attention: bool = key(
        False, doc="Axolotl alias for attn_implementation = 'flash_attention_2'."
    )
    sdp_attention: bool = key(False, doc="Axolotl alias for attn_implementation = 'sdpa'.")
    flex_attention: bool = key(
        False, doc="Axolotl alias for attn_implementation = 'flex_attention'."
    )
    eager_attention: bool = key(False, doc="Axolotl alias for attn_implementation = 'eager'.")
    xformers_attention: bool = key(
        False,
        doc="Axolotl's xformers attention: runs as sdpa here (the same exact attention, and "
        "packed samples stay apart).",
    )

    _sections: Mapping[type, Any] = attrs.field(
        factory=dict, repr=False, eq=False, alias="_sections"
    )
    _source: str | None = attrs.field(default=None, repr=False, eq=False, alias="_source")
    _warnings: tuple[Any, ...] = attrs.field(default=(), repr=False, eq=False, alias="_warnings")
    _blank: frozenset[str] = attrs.field(default=frozenset(), repr=False, eq=False, alias="_blank")
    # `Any`: field types are resolved at runtime (`typing.get_type_hints`), where importing
    # the plugin manager here would be circular.
    _plugin_set: Any = attrs.field(default=None, repr=False, eq=False, alias="_plugin_set")

    @property
    def plugin_set(self) -> SftPlugins:
        """The plugins this config was validated against: the ones its run uses (as pytest's
        `Config` carries its plugin manager). `plugins`, the key, is Axolotl's list."""
        if self._plugin_set is None:
            raise RuntimeError("this Config was not made by sft.config.load_config")
        plugins: SftPlugins = self._plugin_set
        return plugins

    @property
    def source(self) -> str | None:
        """The file this config was loaded from."""
        return self._source

    def given_blank(self, name: str) -> bool:
        """Whether the file wrote this root key with no value (`adapter:` in YAML): present,
        so chosen, yet the default."""
        return name in self._blank

    def all_datasets(self) -> Iterator[tuple[str, DatasetConfig]]:
        """Every training and eval dataset, with its place in the config ("datasets[0]",
        "test_datasets[1]") for messages."""
        for group in ("datasets", "test_datasets"):
            for index, ds in enumerate(getattr(self, group)):
                yield f"{group}[{index}]", ds

    @property
    def warnings(self) -> tuple[Any, ...]:
        """Problems that do not stop a run (`Problem.warning`): keys that change nothing."""
        return self._warnings

    @property
    def checkpoint_strategy(self) -> str | None:
        """save_strategy, YAML's `no` (read as false) as "no"."""
        return "no" if self.save_strategy is False else self.save_strategy

    @property
    def evaluation_schedule(self) -> str | None:
        """eval_strategy (or its older name evaluation_strategy), YAML's `no` as "no"."""
        chosen = self.eval_strategy if self.eval_strategy is not None else self.evaluation_strategy
        return "no" if chosen is False else chosen

    @property
    def shuffles_samples(self) -> bool:
        """Whether the training samples are shuffled (not with curriculum_sampling)."""
        return self.shuffle_merged_datasets and not self.curriculum_sampling

    @property
    def packs_in_dataset_order(self) -> bool:
        """Whether packers keep dataset order (first fit) rather than packing by length."""
        return self.sample_packing_sequentially or self.curriculum_sampling

    @property
    def offloads_activations(self) -> bool:
        """activation_offloading, or Axolotl's gradient_checkpointing = 'offload'."""
        return bool(self.activation_offloading) or self.gradient_checkpointing == "offload"

    @property
    def attention(self) -> str:
        """The selected attention backend name, Axolotl boolean aliases resolved."""
        if self.attn_implementation:
            return ATTENTION_VALUE_ALIASES.get(self.attn_implementation, self.attn_implementation)
        for alias, name in ATTENTION_ALIASES.items():
            if getattr(self, alias):
                return name
        return "sdpa"


ATTENTION_ALIASES = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
    "xformers_attention": "sdpa",
}
# Axolotl's other attn_implementation values → the backend that computes the same attention.
# xformers' memory-efficient attention is exact attention, as PyTorch's sdpa kernels are (and
# sdpa keeps packed samples apart); a Hub flash-attention kernel is the same algorithm as the
# flash-attn package our flash_attn backend uses.
ATTENTION_VALUE_ALIASES = {
    "xformers": "sdpa",
    "kernels-community/flash-attn": "flash_attention_2",
    "kernels-community/flash-attn2": "flash_attention_2",
    "kernels-community/flash-attn3": "flash_attention_3",
    "kernels-community/vllm-flash-attn3": "flash_attention_3",
}


def doc_of(field: attrs.Attribute) -> str:  # type: ignore[type-arg]
    return str(field.metadata.get("doc", ""))


def public_fields(cls: type) -> list[attrs.Attribute]:  # type: ignore[type-arg]
    return [f for f in attrs.fields(cls) if not f.name.startswith("_")]


# Keys declared for Axolotl compatibility whose feature has not landed yet. Setting one to a
# non-default value is reported as "not supported yet" — never silently ignored. Shrinks as
# features land.
PLANNED_KEYS: frozenset[str] = frozenset()


def is_planned(field: attrs.Attribute) -> bool:  # type: ignore[type-arg]
    return bool(field.metadata.get("planned")) or field.name in PLANNED_KEYS
