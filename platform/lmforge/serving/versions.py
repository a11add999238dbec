"""Which versions a server holds, and loading them into one replica.

    groups = resolve(["models:/tiny@best", "models:/tiny-lora/2"])   # at deploy, once
    model, served = load(groups[0], tracking_uri)                     # in a replica

`resolve` turns each URI into the version it names now (an alias is resolved here, once:
the server keeps serving that version until the next `serve up`), under the name clients
use (`tiny@best`, `tiny-lora/2`), and groups the versions by base: a LoRA version belongs
with the version whose weights it was trained on (its `base.json`'s sha256), so one
replica holds one base and all of its adapters. `load` reads a group's base once and adds
each adapter under a name of its own (`lora.add_adapters(..., name=)`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError


class ServeError(LmforgeError):
    """Something `lmforge serve` was asked that it cannot do; the message names it."""


@dataclass(frozen=True)
class Served:
    name: str  # what clients put in "model": NAME@ALIAS or NAME/VERSION as given
    uri: str  # the version it resolved to: models:/NAME/N
    version: str
    adapter: bool  # a LoRA version (served on its base)


@dataclass(frozen=True)
class Group:
    """Versions that share one base: one deployment, each replica holds them all."""

    key: str  # the base weights' sha256 (first 12)
    versions: tuple[Served, ...] = field(default_factory=tuple)

    @property
    def deployment(self) -> str:
        """Its deployment's name, from what it holds: a deployment never changes what it
        serves under one name, so a request routed by name always finds its version."""
        held = "\n".join(sorted(f"{v.name}={v.uri}" for v in self.versions))
        return f"base-{self.key[:8]}-{hashlib.sha256(held.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict:
        return {"key": self.key, "versions": [asdict(v) for v in self.versions]}

    @classmethod
    def from_dict(cls, d: dict) -> Group:
        return cls(d["key"], tuple(Served(**v) for v in d["versions"]))


def served_name(uri: str) -> str:
    """`models:/tiny@best` -> `tiny@best`; `models:/tiny/3` -> `tiny/3`."""
    return uri.removeprefix("models:/")


def resolve(uris: list[str], tracking_uri: str | None = None) -> list[Group]:
    """The versions the URIs name now, grouped by base (checkpoints fetched to the cache)."""
    from lmforge import checkpoint as ckpt_io
    from lmforge.tracking.registry import fetch_checkpoint, get_version, is_model_uri

    if not uris:
        raise ServeError("--model: name at least one version (models:/NAME@ALIAS)")
    groups: dict[str, list[Served]] = {}
    seen: set[str] = set()
    for uri in uris:
        if not is_model_uri(uri):
            raise ServeError(
                f"--model {uri!r}: not a model URI (models:/NAME@ALIAS or models:/NAME/N)"
            )
        name = served_name(uri)
        if name in seen:
            raise ServeError(f"--model {uri}: given twice")
        seen.add(name)
        v = get_version(uri, tracking_uri)
        pinned = f"models:/{v.name}/{v.version}"
        ckpt = fetch_checkpoint(pinned, tracking_uri)
        adapter = ckpt_io.is_adapter(ckpt)
        sha = ckpt_io.read_base(ckpt).sha256 if adapter else ckpt_io.weights_sha256(ckpt)
        groups.setdefault(sha[:12], []).append(Served(name, pinned, str(v.version), adapter))
    return [Group(k, tuple(vs)) for k, vs in groups.items()]


@dataclass
class Version:
    """One served version inside a replica."""

    served: Served
    adapter: str | None  # the adapter's name in the model (None: the base itself)
    tokenizer: object
    eot: int | None
    template: object  # lmforge.templates.Template or None: no chat
    context_length: int
    checkpoint: Path


def load(group: Group, tracking_uri: str | None = None, device: str = "cpu", dtype=None):
    """(model, {served name: Version}): the group's base with every adapter added, its
    weights (adapters too) in `dtype` (a torch.dtype; None: as trained)."""
    from safetensors.torch import load_file

    from lmforge import checkpoint as ckpt_io
    from lmforge import lora, templates
    from lmforge.tokenizer import eot_id, load_tokenizer
    from lmforge.tracking.registry import fetch_checkpoint

    ckpts = {s.name: fetch_checkpoint(s.uri, tracking_uri) for s in group.versions}
    first = ckpts[group.versions[0].name]
    base = ckpt_io.find_base(first) if group.versions[0].adapter else first
    model, _, cfg = ckpt_io.load_model(base, device)
    out: dict[str, Version] = {}
    for i, s in enumerate(group.versions):
        ckpt = ckpts[s.name]
        name = None
        if s.adapter:
            name = f"v{i}"
            acfg = ckpt_io.read_config(ckpt)
            lora.add_adapters(model, lora.settings_of(acfg.train.lora), name=name)
            state = load_file(str(ckpt / ckpt_io.ADAPTER), device=device)
            lora.load_adapter(model, state, name=name)
        tok = load_tokenizer(ckpt / "tokenizer.json")
        out[s.name] = Version(
            s, name, tok, eot_id(tok), templates.of_folder(ckpt), cfg.model.context_length, ckpt
        )
    model.to(device, dtype).eval()
    return model, out
