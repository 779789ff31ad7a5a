"""``python -m faar`` is ``faar-train`` (also what ``torchrun -m faar`` launches)."""

import sys

from .cli import train_main

sys.exit(train_main())
