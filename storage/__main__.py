"""``python -m storage``: see :mod:`storage.cli`."""

import sys

from .cli import main

sys.exit(main())
