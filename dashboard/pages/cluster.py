"""Cluster: the Ray nodes, their state and resources, and which jobs' training workers run
where (Ray's state API, on the same server as the Jobs API)."""

import pandas as pd
import streamlit as st
import ui

from lmforge import cluster

st.title("Cluster")
client = ui.job_client()


@st.fragment(run_every=5)
def body() -> None:
    with ui.guard("Ray"):
        nodes = cluster.state_list(client.address, "nodes")
        actors = cluster.state_list(client.address, "actors")
        names = {j.job_id: j.submission_id or j.job_id for j in client.jobs() if j.job_id}
    if not nodes:
        st.info(f"The cluster at {client.address} has no nodes yet.")
        return
    alive = sum(n.get("state") == "ALIVE" for n in nodes)
    st.caption(f"{alive} of {len(nodes)} nodes alive · Ray at {client.address}")
    st.dataframe(pd.DataFrame(cluster.placement(nodes, actors, names)), hide_index=True)


body()
