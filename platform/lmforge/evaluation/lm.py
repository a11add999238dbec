"""`LmforgeLM`: an lm-evaluation-harness `LM` over an lmforge model, so the harness's own
evaluator runs its tasks on our checkpoints (as Levanter and torchtitan wrap theirs).

    lm = LmforgeLM.from_checkpoint(ckpt, template="own")
    lm_eval.simple_evaluate(model=lm, tasks=[...], apply_chat_template=lm.uses_template)

- `loglikelihood` (multiple choice, loglikelihood tasks): the harness's own encoding of a
  (context, continuation) pair (`TemplateLM._encode_pair`, as its `HFLM`), then batches of
  requests, longest first, right-padded (causal: padding after a row changes nothing
  before it), one forward pass per batch, log-softmax in float32;
- `loglikelihood_rolling` (perplexity tasks): the harness's rolling windows of the model's
  context, scored as above;
- `generate_until`: `lmforge.generation.complete_samples` per request, the one code path of
  `lmforge generate` (its KV cache, stop token and stop strings), with the task's `until`
  strings and `max_gen_toks`; greedy unless the task asks to sample.

The version's prompt template (`--template own|none|NAME`, as `generate`) reaches the
harness as a chat template: `apply_chat_template` renders the harness's messages with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from lmforge.generation import SamplingParams, complete_samples
from lmforge.templates import Template

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default for generate_until


class Progress:
    """`done/total` lines at most every `every_s` seconds (the training log's pace)."""

    def __init__(self, what: str, total: int, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.t0 = self.last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            if self.done < self.total or now - self.t0 >= self.every_s:
                log.info("%s: %d/%d requests (%.0f s)", self.what, self.done, self.total,
                         now - self.t0)  # fmt: skip


class LmforgeLM(TemplateLM):
    """The harness's view of one lmforge model (model, tokenizer, optional template)."""

    def __init__(
        self,
        model,
        tokenizer,
        template: Template | None = None,
        batch_size: int = 16,
        name: str = "lmforge",
    ) -> None:
        super().__init__()
        from lmforge.tokenizer import eot_id

        self.model, self.tok, self.template = model.eval(), tokenizer, template
        self.batch_size, self.name = batch_size, name
        self._eot = eot_id(tokenizer)
        if self._eot is None:
            self._eot = 0  # a tokenizer without an end token: token 0 starts empty contexts
        self.max_length = int(model.cfg.context_length)
        self._device = next(model.parameters()).device
        self.on_progress: Callable[[str, int, int], None] | None = None

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path, template: str = "own", batch_size: int = 16, device: str = "cpu"
    ) -> LmforgeLM:
        from lmforge.checkpoint import load_model

        model, tok, _ = load_model(ckpt, device)
        return cls(model, tok, resolve_template(template, ckpt, tok), batch_size, ckpt.name)

    @property
    def uses_template(self) -> bool:
        return self.template is not None

    # -- what TemplateLM needs ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        # Our tokenizers add no special token of their own (lmforge generate's encoding).
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """(sum of log p(continuation), whether greedy picks every continuation token)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = Progress("loglikelihood", len(requests))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                # Too long for the context: cut from the left, as the harness's HFLM does.
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            width = max(map(len, rows))
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for b, r in enumerate(rows):
                x[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            logits, _ = self.model(x.to(self._device))
            logp = F.log_softmax(logits.float(), dim=-1)
            for b, (i, r, cont) in enumerate(zip(chunk, rows, conts, strict=True)):
                n = len(cont)
                lp = logp[b, len(r) - n : len(r)]  # the positions predicting the continuation
                want = torch.tensor(cont, dtype=torch.long, device=lp.device)
                score = lp.gather(1, want[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == want).all())
                out[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
            progress.add(len(chunk))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood over disjoint windows of the context (the
        harness's `get_rolling_token_windows`, the first predicted from the end token)."""
        windows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (score, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[k] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, through `lmforge generate`'s sampler: it ends at the
        end token, at the first of the task's `until` strings (not part of the text) or
        after `max_gen_toks` tokens."""
        out = []
        progress = Progress("generate_until", len(requests))
        for req in requests:
            context, kwargs = req.args
            params, max_ctx = self.sampling_params(dict(kwargs))
            ids = self.tok_encode(context)[-max_ctx:] if max_ctx > 0 else []
            if not ids:
                ids = [self.prefix_token_id]
            text = complete_samples(self.model, self.tok, ids, params)[0].text
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
            progress.add(1)
        return out

    def sampling_params(self, kwargs: dict) -> tuple[SamplingParams, int]:
        """The task's `generation_kwargs` as our sampling params, and how many prompt tokens
        fit (the context less `max_gen_toks`, as the harness's HFLM keeps)."""
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not sample:
            temperature = 0.0
        params = SamplingParams(
            max_new_tokens=max_gen,
            temperature=temperature,
            top_k=kwargs.pop("top_k", None) if temperature > 0 else None,
            top_p=kwargs.pop("top_p", None) if temperature > 0 else None,
            seed=kwargs.pop("seed", None),
            stop_token=self._eot,
            stop=tuple(s for s in until if s),
        )
        return params, self.max_length - max_gen

    # -- the version's template as the harness's chat template ------------------------------
    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        assert self.template is not None
        return self.template.render(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.source if self.template is not None else None

    @property
    def tokenizer_name(self) -> str:
        return f"lmforge-{self.name}"


def resolve_template(choice: str, ckpt: Path, tok) -> Template | None:
    """`--template own|none|NAME` (as `lmforge generate`): the checkpoint's own (its
    template.json; None without one), none, or a built-in template by name."""
    from lmforge import templates
    from lmforge.tokenizer import eot_token

    if choice == "none":
        return None
    if choice == "own":
        return templates.trained_with(ckpt)
    return templates.get(choice, eos_token=eot_token(tok) or "")
