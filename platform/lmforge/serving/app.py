"""The Ray Serve application `lmforge serve up` deploys: an OpenAI API ingress (FastAPI)
in front of one `VersionServer` deployment per base model.

    HTTP -> Serve's proxy -> OpenAIServer (auth, parsing, answers, stats)
                                -> VersionServer "base-<sha>" (a base, its LoRA versions,
                                   the continuous-batching Engine), streamed through a handle

A VersionServer replica loads its versions once (`versions.load`) and runs one `Engine`
thread; each request's pieces come back as events through a streaming handle call, so a
stream reaches the client token by token and a non-streaming answer is the same events
summed up. The ingress keeps the request metrics: Ray Serve's own metrics (`ray.serve.
metrics`: requests, generated tokens, time to first token, latency, exported with every
Serve metric) and, for `serve status` and the Models page, the recent figures
(`GET /lmforge/stats`: requests, errors, tokens, tokens/s, TTFT and latency p50/p95).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations
# (`request: Request`) at runtime, and Serve's class-based routes do not resolve strings.
import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
from collections import deque

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics

from lmforge import raycompat
from lmforge.serving import api
from lmforge.serving.api import ApiError
from lmforge.serving.versions import Group

log = logging.getLogger(__name__)
# How long a replica being replaced may take to finish the requests it holds (Serve's
# default, 20 s, force-killed an old ingress whose requests waited on model replicas
# that were restarting on a busy machine: those requests failed with a 500).
GRACE_S = 180


# Helpers the deployments call: defined before them, since Serve pickles each deployment's
# class (by value) when it is declared.
def _event(tok, piece, index0: int) -> dict:
    event = {
        "index": index0 + piece.index,
        "text": piece.text,
        "finish": piece.finish,
        "token_text": None,
    }
    if piece.token is not None:
        event["token_text"] = tok.decode([piece.token.token])
        event["logprob"] = piece.token.logprob
        event["top"] = [(tok.decode([t]), lp) for t, lp in piece.token.top]
    return event


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None


async def _merge(streams: list):
    """Every stream's remaining events, as they come (one prompt: that stream itself)."""
    if len(streams) == 1:
        async for batch in streams[0]:
            for e in batch if isinstance(batch, list) else [batch]:
                yield e
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(s):
        try:
            async for e in s:
                await queue.put(e)
        finally:
            await queue.put(end)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    left = len(tasks)
    try:
        while left:
            batch = await queue.get()
            if batch is end:
                left -= 1
                continue
            for e in batch if isinstance(batch, list) else [batch]:
                yield e
    finally:
        for t in tasks:
            t.cancel()


@serve.deployment(ray_actor_options={"num_cpus": 1})
class VersionServer:
    """One base model and its LoRA versions, one Engine (see the module docstring)."""

    def __init__(
        self, group: Group, tracking_uri: str | None, max_batch: int, device: str, threads: int,
        dtype: str,
    ):  # fmt: skip
        import torch

        from lmforge.perf import dtype_name, inference_dtype
        from lmforge.serving import versions
        from lmforge.serving.engine import Engine

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        resolved = inference_dtype(dtype, torch.device(device))
        model, self.versions = versions.load(group, tracking_uri, device, resolved)
        self.max_batch, self.dtype = max_batch, dtype_name(resolved)
        self.engine = Engine(model, max_batch)
        self.engine.start()
        log.info("serving %s in %s (--dtype %s)", ", ".join(
            f"{n} ({v.served.uri})" for n, v in self.versions.items()), self.dtype, dtype)  # fmt: skip

    def describe(self) -> dict:
        return {
            n: {
                "uri": v.served.uri,
                "version": v.served.version,
                "context_length": v.context_length,
                "chat_template": v.template.name if v.template is not None else None,
                "adapter": v.served.adapter,
                "dtype": self.dtype,
            }  # fmt: skip
            for n, v in self.versions.items()
        }

    async def generate(
        self, name: str, prompt, messages, params, index0: int = 0, stream: bool = True
    ):
        """Events of one prompt's `params.n` samples: first {"prompt_tokens"} or {"error"},
        then lists of events, one per piece ({"index", "text", "token_text", "logprob",
        "top", "finish"}): streamed, whatever pieces are ready at each moment (one Ray
        object per list, not per token); else all of them at the end, in one list."""
        from lmforge.serving.engine import Job

        try:
            ids = self._prompt_ids(name, prompt, messages)
        except ApiError as err:
            yield {
                "error": err.status,
                "message": err.message,
                "param": err.param,
                "code": err.code,
            }
            return
        v = self.versions[name]
        yield {"prompt_tokens": len(ids)}
        if params.max_new_tokens > v.context_length:  # a chat's default: up to the context
            params = dataclasses.replace(params, max_new_tokens=v.context_length)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(ids, dataclasses.replace(params, stop_token=v.eot),
                  lambda p: loop.call_soon_threadsafe(queue.put_nowait, p), v.tokenizer, v.adapter)  # fmt: skip
        self.engine.submit(job)
        left, held = params.n, []
        try:
            while left:
                pieces = [await queue.get()]
                while not queue.empty():
                    pieces.append(queue.get_nowait())
                events = []
                for piece in pieces:
                    if piece.finish == "error":
                        yield {"error": 500, "message": f"generation failed: {piece.text}"}
                        return
                    left -= piece.finish is not None
                    events.append(_event(v.tokenizer, piece, index0))
                if stream:
                    yield events
                else:
                    held += events
            if not stream:
                yield held
        finally:
            job.cancelled = True  # the client went away: its rows leave at the next step

    def _prompt_ids(self, name: str, prompt, messages) -> list[int]:
        v = self.versions[name]
        param = "prompt"
        if messages is not None:
            if v.template is None:
                raise ApiError(
                    400, f"{name} ({v.served.uri}) has no chat template (it was not trained on "
                    "a chat/SFT dataset nor imported with one): use /v1/completions with a "
                    "plain prompt", "messages", "no_chat_template",
                )  # fmt: skip
            prompt, param = v.template.render(messages, True), "messages"
        if isinstance(prompt, str):
            ids = v.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < v.tokenizer.get_vocab_size()]
            if bad:
                raise ApiError(
                    400, f"prompt token ids {bad[:3]} are not in the vocabulary", "prompt"
                )
        if not ids:  # an unconditional sample, as the playground does
            if v.eot is None:
                raise ApiError(400, "the prompt is empty", "prompt")
            ids = [v.eot]
        api.check_length(len(ids), v.context_length, name, param)
        return ids


fastapi_app = FastAPI(title="lmforge OpenAI-compatible API", docs_url=None, redoc_url=None)


@fastapi_app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError):
    return JSONResponse(err.body(), status_code=err.status)


class Stats:
    """Recent requests of one served name: counts, tokens/s, TTFT and latency percentiles."""

    def __init__(self) -> None:
        self.requests = self.errors = self.tokens = 0
        self.ttft: deque[float] = deque(maxlen=1000)
        self.latency: deque[float] = deque(maxlen=1000)
        self.recent: deque[tuple[float, int]] = deque(maxlen=1000)  # (end time, tokens)

    def summary(self) -> dict:
        now = time.time()
        window = [(t, n) for t, n in self.recent if now - t <= 60]
        span = max(1e-9, now - window[0][0]) if len(window) > 1 else 60.0
        return {
            "requests": self.requests, "errors": self.errors, "tokens": self.tokens,
            "tokens_per_s_1m": sum(n for _, n in window) / span if window else 0.0,
            "ttft_p50_s": _pct(self.ttft, 50), "ttft_p95_s": _pct(self.ttft, 95),
            "latency_p50_s": _pct(self.latency, 50), "latency_p95_s": _pct(self.latency, 95),
        }  # fmt: skip


def _pct(values, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(fastapi_app)
class OpenAIServer:
    """The API: auth, request checks, the model by name, answers and stream chunks."""

    def __init__(
        self,
        servers: dict,
        routes: dict[str, str],
        key_sha256: str,
        max_batch: int,
        versions: dict[str, str],
    ):
        self.servers, self.routes = servers, routes  # base key -> handle; name -> base key
        self.key_sha256, self.max_batch, self.versions = key_sha256, max_batch, versions
        self.created = int(time.time())
        self.stats = {n: Stats() for n in routes}
        tags = ("model",)
        self.m_requests = metrics.Counter(
            "lmforge_serve_requests", "requests answered", tag_keys=tags
        )
        self.m_errors = metrics.Counter(
            "lmforge_serve_errors", "requests that failed", tag_keys=tags
        )
        self.m_tokens = metrics.Counter(
            "lmforge_serve_generated_tokens", "tokens generated", tag_keys=tags
        )
        bounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
        self.m_ttft = metrics.Histogram(
            "lmforge_serve_ttft_s", "time to first token", bounds, tag_keys=tags
        )
        self.m_latency = metrics.Histogram(
            "lmforge_serve_latency_s", "request latency", bounds, tag_keys=tags
        )

    def _auth(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.key_sha256):
            raise api.unauthorized()

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request):
        self._auth(request)
        return api.models_list(list(self.routes), self.created)

    @fastapi_app.get("/lmforge/stats")
    async def stats_of(self, request: Request):
        self._auth(request)
        return {n: {"uri": self.versions[n], **s.summary()} for n, s in self.stats.items()}

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        self._auth(request)
        req = api.parse(api.CompletionRequest, await _json(request))
        return await self._answer(req, req.prompts(), None)

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._auth(request)
        req = api.parse(api.ChatRequest, await _json(request))
        return await self._answer(req, [None], req.conversation())

    async def _answer(self, req, prompts: list, messages):
        if req.model not in self.routes:
            raise api.not_found(req.model, list(self.routes))
        default_max = 16 if messages is None else 1 << 30  # a chat: up to the context
        params = api.sampling_params(req, self.max_batch, default_max)
        handle = self.servers[self.routes[req.model]]
        stats = self.stats[req.model]
        stats.requests += 1
        self.m_requests.inc(tags={"model": req.model})
        started = time.time()
        streams = [
            handle.generate.options(stream=True).remote(
                req.model, p, messages, params, i * req.n, req.stream
            )
            for i, p in enumerate(prompts)
        ]
        answer = api.Answer(req, req.model, len(prompts) * req.n)
        try:
            for s in streams:  # each stream's first event: the prompt's size, or why not
                first = await s.__anext__()
                if "error" in first:
                    raise ApiError(
                        first["error"], first["message"], first.get("param"), first.get("code")
                    )
                answer.prompt_tokens += first["prompt_tokens"]
        except BaseException:
            stats.errors += 1
            self.m_errors.inc(tags={"model": req.model})
            for s in streams:
                s.cancel()
            raise
        events = _merge(streams)
        timing = {"first": None}

        def seen(e: dict) -> None:
            if "error" in e:
                raise ApiError(e["error"], e["message"])
            if timing["first"] is None and e.get("token_text") is not None:
                timing["first"] = time.time() - started
            answer.add(e)

        def done() -> None:
            n = sum(answer.tokens)
            stats.tokens += n
            stats.latency.append(time.time() - started)
            stats.recent.append((time.time(), n))
            self.m_tokens.inc(n, tags={"model": req.model})
            self.m_latency.observe(time.time() - started, tags={"model": req.model})
            if timing["first"] is not None:
                stats.ttft.append(timing["first"])
                self.m_ttft.observe(timing["first"], tags={"model": req.model})

        if not req.stream:
            async for e in events:
                seen(e)
            done()
            return JSONResponse(answer.body())

        async def chunks():
            started_choices: set[int] = set()
            try:
                async for e in events:
                    seen(e)
                    first = e["index"] not in started_choices
                    started_choices.add(e["index"])
                    yield api.sse(answer.chunk(e, first))
                if req.include_usage():
                    yield api.sse(answer.usage_chunk())
                yield api.sse("[DONE]")
                done()
            except ApiError as err:  # the stream has begun: the error is its last event
                stats.errors += 1
                yield api.sse(err.body())
            finally:
                for s in streams:
                    s.cancel()

        return StreamingResponse(chunks(), media_type="text/event-stream")


def build(groups: list[Group], tracking_uri: str | None, key_sha256: str, max_batch: int,
          replicas: int, cpus: float | None, gpus: float | None,
          draining: tuple[Group, ...] = (), dtype: str = "auto"):  # fmt: skip
    """The application: one VersionServer per group (named for what it holds:
    `Group.deployment`), the OpenAIServer in front, routing to `groups` only. `draining`:
    groups a roll replaces, kept one more deploy so that requests an old ingress replica
    still sends them are answered (see deploy.up)."""
    device = "cuda" if gpus else "cpu"
    resources = {"num_gpus": gpus} if gpus else {"num_cpus": 1 if cpus is None else cpus}
    threads = int(cpus or 1)
    servers, routes, versions = {}, {}, {}
    for g in [*groups, *draining]:
        d = VersionServer.options(
            name=g.deployment, num_replicas=replicas, ray_actor_options=resources,
            max_ongoing_requests=max(16, 4 * max_batch),
            graceful_shutdown_timeout_s=GRACE_S,
        )  # fmt: skip
        # The same deployment again (a roll that leaves this base as it was) keeps running.
        same = _digest(g.deployment, tracking_uri, max_batch, device, threads, resources, dtype)
        servers[g.deployment] = raycompat.pin_serve_version(d, same).bind(
            g, tracking_uri, max_batch, device, threads, dtype
        )
    for g in groups:
        for v in g.versions:
            routes[v.name], versions[v.name] = g.deployment, v.uri
    ingress = OpenAIServer.options(graceful_shutdown_timeout_s=GRACE_S)
    same = _digest(
        sorted(servers), sorted(routes.items()), key_sha256, max_batch, sorted(versions.items())
    )
    ingress = raycompat.pin_serve_version(ingress, same)
    return ingress.bind(servers, routes, key_sha256, max_batch, versions)


def _digest(*parts) -> str:
    """A deployment's version: what it was given, and lmforge's own version."""
    import lmforge

    return hashlib.sha256(repr((lmforge.__version__, *parts)).encode()).hexdigest()[:16]
