"""Library chatter that a training run does not show: progress bars (sft shows its own) and
notices that optional libraries log when they are imported.

The notice filters are installed when `sft.train` is imported (its `__init__`), before any
training module imports transformers, peft or accelerate, which import these libraries.
"""

from __future__ import annotations

import logging


class _CpuKernelNotice(logging.Filter):
    """bitsandbytes, when imported (peft imports it to apply LoRA) on a CPU with AVX512-BF16
    and without the `kernels` package, logs that it could not fetch its CPU 4-bit matmul kernel
    from the Hub. That kernel only speeds up 4-bit inference on the CPU (training and 4-bit
    runs work without it); the notice comes at import, before a config is read."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_CPU_KERNEL_NOTICE = _CpuKernelNotice()


class _DeepSpeedCpuNotice(logging.Filter):
    """DeepSpeed, imported by accelerate whenever it is installed, warns on every process of
    every run on a machine without a GPU that it "set the accelerator to CPU" — a fact, not a
    problem, and nothing a user who did not ask for DeepSpeed can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


_DEEPSPEED_CPU_NOTICE = _DeepSpeedCpuNotice()


class _TorchaoImportNotice(logging.Filter):
    """torchao, imported by peft whenever it is installed, logs that its optional compiled
    kernels (built for another torch or for CUDA) did not load, and makes torch warn about how
    it registers two enums: on every run, whether or not the run uses torchao. What sft uses of
    torchao (QAT's fake quantization) is plain PyTorch."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Failed to load") and "torchao" in record.getMessage():
            return False
        if "is an Enum subclass" in message and record.args:
            registered = record.args[0] if isinstance(record.args, tuple) else record.args
            return not getattr(registered, "__module__", "").startswith("torchao")
        return True


_TORCHAO_IMPORT_NOTICE = _TorchaoImportNotice()


def quiet_libraries() -> None:
    """sft shows its own progress; library progress bars and chatter would interleave with it.

    transformers' warnings that matter on resume are shown while a checkpoint loads
    (`sft.train.resume.loading_checkpoint`); sft's own resume check replaces its config
    comparison.
    """
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    install_notice_filters()


def install_notice_filters() -> None:
    """Mute the import-time notices above (idempotent: a logger holds a filter once)."""
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_CPU_NOTICE)
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_TORCHAO_IMPORT_NOTICE)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_CPU_KERNEL_NOTICE)
