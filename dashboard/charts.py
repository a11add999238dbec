"""Plotly figures of training curves: one panel per metric, one colour per run."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

TITLES = {
    "loss": "train loss",
    "val_loss": "val loss",
    "lr": "learning rate",
    "tokens_per_s": "tokens / s",
    "grad_norm": "grad norm",
    "mfu": "MFU",
}


def curves(
    histories: dict[str, dict[str, list[tuple[int, float]]]],
    keys: list[str],
    events: dict[str, list[tuple[int, str]]] | None = None,
) -> go.Figure:
    """`histories[run label][metric] = [(step, value), ...]` as a grid of panels sharing x;
    `events[run label] = [(step, text)]` (the guard's rollbacks) as a banner line on every
    panel."""
    keys = [k for k in keys if any(k in h for h in histories.values())] or keys[:1]
    cols = 2 if len(keys) > 1 else 1
    rows = math.ceil(len(keys) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[TITLES.get(k, k) for k in keys],
        shared_xaxes=True,
        vertical_spacing=0.12 if rows > 1 else 0.08,
    )
    palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    ]  # fmt: skip
    for i, (label, hist) in enumerate(histories.items()):
        color = palette[i % len(palette)]
        for j, key in enumerate(keys):
            points = hist.get(key, [])
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    name=label,
                    legendgroup=label,
                    showlegend=j == 0 or key == keys[0],
                    mode="lines+markers" if len(points) < 30 else "lines",
                    line={"color": color},
                    hovertemplate=f"{label}<br>step %{{x}}<br>{key} %{{y:.4g}}<extra></extra>",
                ),
                row=j // cols + 1,
                col=j % cols + 1,
            )
    for j in range(len(keys)):
        fig.update_xaxes(title_text="step", row=j // cols + 1, col=j % cols + 1)
    for label, marks in (events or {}).items():
        for step, text in marks:
            fig.add_vline(
                x=step, line={"color": "#d62728", "dash": "dash", "width": 1},
                annotation_text=f"{label}: {text}", annotation_position="top left",
                annotation_font_size=10,
            )  # fmt: skip
    fig.update_layout(height=320 * rows, margin={"t": 40, "b": 40}, hovermode="x unified")
    return fig
