"""Models: registered models and their versions (architecture, where each came from, a
column per evaluation score); aliases; the probes' answers of a version, or of two side by
side; generate, fine-tune, resume or serve; import a Hugging Face folder from the data
roots; what `lmforge serve` serves, with its request figures."""

import pandas as pd
import streamlit as st
import ui

from lmforge import jobspec
from lmforge.tracking import browse

st.title("Models")
uri = ui.tracking_uri()

with st.expander("Import a Hugging Face model folder"):
    roots = ", ".join(str(r) for r in jobspec.data_roots())
    st.caption(
        "A local folder as transformers' `save_pretrained` writes it (config.json, "
        "safetensors weights, tokenizer.json) of a GPT-2 or Llama model, inside the data "
        f"roots ({roots}); the same import as `lmforge import-hf`. Nothing is downloaded."
    )
    folder = st.text_input("Folder", placeholder="a folder inside the data roots", key="imp_dir")
    as_name = st.text_input("Register as", placeholder="e.g. gpt2-small", key="imp_name")
    if st.button("Import", disabled=not (folder.strip() and as_name.strip()), key="imp_go"):
        with ui.guard("Not imported"):
            path = jobspec.inside_roots(folder.strip(), "folder")
            from lmforge.import_hf import import_hf

            with st.spinner(f"Reading and registering {path} ..."):
                done = import_hf(path, as_name.strip(), tracking_uri=uri)
        st.success(f"Imported {path} as `models:/{done.name}/{done.version}`")
        st.session_state["models_name"] = done.name

with ui.guard(f"MLflow at {uri}"):
    names = browse.models(uri)
if not names:
    st.info(
        f"No registered models in MLflow at {uri} yet: every checkpoint of a run becomes one, "
        "and so does an imported Hugging Face folder."
    )
    st.stop()

name = st.selectbox("Registered model", names, key="models_name")
with ui.guard(f"Versions of {name}"):
    versions = browse.versions(uri, name)
if not versions:
    st.info(f"{name} has no versions yet.")
    st.stop()

newest = versions[0].version
score_keys = sorted({k for v in versions for k in v.scores})  # a column each, sortable
st.dataframe(
    pd.DataFrame(
        [
            {
                "version": v.version,
                "aliases": ", ".join(v.aliases + (("latest",) if v.version == newest else ())),
                "arch": v.arch,
                "source": v.origin,
                "step": v.step,
                "val_loss": v.val_loss,
                **{k: v.scores.get(k) for k in score_keys},
                "tokens_seen": v.tokens_seen,
                "registered": ui.when(v.created),
                **(
                    {"eval warning": v.eval_warning}
                    if any(x.eval_warning for x in versions)
                    else {}
                ),
            }
            for v in versions
        ]
    ),
    hide_index=True,
)
with ui.guard("MLflow"):
    best_by = browse.best_by(uri, name)
st.caption(
    "`latest` is always the newest version (MLflow reserves that alias); `best` follows "
    f"{best_by}. Evaluation scores (task/metric) come from `eval.tasks` on every checkpoint "
    "or `lmforge evaluate --tasks`; click a column to sort."
)

numbers = [v.version for v in versions]
version = st.selectbox("Version", numbers, key="models_version")
uri_of = f"models:/{name}/{version}"

c1, c2 = st.columns([2, 3])
with c1:
    alias = st.text_input("Alias", placeholder="e.g. prod, candidate", key="models_alias")
    if st.button("Set alias", disabled=not alias):
        with ui.guard("Alias not set"):
            browse.set_alias(uri, name, alias, version)
        st.success(f"models:/{name}@{alias.strip()} -> version {version}")
        st.rerun()
with c2:
    st.write(f"`{uri_of}`")
    b1, b2, b3, b4 = st.columns(4)
    if b1.button("Generate from it", key="models_gen"):
        st.session_state["play_a"] = uri_of
        st.switch_page("pages/playground.py")
    if b2.button("Fine-tune from it", key="models_init"):
        st.session_state["launch_from"] = ("init", uri_of)
        st.switch_page("pages/launch.py")
    if b3.button("Resume its run", key="models_resume"):
        st.session_state["launch_from"] = ("resume", uri_of)
        st.switch_page("pages/launch.py")
if b4.button("Serve", key="models_serve", help="an OpenAI-compatible endpoint (lmforge serve up)"):
    from lmforge.serving.deploy import serve_job

    with ui.guard("Not served"):
        job = ui.job_client().submit(serve_job([uri_of], uri))
    st.success(
        f"Submitted `{job}`: `lmforge serve up` adds `{uri_of}` to the endpoint; it is listed "
        "below once it answers (its log: the Jobs page)."
    )

st.subheader("Served")
from lmforge.serving import deploy  # noqa: E402 - the page reads top to bottom

record = deploy.running_record()
if record is None:
    st.caption("Nothing is served: the Serve button above, or `lmforge serve up --model URI`.")
else:
    figures = deploy.stats(record)
    st.write(f"OpenAI-compatible endpoint: `{record.url}/v1` (key: `LMFORGE_HOME/serve_api_key`); "
             f"{record.replicas} replica(s) a base, max batch {record.max_batch}, dtype {record.dtype}")  # fmt: skip
    if figures is None:
        st.warning(f"{record.url} does not answer (`lmforge serve status`)")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "model": n, "version": u, **{
                        k: (figures or {}).get(n, {}).get(k)
                        for k in ("requests", "errors", "tokens", "tokens_per_s_1m",
                                  "ttft_p50_s", "latency_p50_s", "latency_p95_s")
                    },
                }
                for n, u in record.models.items()
            ]
        ),
        hide_index=True,
    )  # fmt: skip

probed = [v for v in versions if v.probes]
if probed:
    st.subheader("Probe answers")
    by_number = {v.version: v for v in probed}
    p1, p2 = st.columns(2)
    a = p1.selectbox("Answers of version", list(by_number), key="probes_a")
    others = ["(none)", *[n for n in by_number if n != a]]
    b = p2.selectbox("Side by side with", others, key="probes_b")
    with ui.guard("Probe answers"):
        rows_a = browse.probe_answers(uri, by_number[a])
        if b == "(none)":
            table = rows_a
        else:
            rows_b = browse.probe_answers(uri, by_number[b])
            table = browse.compare_probes(rows_a, rows_b, f"version {a}", f"version {b}")
    st.dataframe(pd.DataFrame(table), hide_index=True, key="probes_table")
