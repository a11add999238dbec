"""The OpenAI API as lmforge speaks it: requests checked into `SamplingParams`, answers and
stream chunks built from generation's pieces, errors in OpenAI's shape. No Ray, no model.

    req = parse(CompletionRequest, body)          # ApiError(400) on an unknown/invalid field
    params = sampling_params(req, max_batch=8)    # generation.SamplingParams
    answer = Answer(req, "tiny@best", n_prompts=1); answer.add(index, event) ... answer.body()

What maps where: `max_tokens` (chat: also `max_completion_tokens`) -> max_new_tokens,
`temperature`, `top_p`, `n`, `seed`, `stop` (up to 4 strings) as `lmforge generate` takes
them; `logprobs` (completions: a count; chat: true with `top_logprobs`) -> the model's own
log-probabilities and alternatives; `presence_penalty` / `frequency_penalty` (-2..2) as
OpenAI defines them, over the generated tokens. `repetition_penalty` and `top_k` (vLLM's
extra parameters, e.g. the openai client's `extra_body`) are lmforge's CTRL penalty and
top-k. What has no exact equivalent is refused instead of being approximated silently:
`logit_bias`, `suffix`, `echo`, `best_of` > n, tools.
A field OpenAI does not define is a 400 naming it. OpenAI's defaults hold: temperature 1,
top_p 1, no top-k, 16 new tokens for a completion, up to the context for a chat.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams

MAX_LOGPROBS = 20


class ApiError(LmforgeError):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def not_found(model: str, served: list[str]) -> ApiError:
    return ApiError(
        404, f"The model {model!r} does not exist: this server has {', '.join(served)}",
        "model", "model_not_found",
    )  # fmt: skip


def unauthorized() -> ApiError:
    return ApiError(
        401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' (the key of "
        "`lmforge serve up`, in LMFORGE_HOME/serve_api_key, or LMFORGE_SERVE_API_KEY)",
        None, "invalid_api_key",
    )  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling parameters (the openai client's `extra_body`)
    repetition_penalty: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=-1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt) or [""]

    def top_count(self) -> int | None:
        return self.logprobs


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(
                    400,
                    f"message content of type {part.get('type')!r}: only text is supported",
                    "messages",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def top_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


def parse(kind: type[_Request], body: Any) -> _Request:
    """The request, or an ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else None  # a union's member not named
        if e["type"] == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {field}"
        elif e["type"] == "missing":
            msg = f"Missing required parameter: {field!r}"
        else:
            msg = f"Invalid value for {field!r}: {e['msg']} (got {e.get('input')!r})"[:500]
        raise ApiError(
            400,
            msg,
            field,
            "invalid_value" if e["type"] != "missing" else "missing_required_parameter",
        ) from None


def sampling_params(
    req: _Request, max_batch: int | None = None, default_max: int = 16
) -> SamplingParams:
    """The request's sampling as `lmforge generate` takes it (stop_token: the server's)."""
    unsupported = {
        "logit_bias": bool(req.logit_bias),
    }
    if isinstance(req, CompletionRequest):
        unsupported |= {"suffix": req.suffix is not None, "echo": req.echo,
                        "best_of": req.best_of is not None and req.best_of != req.n}  # fmt: skip
    if isinstance(req, ChatRequest):
        unsupported |= {"tools": bool(req.tools), "tool_choice": req.tool_choice not in (None, "none"),
                        "response_format": (req.response_format or {}).get("type", "text") != "text"}  # fmt: skip
    for name, bad in unsupported.items():
        if bad:
            raise ApiError(
                400, f"{name} is not supported by this server", name, "unsupported_parameter"
            )
    if max_batch is not None and req.n > max_batch:
        raise ApiError(
            400,
            f"n={req.n} is more than this server decodes at once (--max-batch {max_batch})",
            "n",
        )
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    return SamplingParams(
        max_new_tokens=default_max if max_tokens is None else max_tokens,
        temperature=req.temperature,
        top_k=req.top_k if req.top_k and req.top_k > 0 else None,
        top_p=None if req.top_p >= 1 else req.top_p,
        seed=req.seed,
        n=req.n,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=tuple(req.stop or ()),
        logprobs=req.top_count(),
    )


def check_length(prompt_tokens: int, context: int, model: str, param: str = "prompt") -> None:
    """A prompt must leave the context room for one new token."""
    if prompt_tokens > context - 1:
        raise ApiError(
            400, f"This model's maximum context length is {context} tokens, but the prompt has "
            f"{prompt_tokens} tokens (at most {context - 1} leave room for a reply): shorten it "
            f"({model})", param, "context_length_exceeded",
        )  # fmt: skip


FINISH = {"length": "length", "stop_token": "stop", "stop_string": "stop"}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _top_completion(event: dict) -> dict[str, float]:
    return {t: lp for t, lp in event["top"]}


def _top_chat(event: dict) -> dict:
    return {
        "token": event["token_text"], "logprob": event["logprob"],
        "bytes": list(event["token_text"].encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in event["top"]],
    }  # fmt: skip


class Answer:
    """The whole answer of a request from its events ({"index", "text", "token_text",
    "logprob", "top", "finish"}: one per piece; `index` already the choice's index)."""

    def __init__(self, req: _Request, model: str, n_choices: int) -> None:
        self.chat = isinstance(req, ChatRequest)
        self.req, self.model = req, model
        self.id, self.created = new_id(self.chat), int(time.time())
        self.text = [""] * n_choices
        self.finish: list[str | None] = [None] * n_choices
        self.tokens = [0] * n_choices
        self.logprobs: list[list[dict]] = [[] for _ in range(n_choices)]
        self.prompt_tokens = 0
        self.want_logprobs = req.top_count() is not None

    def add(self, e: dict) -> None:
        i = e["index"]
        self.text[i] += e["text"]
        if e.get("token_text") is not None:
            self.tokens[i] += 1
            if self.want_logprobs:
                self.logprobs[i].append(e)
        if e.get("finish"):
            self.finish[i] = FINISH[e["finish"]]

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}  # fmt: skip

    def body(self) -> dict:
        choices = []
        for i, text in enumerate(self.text):
            lp = None
            if self.want_logprobs:
                lp = self._logprobs(self.logprobs[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": self.finish[i]})  # fmt: skip
            else:
                choices.append(
                    {"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]}
                )
        return {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
        }  # fmt: skip

    def _logprobs(self, events: list[dict]) -> dict:
        if self.chat:
            return {"content": [_top_chat(e) for e in events]}
        offsets, at = [], 0
        for e in events:
            offsets.append(at)
            at += len(e["token_text"])
        return {
            "tokens": [e["token_text"] for e in events],
            "token_logprobs": [e["logprob"] for e in events],
            "top_logprobs": [_top_completion(e) for e in events],
            "text_offset": offsets,
        }

    def chunk(self, e: dict, first: bool = False) -> dict:
        """One server-sent event's JSON for event `e` (first: the chat role comes too)."""
        i = e["index"]
        lp = None
        if self.want_logprobs and e.get("token_text") is not None:
            lp = self._logprobs([e])
        finish = FINISH[e["finish"]] if e.get("finish") else None
        if self.chat:
            delta = {"role": "assistant", "content": e["text"]} if first else {"content": e["text"]}
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": e["text"], "logprobs": lp, "finish_reason": finish}
        return self._envelope([choice])

    def usage_chunk(self) -> dict:
        return {**self._envelope([]), "usage": self.usage()}

    def _envelope(self, choices: list) -> dict:
        return {
            "id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices,
        }  # fmt: skip


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {json}` (or `data: [DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def models_list(names: list[str], created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "lmforge"} for n in names
        ],
    }
