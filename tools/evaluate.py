"""`python tools/evaluate.py ...` is `ecdit-evaluate ...`: see megatron_ecdit/tools/evaluate.py."""

import sys

from megatron_ecdit.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
