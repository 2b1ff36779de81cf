"""``python -m hcpass ...``: the same command as ``hcpass ...`` (see `hcpass.tools.cli`)."""

import sys

from hcpass.tools.cli import main

sys.exit(main())
