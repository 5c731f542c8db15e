"""The Overview page: throughput, flagged rates per class (in percent, "no threshold" where a class has
none), the active model versions by their full names, the escape rate, errors and the CSV export."""

from __future__ import annotations

import datetime as dt

import streamlit as st
from inspector._dashboard import charts, common

from inspector.store import review as rv


def class_summary(rows: list[dict]) -> list[dict]:
    """Per class over the hours shown: images, flagged, and the flagged rate ("no threshold" without one)."""
    totals: dict[str, dict] = {}
    for r in rows:
        t = totals.setdefault(r["class_name"], {"images": 0, "flagged": 0, "with_threshold": 0})
        t["images"] += r["images"]
        t["flagged"] += r["flagged"] or 0
        t["with_threshold"] += r["with_threshold"]
    out = []
    for name, t in sorted(totals.items()):
        calibrated = t["with_threshold"] > 0
        out.append({"class": name, "images": t["images"],
                    "flagged": t["flagged"] if calibrated else "no threshold",
                    "flagged rate": common.pct(t["flagged"] / t["images"]) if calibrated and t["images"]
                    else "no threshold"})
    return out


def render() -> None:
    engine = common.engine()
    info = rv.overview(engine)
    rows = info["per_hour"]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Queue depth", info["queue_depth"])
    c2.metric("Scored", info["scored"])
    calibrated = [r for r in rows if r["with_threshold"]]
    scored_24h = sum(r["images"] for r in calibrated)
    c3.metric("Flagged (24 h)", common.pct(sum(r["flagged"] or 0 for r in calibrated) / scored_24h)
              if scored_24h else "no threshold", help="Of the images of classes with a threshold, last 24 h.")
    c4.metric("Failed images", sum(e["count"] for e in info["errors"]))
    st.markdown(f"**Active model:** `{info['active_model']}`" if info["active_model"] else "**Active model:** –")
    if info["fallback"]:
        st.warning(f"Day one: {info['fallback']}.")
    if info["random_weights"]:
        st.error("The active model has RANDOM or untrained weights: its scores mean nothing.")
    if rows:
        classes = sorted({r["class_name"] for r in rows})
        left, right = st.columns([3, 2], gap="large")
        with left:
            st.caption("Images per hour (last 24 h)")
            st.altair_chart(charts.per_hour(rows, classes), width="stretch")
        with right:
            st.caption("Per class, last 24 h, at the current thresholds")
            st.dataframe(class_summary(rows), hide_index=True)
        if calibrated:
            st.caption("Flagged share per class and hour (%), classes with a threshold")
            st.altair_chart(charts.flagged_rate(calibrated, classes), width="stretch")
        with st.expander("Per class and hour"):
            st.dataframe([{"hour": r["hour"], "class": r["class_name"], "images": r["images"],
                           "flagged": r["flagged"] if r["with_threshold"] else "no threshold",
                           "rate": common.pct((r["flagged"] or 0) / r["images"]) if r["with_threshold"]
                           else "no threshold"} for r in rows], hide_index=True)
    if info["active_by_class"]:
        st.caption("Active model version per class")
        st.dataframe([{"class": c, "model version": v} for c, v in info["active_by_class"].items()],
                     hide_index=True, column_config={"model version": st.column_config.TextColumn(width="large")})
    escape = rv.escape_counts(engine, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(days=7))
    if escape:
        from inspector.stats import escape_rate

        st.caption("Escape rate (last 7 days): defects found among audited passes, scaled to all passes; "
                   "95 % exact interval")
        table = []
        for row in escape:
            e = escape_rate(row["passes"], row["audited"], row["found"])
            table.append({"class": row["class_name"], "line": row["line"] or "–", "passes": e.passes,
                          "audited": e.audited, "defects found": e.escapes_found,
                          "escape rate": common.pct(e.rate, 2),
                          "95 % interval": f"{100 * e.interval[0]:.2f}–{100 * e.interval[1]:.2f} %"})
        st.dataframe(table, hide_index=True)
    if info["errors"]:
        st.subheader("Errors")
        st.dataframe(info["errors"], hide_index=True)
    if st.button("Prepare the CSV export (decisions and reviews)", key="export_prepare"):
        st.session_state["export_csv"] = rv.export_csv(engine)  # built on demand, not on every render
    if st.session_state.get("export_csv") is not None:
        st.download_button("Download the CSV export", st.session_state["export_csv"], "inspector-export.csv",
                           "text/csv", key="export")
    st.caption(f"Database: {engine.url.render_as_string(hide_password=True)}")


if __name__ == "__main__":
    render()
