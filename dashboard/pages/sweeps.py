"""Sweeps: every `lmforge sweep` (its MLflow parent run), its trials (sampled values, metric,
state, steps reached), a parallel-coordinates plot of the values against the metric, every
trial's curve on one chart; fine-tune from the best, or resume the sweep as a Ray job."""

import charts
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import ui

from lmforge.sweeps import record

st.title("Sweeps")
uri = ui.tracking_uri()

with ui.guard(f"MLflow at {uri}"):
    found = record.list_sweeps(uri)
if not found:
    st.info(
        f"No sweeps in MLflow at {uri} yet: `lmforge sweep --name NAME --config BASE.yaml "
        "--space SPACE.yaml` runs one (each trial a whole training job), or the Launch page's "
        "Sweep section."
    )
    st.stop()

st.dataframe(
    pd.DataFrame(
        [
            {
                "sweep": s["name"],
                "experiment": s["experiment"],
                "status": s["status"],
                "started": ui.when((s["started"] or 0) / 1000),
                "scheduler": s["scheduler"],
                "search": s["search"],
                "metric": f"{s['metric']} ({s['mode']})",
                "best": s["best_value"],
                "best trial": s["best_trial"],
                "best version": s["best_version"],
            }
            for s in found
        ]
    ),
    hide_index=True,
)
labels = [f"{s['name']} ({s['experiment']})" for s in found]
pick = st.selectbox("Sweep", range(len(found)), format_func=labels.__getitem__, key="sweeps_pick")
sweep = found[pick]
metric = sweep["metric"] or "val_loss"
with ui.guard(f"Trials of {sweep['name']}"):
    trials = record.trials_of(uri, sweep["experiment"], sweep["name"], metric)
if not trials:
    st.info("No trial has started logging yet.")
    st.stop()

keys = sorted({k for t in trials for k in t["values"]})
frame = pd.DataFrame(
    [
        {
            "trial": t["trial"],
            **{k: t["values"].get(k) for k in keys},
            metric: t["metric"],
            "state": t["state"],
            "stopped early": t["stopped_early"],
            "last step": t["last_step"],
            "run": t["run_dir"],
        }
        for t in trials
    ]
)
st.subheader("Trials")
st.dataframe(frame, hide_index=True)

numeric = [k for k in keys if pd.api.types.is_numeric_dtype(frame[k])]
scored = frame.dropna(subset=[metric])
if numeric and not scored.empty:
    st.subheader("Values against the metric")
    dims = [
        {"label": k, "values": scored[k], **({"tickformat": ".1e"} if "lr" in k else {})}
        for k in numeric
    ]
    dims.append({"label": metric, "values": scored[metric]})
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": scored[metric],
                "colorscale": "Viridis",
                "reversescale": sweep["mode"] != "max",
                "showscale": True,
            },
            dimensions=dims,
        )
    )
    fig.update_layout(height=380, margin={"t": 50, "b": 30})
    st.plotly_chart(fig, use_container_width=True)

st.subheader("Every trial's curve")
with ui.guard("Curves"):
    history = record.curves_of(uri, [t["run_id"] for t in trials], metric)
label = {t["run_id"]: t["trial"] for t in trials}
st.plotly_chart(
    charts.curves({label[r]: {metric: pts} for r, pts in history.items()}, [metric]),
    use_container_width=True,
)

b1, b2 = st.columns(2)
if sweep["best_version"] and b1.button("Fine-tune from the best", key="sweeps_init"):
    model = sweep.get("model") or sweep["experiment"]
    st.session_state["launch_from"] = ("init", f"models:/{model}@sweep-{sweep['name']}")
    st.switch_page("pages/launch.py")
if b2.button("Resume the sweep (a Ray job)", key="sweeps_resume"):
    from lmforge.sweeps.submit import resume_job

    with ui.guard("Not submitted"):
        sid = ui.job_client().submit(resume_job(sweep["name"], sweep_dir=sweep["storage"]))
    st.session_state["jobs_selected"] = sid
    st.success(f"Submitted job `{sid}`: the sweep's unfinished trials go on")
