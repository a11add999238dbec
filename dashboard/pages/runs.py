"""Runs: training curves of one or several MLflow runs on one chart, live while they run."""

import pandas as pd
import streamlit as st
import ui
from charts import curves

from lmforge.tracking import browse

st.title("Runs")
uri = ui.tracking_uri()
with ui.guard(f"MLflow at {uri}"):
    exps = browse.experiments(uri)
if not exps:
    st.info(f"No experiments in MLflow at {uri} yet. Launch a training job first.")
    st.stop()

chosen = st.multiselect("Experiments", exps, default=exps, key="runs_exps")
with ui.guard("MLflow"):
    rows = browse.runs(uri, chosen or exps)
if not rows:
    st.info("These experiments have no runs yet.")
    st.stop()

labels = {r.run_id: f"{r.name} ({r.experiment}, {r.status.lower()})" for r in rows}
wanted = [r for r in st.session_state.get("runs_selected", []) if r in labels]
picked = st.multiselect(
    "Runs",
    list(labels),
    default=wanted or [rows[0].run_id],
    format_func=labels.get,
    key="runs_pick",
)
st.session_state["runs_selected"] = picked
by_id = {r.run_id: r for r in rows}
# A mixture's runs log each source's val curves (val_loss/<name>) and tokens per step.
per_source = browse.source_curves([by_id[r] for r in picked])
# A preference run's (train.objective dpo) rewards and log-probs, as TRL names them.
preference = browse.preference_curves([by_id[r] for r in picked])
with ui.guard("MLflow"):
    eval_keys = browse.eval_curves(uri, picked)  # eval/<task>/<metric> at checkpoint steps
keys = st.multiselect(
    "Metrics",
    [*browse.CURVES, *per_source, *preference, *eval_keys],
    default=[
        "loss",
        "val_loss",
        "lr",
        "tokens_per_s",
        *browse.source_val_curves(per_source),
        *[k for k in preference if k.endswith(("rewards/accuracies", "rewards/margins"))],
        *eval_keys[:4],
    ],
    key="runs_keys",
)
if not picked:
    st.info("Choose one or more runs.")
    st.stop()
live = any(r.status == "RUNNING" for r in rows if r.run_id in picked)


def chart() -> None:
    """The curves; re-read every 5 s while a chosen run is live."""
    with ui.guard("MLflow"):
        hist = {labels[r].split(" (")[0]: browse.history(uri, r, keys) for r in picked}
    if not any(hist.values()):
        st.info("No metrics logged yet.")
        return
    events = {labels[r].split(" (")[0]: browse.guard_events(by_id[r]) for r in picked}
    for run, marks in events.items():  # the guard's rollbacks: a banner over the chart
        for step, text in marks:
            st.warning(f"{run}, step {step}: {text}")
    st.plotly_chart(curves(hist, keys, events), key="runs_chart")
    if live:
        st.caption("refreshing every 5 s while the run is live")


st.fragment(chart, run_every=5 if live else None)()

summary = pd.DataFrame(
    [
        {
            "run": by_id[r].name,
            "status": by_id[r].status,
            "started": ui.when(by_id[r].start),
            "loss": by_id[r].metrics.get("loss"),
            "val_loss": by_id[r].metrics.get("val_loss"),
            "tokens/s": by_id[r].metrics.get("tokens_per_s"),
            "Ray job": by_id[r].submission_id or "",
        }
        for r in picked
    ]
)
st.dataframe(summary, hide_index=True)
for r in picked:
    with st.expander(f"Config of {by_id[r].name}"):
        with ui.guard("MLflow"):
            st.code(browse.run_config(uri, r), language="yaml")
        link = browse.run_link(uri, by_id[r])
        if link:
            st.markdown(f"[Open in the MLflow UI]({link})")
