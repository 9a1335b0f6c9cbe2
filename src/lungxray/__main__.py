"""`python -m lungxray` (and `torchrun -m lungxray`) run the command line."""

import sys

from lungxray.cli import main

sys.exit(main())
