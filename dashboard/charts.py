"""The dashboard's charts (Altair, drawn by Vega-Lite in the page): the score histogram with the threshold,
ROC and precision-recall curves with the threshold's point, images per hour by class.

Numbers come ready-made from ``inspector.metrics`` and the store; these functions only draw them.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

#: Tableau's 10 and 20 colour palettes (distinct, colour-blind aware), then evenly spread hues.
TABLEAU10 = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
             "#bab0ac"]
TABLEAU20 = ["#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d", "#f1ce63", "#499894",
             "#86bcb6", "#e15759", "#ff9d9a", "#79706e", "#bab0ac", "#d37295", "#fabfd2", "#b07aa1", "#d4a6c8",
             "#9d7660", "#d7b5a6"]
GROUP_COLOURS = {"not reviewed": "#bab0ac", "normal": "#4e79a7", "defect": "#e15759"}
THRESHOLD_COLOUR = "#d62728"
#: Hours are "YYYY-MM-DD HH:00": the axis shows "HH:00" (the full hour is in the tooltip).
HOUR_AXIS = alt.Axis(labelAngle=0, labelExpr="slice(datum.value, 11)")


def palette(n: int) -> list[str]:
    """``n`` distinct colours: Tableau 10 or 20, beyond that hues spread by the golden angle at two lightness
    levels (neighbours in the list never look alike)."""
    if n <= len(TABLEAU10):
        return TABLEAU10[:n]
    if n <= len(TABLEAU20):
        return TABLEAU20[:n]
    out = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.42 if i % 2 == 0 else 0.62
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.65)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def score_range(scores: np.ndarray, include: Sequence[float] = (), low_q: float = 0.005,
                high_q: float = 0.995) -> tuple[float, float]:
    """The span a class's scores occupy: their ``low_q`` and ``high_q`` quantiles, widened to ``include``
    (the threshold in force, the one being edited) and by 5 % on each side, within [0, 1]."""
    values = [float(v) for v in include if v is not None]
    if scores.size:
        lo, hi = (float(q) for q in np.quantile(scores, [low_q, high_q]))
        lo, hi = min([lo, *values]), max([hi, *values])
    elif values:
        lo, hi = min(values), max(values)
    else:
        lo, hi = 0.0, 1.0
    pad = max((hi - lo) * 0.05, 1e-3)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def step_for(lo: float, hi: float) -> tuple[float, int]:
    """(a round slider step giving about 500-5000 positions over [lo, hi], its number of decimals)."""
    span = max(hi - lo, 1e-6)
    exponent = int(np.floor(np.log10(span / 500)))
    return 10.0 ** exponent, max(3, -exponent)


def slider_span(scores: np.ndarray, include: Sequence[float] = ()) -> tuple[float, float, float, int]:
    """(low, high, step, decimals) of a threshold slider over ``score_range``: the ends on the step's grid, so
    every position the slider's keys reach is a round number (what is shown is what is saved)."""
    lo, hi = score_range(scores, include)
    step, decimals = step_for(lo, hi)
    return (round(np.floor(lo / step + 1e-9) * step, decimals), round(np.ceil(hi / step - 1e-9) * step, decimals),
            step, decimals)


def histogram(every: np.ndarray, scores: np.ndarray, labels: np.ndarray, lo: float, hi: float,
              threshold: float, bins: int = 40) -> alt.LayerChart:
    """Stacked counts of the class's scores in ``bins`` bins over [lo, hi] (scores outside fall into the edge
    bins): reviewed normal, reviewed defect, not reviewed; a rule at ``threshold``."""
    edges = np.linspace(lo, hi, bins + 1)

    def count(values: np.ndarray) -> np.ndarray:
        return np.histogram(np.clip(values, lo, hi), edges)[0]

    normal, defect = count(scores[labels == 0]), count(scores[labels == 1])
    rest = np.maximum(count(every) - normal - defect, 0)
    frame = pd.DataFrame([{"from": edges[i], "to": edges[i + 1], "group": group, "images": int(n[i])}
                          for group, n in (("not reviewed", rest), ("normal", normal), ("defect", defect))
                          for i in range(bins)])
    x = alt.X("from:Q", title="image score", scale=alt.Scale(domain=[lo, hi], nice=False))
    bars = alt.Chart(frame).mark_bar(binSpacing=0).encode(
        x=x, x2="to:Q", y=alt.Y("sum(images):Q", title="images", stack="zero"),
        color=alt.Color("group:N", scale=alt.Scale(domain=list(GROUP_COLOURS), range=list(GROUP_COLOURS.values())),
                        legend=alt.Legend(orient="top", title=None)),
        tooltip=[alt.Tooltip("from:Q", format=".4f"), alt.Tooltip("to:Q", format=".4f"), "group:N", "images:Q"])
    rule = alt.Chart(pd.DataFrame({"threshold": [threshold]})).mark_rule(color=THRESHOLD_COLOUR, strokeWidth=2).encode(
        x="threshold:Q", tooltip=[alt.Tooltip("threshold:Q", format=".4f")])
    return (bars + rule).properties(height=220)


def curve(x: np.ndarray, y: np.ndarray, point: tuple[float, float] | None, x_title: str, y_title: str,
          title: str) -> alt.LayerChart:
    """A step-free polyline through (x, y) in [0, 1]², with the threshold's point marked."""
    line = alt.Chart(pd.DataFrame({"x": x, "y": y})).mark_line(interpolate="linear").encode(
        x=alt.X("x:Q", title=x_title, scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("y:Q", title=y_title, scale=alt.Scale(domain=[0, 1])))
    layers = [line]
    if point is not None:
        layers.append(alt.Chart(pd.DataFrame({"x": [point[0]], "y": [point[1]]})).mark_point(
            color=THRESHOLD_COLOUR, size=120, filled=True).encode(
            x="x:Q", y="y:Q", tooltip=[alt.Tooltip("x:Q", title=x_title, format=".3f"),
                                       alt.Tooltip("y:Q", title=y_title, format=".3f")]))
    return alt.layer(*layers).properties(title=title, height=240)


def _legend(classes: Sequence[str]) -> tuple[alt.Legend, int]:
    """A legend right of the chart that lists every class with its whole name (one column, two beyond 12
    classes), and the chart height that holds it (Streamlit fits the whole chart into its height)."""
    columns = 1 if len(classes) <= 12 else 2
    rows = -(-len(classes) // columns)
    return alt.Legend(orient="right", columns=columns, labelLimit=0, symbolLimit=0, title=None), max(220, 19 * rows)


def per_hour(rows: Sequence[dict], classes: Sequence[str]) -> alt.Chart:
    """Images per hour stacked by class, one distinct colour per class, the whole legend beside the chart."""
    frame = pd.DataFrame([{"hour": r["hour"], "class": r["class_name"], "images": r["images"]} for r in rows])
    legend, height = _legend(classes)
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("hour:O", title="hour (UTC)", axis=HOUR_AXIS),
        y=alt.Y("sum(images):Q", title="images"),
        color=alt.Color("class:N", scale=alt.Scale(domain=list(classes), range=palette(len(classes))),
                        legend=legend),
        tooltip=["hour:O", "class:N", "images:Q"]).properties(height=height)


def flagged_rate(rows: Sequence[dict], classes: Sequence[str]) -> alt.Chart:
    """The flagged share per class and hour, in percent (classes with a threshold only)."""
    frame = pd.DataFrame([{"hour": r["hour"], "class": r["class_name"],
                           "flagged %": 100.0 * (r["flagged"] or 0) / r["images"]} for r in rows])
    legend, height = _legend(classes)
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("hour:O", title="hour (UTC)", axis=HOUR_AXIS),
        y=alt.Y("flagged %:Q", title="flagged (%)"),
        color=alt.Color("class:N", scale=alt.Scale(domain=list(classes), range=palette(len(classes))),
                        legend=legend),
        tooltip=["hour:O", "class:N", alt.Tooltip("flagged %:Q", format=".1f")]).properties(height=height)
