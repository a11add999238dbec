"""Playground: prompt a registered version or chat with it; compare two side by side.

Complete mode continues a prompt (raw, or written in a template); Chat mode keeps a
conversation in the session and formats it with the version's template. Both show the
exact text the model sees, can draw several samples at once and colour tokens by their
probability.
"""

import streamlit as st
import ui

from lmforge import playground, templates
from lmforge.generation import SamplingParams
from lmforge.tracking import browse
from lmforge.tracking.registry import get_version

st.title("Playground")
uri = ui.tracking_uri()
with ui.guard(f"MLflow at {uri}"):
    names = browse.models(uri)
if not names:
    st.info(f"No registered models in MLflow at {uri} yet: train one first.")
    st.stop()


@st.cache_resource(max_entries=4, show_spinner="Loading the model ...")
def load(version_uri: str, tracking: str) -> playground.Loaded:
    """One copy per exact version (an alias is resolved first, so a moved alias reloads)."""
    return playground.load(version_uri, tracking)


def choose(label: str, key: str) -> str:
    """A version: model, then @best, @latest or a version number."""
    preset = st.session_state.get(key, "")
    model_default = (
        preset.split("/")[1].split("@")[0] if preset.startswith("models:/") else names[0]
    )
    c1, c2 = st.columns(2)
    name = c1.selectbox(
        f"{label}: model",
        names,
        index=names.index(model_default) if model_default in names else 0,
        key=f"{key}_name",
    )
    with ui.guard(f"Versions of {name}"):
        versions = [v.version for v in browse.versions(uri, name)]
    refs = ["@best", "@latest", *[f"/{v}" for v in versions]]
    ref_default = (
        "/" + preset.rsplit("/", 1)[-1]
        if preset.count("/") == 2 and preset.startswith("models:/")
        else "@best"
    )
    ref = c2.selectbox(
        f"{label}: version",
        refs,
        index=refs.index(ref_default) if ref_default in refs else 0,
        key=f"{key}_ref",
    )
    return f"models:/{name}{ref}"


def loaded_version(target: str) -> tuple[str, playground.Loaded]:
    v = get_version(target, uri)
    return v.version, load(f"models:/{v.name}/{v.version}", uri)


def few_shot_examples(text: str) -> list[dict[str, str]]:
    """The editor's lines, `question => answer` each."""
    rows = [line.split("=>", 1) for line in text.splitlines() if "=>" in line]
    return [{"prompt": q.strip(), "completion": a.strip()} for q, a in rows]


mode = st.radio("Mode", ["Complete", "Chat"], horizontal=True, key="play_mode")
compare = mode == "Complete" and st.toggle("Compare two versions side by side", key="play_compare")
first = choose("A", "play_a")
second = choose("B", "play_b") if compare else None

with ui.guard(f"Loading {first}"):
    first_version, first_model = loaded_version(first)
choices = playground.template_choices(first_model)
names_t = [*choices, "few-shot"]
own = next((i for i, n in enumerate(names_t) if n.startswith(playground.OWN)), None)
default_t = own if own is not None else (names_t.index("chat") if mode == "Chat" else 0)
tcol, cotcol = st.columns([3, 1])
template_name = tcol.selectbox(
    "Template",
    names_t,
    index=default_t,
    key=f"play_template_{mode}",
    help="How the conversation becomes the text the model reads; the version's own is the "
    "one it was trained with (or an imported model's chat template).",
)
cot = cotcol.toggle("Chain of thought", key="play_cot", help=f"adds “{templates.COT_CUE}”")
template = choices.get(template_name)
if template_name == "few-shot":
    examples = few_shot_examples(
        st.text_area(
            "Few-shot examples (one per line: question => answer)",
            "Capital of France? => Paris\nCapital of Italy? => Rome",
            key="play_examples",
        )
    )
    if not examples:
        st.info("Write at least one example, as `question => answer`.")
        st.stop()
    template = playground.with_examples(first_model, examples)
if mode == "Chat" and template is None:
    st.info("Chat needs a template: pick one above.")
    st.stop()

c1, c2, c3, c4, c5 = st.columns(5)
temperature = c1.slider("Temperature", 0.0, 2.0, 0.8, 0.05, help="0 is greedy", key="play_t")
top_k = c2.number_input("Top-k (0: off)", 0, 100_000, 50, key="play_k")
top_p = c3.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="play_p")
max_new = c4.number_input("Max new tokens", 1, 4096, 100, key="play_n")
seed = c5.number_input("Seed", 0, 2**31 - 1, 0, key="play_seed")
c1, c2, c3, c4 = st.columns(4)
n = c1.number_input("Samples", 1, 8, 1, key="play_samples", help="drawn together, side by side")
penalty = c2.number_input(
    "Repetition penalty", 0.5, 10.0, 1.0, 0.05, key="play_rep", help="> 1 discourages repeats"
)
stops = c3.text_input("Stop at (comma-separated)", "", key="play_stop")
colour = c4.toggle("Colour by probability", key="play_colour")
params = SamplingParams(
    max_new_tokens=int(max_new),
    temperature=float(temperature),
    top_k=int(top_k) or None,
    top_p=float(top_p) if top_p < 1.0 else None,
    seed=int(seed),
    n=1 if mode == "Chat" else int(n),
    repetition_penalty=float(penalty),
    stop=tuple(s for s in (x.strip() for x in stops.split(",")) if s),
    logprobs=5 if colour else None,
)
cue = templates.COT_CUE if cot and template_name != "chain-of-thought" else None


def run(model: playground.Loaded, text: str, boxes, shown: str = "") -> list[str]:
    """Generate into `boxes` (one per sample, after `shown`) as pieces come; the texts."""
    fitted = playground.fit_prompt(model, text, params.max_new_tokens)
    if fitted.notice:
        st.info(fitted.notice)
    out = [""] * params.n
    tokens: list[list] = [[] for _ in range(params.n)]
    for piece in playground.stream_pieces(model, fitted, params):
        out[piece.index] += piece.text
        if piece.token is not None:
            tokens[piece.index].append(piece.token)
        boxes[piece.index].text(shown + out[piece.index])  # plain text, not markdown
    if colour:
        for box, toks in zip(boxes, tokens, strict=True):
            box.html(playground.token_html(model.tokenizer, toks, shown))
    return out


if mode == "Complete":
    prompt = st.text_area("Prompt", "ROMEO:", height=100, key="play_prompt")
    seen = playground.render_prompt(template, [{"role": "user", "content": prompt}], cue)
    with st.expander("Exact text the model sees", expanded=template is not None):
        st.code(seen, language=None)
    if st.button("Generate", type="primary", key="play_go"):
        targets = [first, second] if second else [first]
        columns = st.columns(len(targets))
        for col, target in zip(columns, targets, strict=True):
            with col, ui.guard(f"Generating from {target}"):
                version, model = loaded_version(target)
                st.markdown(f"**{target}** = version {version} (context {model.context_length})")
                boxes = [c.empty() for c in st.columns(params.n)]
                # Raw text: each sample shows the prompt it continues.
                texts = run(model, seen, boxes, shown=prompt if template is None else "")
                st.caption(f"{sum(map(len, texts)):,} characters generated")
else:
    history = st.session_state.setdefault(f"chat:{first}", [])
    # Pinned below the page; disabled while a reply streams: a turn sent mid-stream would
    # rerun the page and cut the reply off before it is saved.
    said = st.chat_input("Your message", key="play_chat_in", submit_mode="disable")
    st.caption(f"{first} = version {first_version}, template: {template.name}")
    if st.button("Clear the conversation", key="play_clear"):
        history.clear()
    for m in history:
        st.chat_message(m["role"]).text(m["content"])
    if said:
        history.append({"role": "user", "content": said})
        st.chat_message("user").text(said)
        with st.chat_message("assistant"), ui.guard(f"Generating from {first}"):
            (reply,) = run(
                first_model, playground.render_prompt(template, history, cue), [st.empty()]
            )
        history.append({"role": "assistant", "content": reply.strip()})
    pending = history + [{"role": "user", "content": "…"}]
    with st.expander("Exact text the model sees (next turn)"):
        st.code(playground.render_prompt(template, pending, cue), language=None)
