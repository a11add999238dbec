"""The registered model as an MLflow `pyfunc`: a prompt in, generated text out.

Each model version holds the servable checkpoint (safetensors weights, config, tokenizer)
as the artifact `checkpoint` and a copy of the `lmforge` package as code, so

    mlflow.pyfunc.load_model("models:/NAME@best").predict(["ROMEO:"], params={"seed": 0})
    mlflow models predict -m models:/NAME@best -i prompts.json -t json --env-manager local

generate in any process that has torch, tokenizers and safetensors. The input is a list of
prompts (or a one-column DataFrame); the output one continuation per prompt, or `n` per
prompt one after another (params={"n": 3}). With `logprobs` > 0 each output is a JSON
object instead of the bare text: {"text", "finish", "tokens": [{"token", "logprob",
"top": [[token, logprob], ...]}]}, tokens as text. `stop` is one stop string ("" for
none). `template` "own" (the default) puts each prompt in the template the model was
trained with (the checkpoint's template.json, an SFT run's; raw text without one), "none"
leaves it raw. MLflow reserves the alias `latest`: load the newest version as `models:/NAME/latest`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import mlflow.pyfunc
import pandas as pd  # an MLflow dependency

# Sampling parameters the model accepts at predict time, with their defaults. top_k=0 and
# top_p=1.0 switch those filters off; seed=-1 samples without a fixed seed.
PARAMS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 0.8,
    "top_k": 50,
    "top_p": 1.0,
    "seed": -1,
    "n": 1,
    "repetition_penalty": 1.0,
    "stop": "",
    "logprobs": 0,
    "template": "own",  # the prompt as the user turn of the template it was trained with
}


def sampling_params(tokenizer, params: dict[str, Any] | None):
    """SamplingParams from predict-time params (unknown keys are refused by the signature)."""
    from lmforge.generation import SamplingParams
    from lmforge.tokenizer import eot_id

    p = {**PARAMS, **(params or {})}
    return SamplingParams(
        max_new_tokens=int(p["max_new_tokens"]),
        temperature=float(p["temperature"]),
        top_k=int(p["top_k"]) or None,
        top_p=None if float(p["top_p"]) >= 1.0 else float(p["top_p"]),
        seed=None if int(p["seed"]) < 0 else int(p["seed"]),
        stop_token=eot_id(tokenizer),
        n=int(p["n"]),
        repetition_penalty=float(p["repetition_penalty"]),
        stop=(str(p["stop"]),) if p["stop"] else (),
        logprobs=int(p["logprobs"]) or None,
    )


def render(tokenizer, sample) -> str:
    """One output: the text, or with log-probs a JSON object (see the module docstring)."""
    if not sample.tokens or sample.tokens[0].logprob is None:
        return sample.text
    piece = lambda t: tokenizer.decode([t])  # noqa: E731
    tokens = [
        {"token": piece(c.token), "logprob": c.logprob, "top": [[piece(t), v] for t, v in c.top]}
        for c in sample.tokens
    ]
    return json.dumps({"text": sample.text, "finish": sample.finish, "tokens": tokens})


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame: the prompts are its first column
        return [str(v) for v in model_input.iloc[:, 0].tolist()]
    return [str(v) for v in model_input]


class TextGenerator(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint once; generates with lmforge's own sampler (KV cache).

    The model's signature (list of prompts in, list of texts out, sampling params) is
    given explicitly when logging (`signature()`). `predict`'s input hint is what MLflow
    hands it under that signature: a one-column DataFrame, whatever the caller passed. A
    `list[str]` hint would make MLflow infer the signature from the hints instead and drop
    the sampling params (it infers params only from an input example, which would generate
    at every registration); with no hint MLflow warns "Add type hints to the `predict`
    method" on every import (mlflow/pyfunc/utils/data_validation.py).
    """

    def load_context(self, context) -> None:
        from lmforge import templates
        from lmforge.checkpoint import load_model, resolve_checkpoint

        ckpt = resolve_checkpoint(context.artifacts["checkpoint"])
        self.model, self.tokenizer, self.cfg = load_model(ckpt)
        self.template = templates.trained_with(ckpt)

    def _prompts(self, model_input: pd.DataFrame, params: dict[str, Any] | None) -> list[str]:
        from lmforge import templates

        own = {**PARAMS, **(params or {})}["template"] == "own"
        return [
            templates.as_prompt(self.template if own else None, p) for p in _prompts(model_input)
        ]

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        from lmforge.generation import complete_samples

        sp = sampling_params(self.tokenizer, params)
        out = []
        for prompt in self._prompts(model_input, params):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            samples = complete_samples(self.model, self.tokenizer, ids, sp)
            out += [render(self.tokenizer, s) for s in samples]
        return out

    def predict_stream(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """Text pieces of the first prompt's continuation, as they are generated."""
        from lmforge.generation import stream_text

        prompts = self._prompts(model_input, params)
        yield from stream_text(
            self.model, self.tokenizer, prompts[0], sampling_params(self.tokenizer, params)
        )


def signature():
    from mlflow.models import infer_signature

    return infer_signature(
        model_input=["ROMEO:"],
        model_output=["a continuation"],
        params=PARAMS,
    )
