"""Playground: type a prompt, watch a registered version continue it; compare two side by side."""

import streamlit as st
import ui

from lmforge import playground
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


compare = st.toggle("Compare two versions side by side", key="play_compare")
first = choose("A", "play_a")
second = choose("B", "play_b") if compare else None
prompt = st.text_area("Prompt", "ROMEO:", height=100, key="play_prompt")
c1, c2, c3, c4, c5 = st.columns(5)
temperature = c1.slider("Temperature", 0.0, 2.0, 0.8, 0.05, help="0 is greedy", key="play_t")
top_k = c2.number_input("Top-k (0: off)", 0, 100_000, 50, key="play_k")
top_p = c3.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="play_p")
max_new = c4.number_input("Max new tokens", 1, 4096, 100, key="play_n")
seed = c5.number_input("Seed", 0, 2**31 - 1, 0, key="play_seed")
params = SamplingParams(
    max_new_tokens=int(max_new),
    temperature=float(temperature),
    top_k=int(top_k) or None,
    top_p=float(top_p) if top_p < 1.0 else None,
    seed=int(seed),
)

if st.button("Generate", type="primary", key="play_go"):
    targets = [first, second] if second else [first]
    columns = st.columns(len(targets))
    for col, target in zip(columns, targets, strict=True):
        with col, ui.guard(f"Generating from {target}"):
            v = get_version(target, uri)
            exact = f"models:/{v.name}/{v.version}"
            model = load(exact, uri)
            st.markdown(f"**{target}** = version {v.version} (context {model.context_length})")
            fitted = playground.fit_prompt(model, prompt, params.max_new_tokens)
            if fitted.notice:
                st.info(fitted.notice)
            box, text = st.empty(), ""
            for piece in playground.stream(model, fitted, params):
                text += piece
                box.text(prompt + text)  # plain text: the model's output is not markdown
            st.caption(f"{len(text):,} characters generated")
