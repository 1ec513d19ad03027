"""`python -m tinv.trainer train JOB.yaml` (also what torchrun runs: `torchrun ... -m tinv.trainer train JOB.yaml`)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
