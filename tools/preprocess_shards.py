"""`python tools/preprocess_shards.py ...` is `ecdit-preprocess ...`: see megatron_ecdit/tools/preprocess_shards.py."""

import sys

from megatron_ecdit.tools.preprocess_shards import main

if __name__ == "__main__":
    sys.exit(main())
