"""``python -m torch_dpfast``: the dpfast command."""

import sys

from .cli import main

sys.exit(main())
