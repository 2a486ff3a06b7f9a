"""`python -m dlm.adapt STEP ...`: see dlm/adapt/cli.py."""

import sys

from dlm.adapt.cli import main

sys.exit(main())
