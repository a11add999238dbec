"""lmforge: train Transformer language models on a Ray cluster with DeepSpeed ZeRO.

The library behind the `lmforge` CLI, the `jobs/*.py` entry scripts and the dashboard.
"""

__version__ = "0.1.0"
