"""`python tools/inspect_checkpoint.py ...` is `ecdit-inspect ...`: see megatron_ecdit/tools/inspect_checkpoint.py."""

import sys

from megatron_ecdit.tools.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
