"""What a local run's forkserver imports once (`local_session.run`), so every rank it forks
starts with it instead of importing it again: torch, DeepSpeed as the workers import it
(`dist.import_deepspeed`), the loop, and torch._dynamo, which DeepSpeed imports on its first
`lazy_disable` call in each process (1 s of CPU per rank on this machine's 2 cores).
Imported for these effects only; DS_ACCELERATOR is set before (`local_session.run`).
"""

import torch._dynamo  # noqa: F401

from lmforge import dist

dist.import_deepspeed()

import lmforge.training.loop  # noqa: E402, F401
