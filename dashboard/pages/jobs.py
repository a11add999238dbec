"""Jobs: every job on the Ray cluster, its log tail while it runs, stop, its MLflow run."""

import pandas as pd
import streamlit as st
import ui

from lmforge.errors import LmforgeError
from lmforge.jobclient import failure_line
from lmforge.tracking import browse

ICONS = {
    "SUCCEEDED": ":material/check_circle:",
    "FAILED": ":material/error:",
    "STOPPED": ":material/stop_circle:",
    "RUNNING": ":material/directions_run:",
    "PENDING": ":material/hourglass_top:",
}

st.title("Jobs")
client = ui.job_client()
with ui.guard("Ray"):
    any_live = any(not j.finished for j in client.jobs())


def run_names() -> dict[str, str]:
    """MLflow run name by the Ray submission id it was tagged with (the training launcher
    tags every run with `ray.submission_id`); empty when MLflow cannot be read, so the
    table falls back to the job's `lmforge.run_name` instead of failing the page."""
    try:
        return {r.submission_id: r.name for r in browse.runs(ui.tracking_uri()) if r.submission_id}
    except LmforgeError:
        return {}


def body() -> None:
    """The table and the chosen job; re-run every 3 s while any job is live."""
    with ui.guard("Ray"):
        jobs = client.jobs()
    if not jobs:
        st.info(f"No jobs on the cluster at {client.address} yet. Start one on the Launch page.")
        return
    runs = run_names()
    table = pd.DataFrame(
        [
            {
                "job": j.submission_id or j.job_id,
                "status": j.status,
                "kind": j.metadata.get("lmforge.kind", j.kind.lower()),
                "run": runs.get(j.submission_id or "") or j.metadata.get("lmforge.run_name", ""),
                "started": ui.when(j.start),
                "duration": ui.duration(j.duration_s),
                "entrypoint": j.entrypoint,
            }
            for j in jobs
        ]
    )
    st.dataframe(table, hide_index=True)
    ids = [j.submission_id or j.job_id for j in jobs]
    wanted = st.session_state.get("jobs_selected")
    sid = st.selectbox("Job", ids, index=ids.index(wanted) if wanted in ids else 0)
    st.session_state["jobs_selected"] = sid
    job = jobs[ids.index(sid)]
    st.subheader(f"{ICONS.get(job.status, '')} {job.status}")
    st.caption(
        f"started {ui.when(job.start)} · duration {ui.duration(job.duration_s)}"
        + (f" · {job.message}" if job.message else "")
    )
    if job.status == "FAILED":
        st.error(f"The job failed: {failure_line(job.message)}")
    cols = st.columns([1, 1, 3])
    if not job.finished and job.submission_id and cols[0].button("Stop job", key=f"stop_{sid}"):
        with ui.guard(f"Stopping {sid}"):
            client.stop(sid)
        st.toast(f"Asked Ray to stop {sid}")
    with ui.guard("MLflow"):
        run = browse.run_for_submission(ui.tracking_uri(), sid) if job.submission_id else None
    if run is not None:
        link = browse.run_link(ui.tracking_uri(), run)
        if link:
            cols[2].markdown(f"MLflow run: [{run.name}]({link})")
        if cols[1].button("Open its curves", key=f"curves_{sid}"):
            st.session_state["runs_selected"] = [run.run_id]
            st.switch_page("pages/runs.py")
    if job.submission_id:
        with ui.guard(f"Log of {sid}"):
            log = client.tail(sid, 200)
        st.caption("last 200 lines of the job's log" + (", live" if not job.finished else ""))
        st.code(log or "(no output yet)", language="text", height=420)
    else:
        st.caption(
            "a driver that connected to the cluster (`lmforge train`), not a submitted job: "
            "no log here. `lmforge submit` (same arguments) runs it as a job, with its log "
            "on this page."
        )


st.fragment(body, run_every=3 if any_live else None)()
