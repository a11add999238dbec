"""lmforge dashboard: launch training jobs, watch them, compare runs, try the models.

    lmforge dashboard                       # http://127.0.0.1:8501
    lmforge dashboard --port 8600 --ray-address http://127.0.0.1:8265 \
        --tracking-uri http://127.0.0.1:5000

`lmforge dashboard` runs `streamlit run dashboard/app.py` bound to 127.0.0.1 with the Ray
Jobs API address and the MLflow tracking URI in its environment. This file only declares
the navigation; each page lives in `pages/` and calls `lmforge`.
"""

import streamlit as st
import ui

st.set_page_config(page_title="lmforge", page_icon=":material/model_training:", layout="wide")

page = st.navigation(
    [
        st.Page("pages/launch.py", title="Launch", icon=":material/rocket_launch:", default=True),
        st.Page("pages/jobs.py", title="Jobs", icon=":material/list_alt:"),
        st.Page("pages/runs.py", title="Runs", icon=":material/monitoring:"),
        st.Page("pages/models.py", title="Models", icon=":material/inventory_2:"),
        st.Page("pages/sweeps.py", title="Sweeps", icon=":material/tune:"),
        st.Page("pages/playground.py", title="Playground", icon=":material/edit_note:"),
        st.Page("pages/cluster.py", title="Cluster", icon=":material/hub:"),
    ]
)
ui.sidebar()
page.run()
