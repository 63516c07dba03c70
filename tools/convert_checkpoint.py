"""`python tools/convert_checkpoint.py ...` is `ecdit-convert ...`: see megatron_ecdit/tools/convert_checkpoint.py."""

import sys

from megatron_ecdit.tools.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
