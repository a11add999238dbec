"""What every page shares: where Ray and MLflow are, cached clients, and error display.

Pages are thin: they lay out widgets and call `lmforge` (job client, job specs, tracking
browse, playground). Anything that can fail because Ray or MLflow is down, a job failed or
an input is wrong goes through `guard`, which shows one line with `st.error` and stops the
page, never a traceback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os

import streamlit as st

from lmforge.errors import LmforgeError, first_line
from lmforge.jobclient import JobClient
from lmforge.tracking import store

try:  # MLflow's own errors reach pages through registry/playground calls
    from mlflow.exceptions import MlflowException
except ImportError:  # pragma: no cover - mlflow is a dependency
    MlflowException = LmforgeError

# Errors a person can act on (lmforge's own, files, MLflow's): one line on the page.
SHOWN = (LmforgeError, MlflowException, OSError)


@contextlib.contextmanager
def guard(what: str):
    """Run a block; on a known failure show `what: <one line>` and stop the page. Anything
    else is a bug: one line too, with its traceback folded underneath for the report."""
    try:
        yield
    except SHOWN as err:
        st.error(f"{what}: {first_line(err)}")
        st.stop()
    except Exception as err:
        st.error(f"{what}: an internal error ({type(err).__name__}: {first_line(err)})")
        with st.expander("traceback (please report it)"):
            st.exception(err)
        st.stop()


def tracking_uri() -> str:
    """The MLflow the dashboard reads (MLFLOW_TRACKING_URI from `lmforge dashboard`)."""
    return store.resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)


@st.cache_resource(show_spinner=False)
def _job_client(address: str | None) -> JobClient:
    return JobClient(address)


def job_client() -> JobClient:
    """The Ray Jobs API client (cached; a failed connection is retried on the next run)."""
    with guard("Ray"):
        return _job_client(os.environ.get("RAY_JOBS_ADDRESS") or None)


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def sidebar() -> None:
    """Where the dashboard points, shown on every page."""
    with st.sidebar:
        st.caption(f"MLflow: `{tracking_uri()}`")
        st.caption(f"Ray Jobs API: `{os.environ.get('RAY_JOBS_ADDRESS') or 'auto'}`")


@st.cache_data(ttl=600, show_spinner="Reading the version's config ...")
def _version_config(uri: str, tracking: str) -> dict:
    from lmforge.checkpoint import read_config
    from lmforge.tracking.registry import fetch_checkpoint

    return read_config(fetch_checkpoint(uri, tracking)).to_dict()


def version_config(uri: str) -> dict:
    """The resolved config a registered version was trained with."""
    return _version_config(uri, tracking_uri())
