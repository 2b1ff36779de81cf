"""``python -m hcpass ...``: the same command as ``hcpass ...`` (see `hcpass.cli`)."""

import sys

from hcpass.cli import main

sys.exit(main())
