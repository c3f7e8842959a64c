"""`python -m offside`: the `offside` command."""

import sys

from offside.cli import main

sys.exit(main())
