"""``python -m mfac`` runs the ``mfac`` command."""

import sys

from .cli import main

sys.exit(main())
