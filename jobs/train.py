"""Entry script for `ray job submit`: the same arguments and code path as `lmforge train`.

Against `lmforge cluster up` (the runtime env makes `lmforge` importable on the workers):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --runtime-env cluster/runtime_env.yaml \
        -- python jobs/train.py --config jobs/configs/tiny.yaml --set train.max_steps=50

Inside the job RAY_ADDRESS is set, so the trainer joins the cluster the job runs on.
"""

import argparse
import sys

from lmforge.cli import add_train_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(parser)
    parser.parse_args()  # --help and argument errors before anything starts
    sys.exit(main(["train", *sys.argv[1:]]))
