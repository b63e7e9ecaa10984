"""`python -m earlyexit.cli ...` runs the console script."""

import sys

from earlyexit.cli import main

sys.exit(main())
