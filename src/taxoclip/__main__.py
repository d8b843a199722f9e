"""`python -m taxoclip ...` (also what torchrun runs: `torchrun ... -m taxoclip train lit ...`)."""

import sys

from taxoclip.apps.cli import main

sys.exit(main())
