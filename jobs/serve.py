"""Entry script for `ray job submit`: the same arguments and code path as `lmforge serve`
(the dashboard's Serve button submits it: `serve up` runs as a job on the cluster and ends
once the endpoint answers; Ray Serve keeps the application running).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --runtime-env cluster/runtime_env.yaml \
        -- python jobs/serve.py up --model models:/tiny@best
"""

import sys

from lmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
