"""Entry script for `ray job submit`: the same arguments and code path as `lmforge prepare`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --runtime-env cluster/runtime_env.yaml \
        -- python jobs/prepare.py --input /data/corpus --output /data/datasets/corpus
"""

import sys

from lmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
