"""Training: the HF Trainer subclass, optimizer/scheduler wiring, monitoring, the run itself."""
