"""`python -m sft` (what `torchrun -m sft` runs)."""

from __future__ import annotations

from sft.cli import main

raise SystemExit(main())
