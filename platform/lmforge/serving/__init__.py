"""Serving versions: an OpenAI-compatible endpoint on Ray Serve, batched, many LoRA
versions on one base.

    lmforge serve up --model models:/tiny@best --model models:/tiny-lora/2   # prints the URL
    lmforge serve status
    lmforge serve down

    from lmforge import serving
    info = serving.up(["models:/tiny@best"], replicas=1, port=8000)   # ServeInfo
    serving.status(); serving.down()

The parts: `versions` (which versions, grouped by base, loaded into a replica), `engine`
(continuous batching over per-request KV cache slots, generation's own sampling), `api`
(the OpenAI protocol: checks, answers, stream chunks, errors; no Ray), `app` (the Ray
Serve application: a FastAPI ingress and one deployment per base), `deploy` (up, status,
down, the API key). Importing this package imports no Ray.
"""

from lmforge.serving.deploy import ServeInfo, api_key, down, running_record, stats, status, up

__all__ = ["ServeInfo", "api_key", "down", "running_record", "stats", "status", "up"]
