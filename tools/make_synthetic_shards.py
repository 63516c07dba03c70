"""`python tools/make_synthetic_shards.py ...` is `ecdit-make-shards ...`: see megatron_ecdit/tools/make_synthetic_shards.py."""

import sys

from megatron_ecdit.tools.make_synthetic_shards import main

if __name__ == "__main__":
    sys.exit(main())
