"""`sft` with accelerate's FSDP allowed on a CPU: the harness of tests/plugins/test_fsdp.py.

accelerate drives FSDP on accelerator devices only; on a CPU the Trainer silently trains with
plain DDP instead (so sft refuses FSDP there). torch's FSDP2 itself runs on a CPU with gloo, so
the tests lift accelerate's gate here and exercise the real sharded path: wrapping, sharded
checkpoints, the full state dict gathered for the final save.

Run as `python -m torch.distributed.run --nproc_per_node N tests/plugins/fsdp_cpu.py run CONFIG`.
"""

from __future__ import annotations

import sys


def allow_fsdp_on_cpu() -> None:
    """Make accelerate keep its FSDP plugin on a multi-process CPU run."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init

    import accelerate.accelerator

    prepare = accelerate.accelerator.fsdp2_prepare_model

    def prepare_and_report(accelerator, model):  # type: ignore[no-untyped-def]
        model = prepare(accelerator, model)
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        params = list(model.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        if accelerator.is_main_process:  # the test reads this line
            print(
                f"fsdp2: {units} units, {sharded} of {len(params)} parameters sharded", flush=True
            )
        return model

    accelerate.accelerator.fsdp2_prepare_model = prepare_and_report

    import sft.plugins.fsdp

    sft.plugins.fsdp.engine_runs_here = lambda: (True, "")  # the machine check: lifted too


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    from sft.cli import main

    sys.exit(main(sys.argv[1:]))
