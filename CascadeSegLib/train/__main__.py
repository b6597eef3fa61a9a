"""`python -m CascadeSegLib.train [train|finetune|export] ...` (torchrun-friendly entry point)."""

import sys

from ..commands.train import main

sys.exit(main())
