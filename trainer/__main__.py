"""`python -m tinv.trainer COMMAND ...`: train, generate, reproduce and helpers (torchrun runs `-m tinv.trainer train JOB.yaml`)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
