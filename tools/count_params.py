"""`python tools/count_params.py ...` is `ecdit-count-params ...`: see megatron_ecdit/tools/count_params.py."""

import sys

from megatron_ecdit.tools.count_params import main

if __name__ == "__main__":
    sys.exit(main())
