"""``python -m nimbus`` is the ``nimbus`` command."""

import sys

from nimbus.cli.main import main

sys.exit(main())
