"""``python -m fingerprint``: the same command line as the ``fingerprint`` script."""

import sys

from fingerprint.cli.main import main

sys.exit(main())
