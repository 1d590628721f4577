"""`python -m omnilmm_tools.bench`: the `omnilmm-bench` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
