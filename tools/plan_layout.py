"""`python tools/plan_layout.py ...` is `ecdit-plan ...`: see megatron_ecdit/tools/plan_layout.py."""

import sys

from megatron_ecdit.tools.plan_layout import main

if __name__ == "__main__":
    sys.exit(main())
