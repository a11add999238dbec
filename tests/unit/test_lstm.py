"""`model.arch: lstm`: counts, the recurrent state generation carries, checkpoints, export, ZeRO."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from lmforge import models
from lmforge.checkpoint import WEIGHTS, TrainerState, load_model, save_servable, seal
from lmforge.config import ModelConfig, load_config
from lmforge.errors import UsageError
from lmforge.export_hf import export_hf
from lmforge.generation import SamplingParams, generate_tokens, sample_next
from lmforge.tokenizer import train_tokenizer
from tests.conftest import REPO

CTX, V = 16, 50
SHAPES = [
    {"n_layer": 1, "d_model": 16, "vocab_size": 50},
    {"n_layer": 3, "d_model": 24, "vocab_size": 301, "tie_embeddings": False},
]


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="lstm", n_layer=2, d_model=32, context_length=CTX, vocab_size=V, **kw)
    return models.build(cfg).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_param_count_from_the_config_is_the_built_models(shape):
    cfg = ModelConfig(arch="lstm", **shape)
    model = models.build(cfg)
    tied = cfg.tie_embeddings is not False
    assert (model.lm_head.weight is model.wte.weight) == tied
    assert models.get("lstm").tied(cfg) == (("lm_head.weight",) if tied else ())
    assert models.get("lstm").n_params(cfg) == sum(p.numel() for p in model.parameters())


def reference_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """The LSTM recurrence written out with matmuls (torch's gate order: i, f, g, o)."""
    x = model.wte(idx)
    for layer in range(model.cfg.n_layer):
        w_ih, w_hh, b_ih, b_hh = (
            getattr(model.lstm, f"{name}_l{layer}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        # A state that needs its gradient, as one carried in from an earlier window: from a
        # fresh zero state backward skips one matmul per layer and sequence (2·4d²/T a token).
        h = c = torch.zeros(idx.size(0), model.cfg.d_model, requires_grad=True)
        outs = []
        for t in range(idx.size(1)):
            i, f, g, o = (x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            outs.append(h)
        x = torch.stack(outs, dim=1)
    return model.lm_head(x)


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_per_token_are_what_torch_counts_for_the_written_out_recurrence(shape):
    """nn.LSTM is one opaque op to torch's FLOP counter, so the count is taken on the same
    recurrence written out with matmuls, checked first to give the module's logits."""
    cfg = ModelConfig(arch="lstm", context_length=CTX, **shape)
    torch.manual_seed(0)
    model = models.build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, CTX))
    torch.testing.assert_close(reference_logits(model, idx), model(idx)[0], atol=1e-5, rtol=1e-5)
    with FlopCounterMode(display=False) as counter:
        logits = reference_logits(model, idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    per_token = counter.get_total_flops() / idx.numel()
    assert models.get("lstm").flops_per_token(cfg) == per_token


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, V, (3, 12))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 12, V)
    assert model(idx)[1] is None
    # Small tied embeddings: an untrained model predicts close to uniform.
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_state_continues_the_sequence_exactly():
    model = tiny()
    idx = torch.randint(0, V, (2, 40))  # past the context: a state has no limit
    full, _ = model(idx)
    state = models.of(model).new_cache(model, 2, "cpu", torch.float32)
    parts = [model(idx[:, :10], cache=state)[0]]
    parts += [model(idx[:, t : t + 1], cache=state)[0] for t in range(10, 40)]
    assert state.length == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def full_recompute(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Each token sampled from a forward pass over the whole sequence so far."""
    generator = torch.Generator().manual_seed(params.seed)
    seq, out = list(prompt), []
    for _ in range(params.max_new_tokens):
        logits, _ = model(torch.tensor([seq]))
        token = int(sample_next(logits[:, -1], params, generator))
        seq.append(token)
        out.append(token)
    return out


def test_generation_carries_the_state_past_the_context_without_refills():
    """The prompt goes in once, then one token per step, never refilled: 5 + 40 tokens of a
    16-token context give the tokens a full recompute over the whole sequence gives."""
    model = tiny()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[1]))
    params = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=10, seed=3)
    prompt = [1, 2, 3, 4, 5]
    cached = list(generate_tokens(model, prompt, params))
    assert sizes == [5] + [1] * 39
    assert cached == full_recompute(model, prompt, params)


def test_a_prompt_longer_than_the_context_is_fed_whole(caplog):
    model = tiny()
    prompt = [int(t) for t in torch.randint(0, V, (3 * CTX,))]
    seen: list[list[int]] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].tolist()))
    greedy = SamplingParams(max_new_tokens=3, temperature=0)
    with caplog.at_level(logging.WARNING, logger="lmforge.generation"):
        out = list(generate_tokens(model, prompt, greedy))
    assert seen[0] == prompt and "keeping the last" not in caplog.text
    assert out == full_recompute(model, prompt, SamplingParams(3, 0, seed=0))


def test_the_playground_keeps_a_long_prompt_whole_for_a_recurrent_model():
    from lmforge.config import Config
    from lmforge.playground import Loaded, fit_prompt

    tok = train_tokenizer(["to be or not to be, that is the question"] * 5, vocab_size=300)
    text = "to be or not to be, " * 20  # far longer than the 16-token context
    lstm, gpt2 = tiny(), models.build(ModelConfig(context_length=CTX, vocab_size=300))
    n = len(tok.encode(text).ids)
    for model, kept in ((lstm, n), (gpt2, CTX - 1)):
        cfg = Config(model=model.cfg)
        prompt = fit_prompt(Loaded("models:/m/1", "1", REPO, model, tok, cfg), text, 10)
        assert len(prompt.ids) == kept and (prompt.notice is None) == (kept == n)


@pytest.fixture
def tokenizer_file(tmp_path):
    tok = train_tokenizer(["to be or not to be, that is the question"] * 5, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def saved(tmp_path, tokenizer_file, *overrides):
    cfg = load_config(REPO / "jobs" / "configs" / "lstm-tiny.yaml",
                      ["model.vocab_size=300", *overrides])  # fmt: skip
    torch.manual_seed(0)
    model = models.build(cfg.model).eval()
    ckpt = tmp_path / "run" / "checkpoint_00000010"
    save_servable(ckpt, model.state_dict(), cfg, tokenizer_file, TrainerState(step=10))
    seal(ckpt)
    return model, ckpt


@pytest.mark.parametrize("tie", [None, False])
def test_tied_and_untied_weights_round_trip_through_a_checkpoint(tmp_path, tokenizer_file, tie):
    extra = [] if tie is None else [f"model.tie_embeddings={str(tie).lower()}"]
    model, ckpt = saved(tmp_path, tokenizer_file, *extra)
    stored = load_file(str(ckpt / WEIGHTS))
    assert ("lm_head.weight" in stored) == (tie is False)  # a tied alias is not written
    loaded, _, cfg = load_model(ckpt)
    assert cfg.model.arch == "lstm" and cfg.model.tie_embeddings is (tie is None)  # default on
    assert (loaded.lm_head.weight is loaded.wte.weight) == (tie is None)
    idx = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_export_hf_refuses_it_in_one_line(tmp_path, tokenizer_file):
    _, ckpt = saved(tmp_path, tokenizer_file)
    with pytest.raises(UsageError, match="model.arch=lstm has no Hugging Face equivalent"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


ZERO_RUN = """
import functools, json, os, socket, sys, warnings
warnings.filterwarnings("ignore")
import torch
from lmforge import dist, models
from lmforge.config import load_config
from lmforge.training.ds_config import deepspeed_config, lr_factor
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
dist.setup(use_gpu=False)
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for stage in (2, 3):
    cfg = load_config(sys.argv[1], ["model.vocab_size=50", "model.d_model=16",
                      "model.context_length=8", "train.micro_batch_size=4", f"zero.stage={stage}"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
        config=deepspeed_config(cfg, world_size=1), lr_scheduler=lambda opt:
        torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, cfg=cfg)))
    held = sum(p.numel() for p in eng.module.lstm.parameters())
    x = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        _, loss = eng(x[:, :-1], targets=x[:, 1:])
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    out[stage] = {"held": held, "losses": losses}
print(json.dumps(out))
"""


def test_zero_3_partitions_the_lstm_weights_and_trains_as_zero_2():
    """A real DeepSpeed engine (one process, gloo, CPU; in a fresh process, as DeepSpeed keeps
    global state): under ZeRO 3 the module holds empty partitions of nn.LSTM's weights, its
    forward gathers them (the flat-weights list holds the same Parameter objects) and the
    losses are ZeRO 2's."""
    proc = subprocess.run(
        [sys.executable, "-c", ZERO_RUN, str(REPO / "jobs" / "configs" / "lstm-tiny.yaml")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["3"]["held"] == 0 < out["2"]["held"]
    stage2, stage3 = out["2"]["losses"], out["3"]["losses"]
    assert stage3[-1] < stage3[0]
    assert stage3 == pytest.approx(stage2, abs=1e-5)


def test_the_preset_is_a_cpu_sized_lstm():
    cfg = load_config(REPO / "jobs" / "configs" / "lstm-tiny.yaml", ["model.vocab_size=512"])
    assert cfg.model.arch == "lstm" and not cfg.scaling.use_gpu
    assert models.get("lstm").n_params(cfg.model) < 1_000_000
