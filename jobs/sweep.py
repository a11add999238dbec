"""Entry script for `ray job submit`: the same arguments and code path as `lmforge sweep`.

`lmforge sweep --submit ...` sends it (the space as JSON in LMFORGE_SWEEP_SPACE); by hand,
against `lmforge cluster up`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --runtime-env cluster/runtime_env.yaml \
        -- python jobs/sweep.py --name lr --config jobs/configs/tiny.yaml --space space.yaml

Inside the job RAY_ADDRESS is set, so Tune and every trial's trainer join that cluster.
"""

import argparse
import sys

from lmforge.cli import add_sweep_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_args(parser)
    parser.parse_args()  # --help and argument errors before anything starts
    sys.exit(main(["sweep", *sys.argv[1:]]))
