"""Training: the HF Trainer subclass, optimizer/scheduler wiring, monitoring, the run itself."""

from sft.train.quiet import install_notice_filters

# Before any training module imports transformers (and through it peft, bitsandbytes, torchao).
install_notice_filters()
