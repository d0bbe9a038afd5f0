"""``python -m nimbus`` is the ``nimbus`` command."""

import sys

from nimbus.adapters.cli.main import main

sys.exit(main())
