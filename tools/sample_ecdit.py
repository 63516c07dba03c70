"""`python tools/sample_ecdit.py ...` is `ecdit-sample ...`: see megatron_ecdit/tools/sample_ecdit.py."""

import sys

from megatron_ecdit.tools.sample_ecdit import main

if __name__ == "__main__":
    sys.exit(main())
