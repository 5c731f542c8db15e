"""The Thresholds page: one (class, model version) at a time, its scores, the threshold's effect on the
reviewed images, calibration with honest intervals, versioned save and rollback, and version comparison.

The slider and the histogram span the class's own scores (their 0.5 and 99.5 % quantiles, with the
threshold in force), so a class whose scores lie within 0.514-0.535 gets a usable slider; the exact value
can also be typed. Saving and rolling back run before the page redraws, so the header shows the new
threshold at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st
from inspector._dashboard import charts, common

from inspector.store import review as rv


def curves(scores: np.ndarray, labels: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """ROC (fpr, tpr from (0, 0)) and precision-recall (recall, precision) through every distinct threshold,
    from ``inspector.metrics``' curve vertices."""
    from inspector.metrics import _curve

    tps, fps = _curve(labels, scores)
    roc = {"fpr": np.r_[0, fps / max(fps[-1], 1)], "tpr": np.r_[0, tps / max(tps[-1], 1)]}
    pr = {"recall": tps / max(tps[-1], 1), "precision": tps / np.maximum(tps + fps, 1)}
    return roc, pr


# -------------------------------------------------------------------------------------------------
# callbacks (they run before the page redraws)


def _set_value(value: float) -> None:
    value = float(min(1.0, max(0.0, value)))
    st.session_state["t_value"] = value
    st.session_state["t_typed"] = value


def on_slider() -> None:
    st.session_state["t_typed"] = st.session_state["t_value"]


def on_typed() -> None:
    typed = st.session_state.get("t_typed")
    if typed is not None:
        _set_value(typed)


def on_recall(scores: np.ndarray, labels: np.ndarray) -> None:
    found = rv.threshold_for_recall(scores, labels, st.session_state["t_recall"])
    if found is None:
        st.session_state["t_message"] = ("warning", "No reviewed defects yet.")
    else:
        _set_value(found)


def on_save(class_name: str, version_id: int, version_name: str) -> None:
    ss = st.session_state
    value = float(ss["t_value"])
    try:
        number = rv.save_threshold(common.engine(), class_name, value, common.reviewer(), ss.get("t_note"),
                                   model_version_id=version_id, review_band=float(ss.get("t_band") or 0.0))
    except rv.ReviewError as exc:
        ss["t_message"] = ("error", str(exc))
        return
    ss["t_message"] = ("success", f"Saved {class_name} threshold {value:.6g} as v{number} for {version_name}: "
                                  + "every decision of this version now uses it.")


def on_rollback(class_name: str, version_id: int) -> None:
    ss = st.session_state
    version = int(ss["t_rollback_version"])
    try:
        number = rv.rollback_threshold(common.engine(), class_name, version, common.reviewer(),
                                       model_version_id=version_id)
    except rv.ReviewError as exc:
        ss["t_message"] = ("error", str(exc))
        return
    ss["t_message"] = ("success", f"v{number} restores the value of v{version}.")


# -------------------------------------------------------------------------------------------------


def header(class_name: str, chosen: dict[str, Any], current: dict[str, Any] | None, scores: np.ndarray,
           labels: np.ndarray, every: np.ndarray) -> None:
    from inspector.metrics import auroc, average_precision

    both = 0 < labels.sum() < labels.size
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Threshold in force", f"{current['value']:.6g}" if current else "not set",
              help=None if current is None else f"v{current['version']} ({current.get('kind') or 'reviewed'}) by "
                                                f"{current['created_by']}, {current['created_at']:%Y-%m-%d %H:%M} UTC")
    m2.metric("Image AUROC", f"{auroc(labels, scores):.3f}" if both else "–",
              help="On the reviewed images of this version (needs both normal and defect verdicts).")
    m3.metric("Image AP", f"{average_precision(labels, scores):.3f}" if both else "–",
              help="Average precision on the reviewed images.")
    m4.metric("Reviewed", f"{scores.size} of {every.size}", help=f"{int(labels.sum())} defects among them.")
    if current is None:
        st.caption(f"**Not calibrated for {chosen['name']}**: every image of this version waits for a threshold.")
    else:
        st.caption(f"In force: **v{current['version']}** = {current['value']:.6g} "
                   f"({current.get('kind') or 'reviewed'}) by {current['created_by']}")


def editor(class_name: str, chosen: dict[str, Any], current: dict[str, Any] | None, scores: np.ndarray,
           labels: np.ndarray, every: np.ndarray, reviewer: str) -> float:
    ss = st.session_state
    key = (class_name, chosen["id"])
    if ss.get("t_for") != key or "t_value" not in ss:
        start = float(current["value"]) if current else (float(np.median(every)) if every.size else 0.5)
        if current is None:  # a proposal, not a saved value: on the slider's grid, so its keys step evenly
            start = round(start, charts.slider_span(every, include=[start])[3])
        _set_value(start)
        ss["t_for"] = key
    lo, hi, step, decimals = charts.slider_span(every, include=[ss["t_value"], current["value"] if current else None])
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.slider("Threshold", lo, hi, step=step, key="t_value", format=f"%.{decimals}f", on_change=on_slider,
                  help=f"Spans this class's scores ({lo:.{decimals}f} to {hi:.{decimals}f}); type a value beside "
                       "it for any other.")
        c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
        c1.number_input("Threshold value", 0.0, 1.0, step=step, format=f"%.{decimals}f", key="t_typed",
                        on_change=on_typed)
        c2.number_input("Reach recall", 0.0, 1.0, 0.95, 0.01, key="t_recall")
        c3.button("Set", key="t_reach", on_click=on_recall, args=(scores, labels),
                  help="The highest threshold whose recall on the reviewed defects reaches the target.")
        c1, c2 = st.columns(2)
        c1.text_input("Note for this version", key="t_note")
        if "t_band" not in ss or ss.get("t_band_for") != key:
            ss["t_band"] = float(current["review_band"]) if current else 0.0
            ss["t_band_for"] = key
        c2.number_input("Review band (±)", 0.0, 0.49, step=0.001, format="%.3f", key="t_band",
                        help="Scores this close to the threshold are decided 'review' when stored.")
        st.button("Save threshold", key="t_save", disabled=not reviewer, type="primary", on_click=on_save,
                  args=(class_name, chosen["id"], chosen["name"]))
        if not reviewer:
            st.warning("Enter your name above to change thresholds.")
    value = float(ss["t_value"])
    effect = rv.threshold_effect(scores, labels, every, value)
    with right:
        m1, m2 = st.columns(2)
        m1.metric("Precision", common.pct(effect["precision"]))
        m2.metric("Recall", common.pct(effect["recall"]))
        m1.metric("False-positive rate", common.pct(effect["fpr"]))
        m2.metric("Flagged share", common.pct(effect["flagged_share"]), help="Of all scored images of this version.")
    return value


def plots(every: np.ndarray, scores: np.ndarray, labels: np.ndarray, value: float) -> None:
    from inspector.metrics import auroc, average_precision

    if every.size:
        lo, hi = charts.score_range(every, include=[value])
        st.altair_chart(charts.histogram(every, scores, labels, lo, hi, value), width="stretch")
    if not 0 < labels.sum() < labels.size:
        st.caption("ROC and precision-recall curves need reviewed normal and defect images.")
        return
    roc, pr = curves(scores, labels)
    effect = rv.threshold_effect(scores, labels, scores, value)
    c1, c2 = st.columns(2)
    c1.altair_chart(charts.curve(roc["fpr"], roc["tpr"], (effect["fpr"], effect["recall"]), "false positive rate",
                                 "true positive rate", f"ROC · AUROC {auroc(labels, scores):.3f} · ● threshold {value:.4g}"),
                  width="stretch")
    point = None if effect["precision"] is None else (effect["recall"], effect["precision"])
    c2.altair_chart(charts.curve(pr["recall"], pr["precision"], point, "recall", "precision",
                                 f"Precision-recall · AP {average_precision(labels, scores):.3f} · ● threshold "
                                 f"{value:.4g}"), width="stretch")


def history_section(class_name: str, version_id: int, current: dict[str, Any] | None, reviewer: str) -> None:
    history = rv.threshold_history(common.engine(), class_name, version_id)
    if not history:
        return
    st.subheader("History")
    in_force = current["version"] if current else None
    st.dataframe([{"version": h["version"], "value": h["value"], "kind": h.get("kind"), "by": h["created_by"],
                   "at (UTC)": h["created_at"], "band": h.get("review_band"), "note": h["note"] or "",
                   "in force": "✓" if h["version"] == in_force else ""} for h in history], hide_index=True)
    earlier = {h["version"]: h for h in history if h["version"] != in_force}
    if not earlier:
        st.caption("Only the version in force exists: nothing to roll back to.")
        return
    c1, c2 = st.columns([2, 1], vertical_alignment="bottom")
    c1.selectbox("Roll back to", list(earlier), key="t_rollback_version",
                 format_func=lambda v: f"v{v} · {earlier[v]['value']:.6g} by {earlier[v]['created_by']}")
    c2.button("Roll back", key="t_rollback", disabled=not reviewer, on_click=on_rollback,
              args=(class_name, version_id))


def calibration_section(scores: np.ndarray, labels: np.ndarray) -> None:
    """Targets with honest uncertainty: exact (Clopper-Pearson) 95 % intervals on the reviewed images."""
    from inspector import stats

    st.subheader("Calibrate with 95 % confidence")
    c1, c2 = st.columns(2)
    recall = c1.number_input("Recall at least (lower bound)", 0.5, 0.999, 0.9, 0.01, key="t_conf_recall")
    alarms = c2.number_input("False alarms at most (upper bound)", 0.001, 0.5, 0.05, 0.005, key="t_conf_fa")
    fmt = (lambda iv: f"{100 * iv[0]:.1f}–{100 * iv[1]:.1f} %")
    for label, proposal in ((f"recall ≥ {100 * recall:.1f} %", stats.propose_for_recall(scores, labels, recall)),
                            (f"false alarms ≤ {100 * alarms:.1f} %",
                             stats.propose_for_false_alarms(scores, labels, alarms))):
        if proposal.threshold is None:
            st.write(f"**{label}**: no threshold reaches it on the reviewed images yet"
                     + (f"; review at least {proposal.more_defects_needed} more defects"
                        if proposal.more_defects_needed else "") + ".")
            continue
        st.write(f"**{label}** → threshold **{proposal.threshold:.4f}**: recall {fmt(proposal.recall_interval)}, "
                 f"false alarms {fmt(proposal.false_alarm_interval)} (95 % exact intervals)"
                 + (f"; the target is not shown yet: {proposal.more_defects_needed} more reviewed defects needed"
                    if proposal.more_defects_needed else ""))


def compare_section(class_name: str, versions: list[dict]) -> None:
    """The active version against each other version of the class on the reviewed images (a shadow
    candidate before promotion)."""
    active = next((v for v in versions if v["active"]), None)
    others = [v for v in versions if not v["active"]]
    if active is None or not others:
        return
    st.subheader("Compare versions (reviewed images)")
    other = {v["name"]: v for v in others}[st.selectbox("Candidate", [v["name"] for v in others], key="t_cand")]
    report = rv.compare_versions(common.engine(), class_name, active["id"], other["id"])
    fmt = (lambda v: "–" if v is None else f"{v:.3f}")
    st.dataframe([{"version": name, "image AUROC": fmt(e["image_auroc"]), "image AP": fmt(e["image_ap"]),
                   "threshold": fmt(e["threshold"]), "precision": fmt(e.get("precision")),
                   "recall": fmt(e.get("recall"))}
                  for name, e in ((active["name"], report["versions"][active["id"]]),
                                  (other["name"], report["versions"][other["id"]]))], hide_index=True)
    st.caption(f"{report['reviewed_images']} images scored by both and reviewed ({report['defects']} defects).")
    if report["disagreements"] is None:
        st.info("Save a threshold for both versions to list the images where their decisions differ.")
    elif report["disagreements"]:
        st.write(f"{len(report['disagreements'])} images where the decisions differ (open one with "
                 "`?image=ID` on the Review page)")
        st.dataframe(report["disagreements"], hide_index=True)


def render() -> None:
    engine = common.engine()
    reviewer = common.reviewer()
    ss = st.session_state
    classes = rv.classes(engine)
    if not classes:
        st.info("No scored images yet.")
        return
    bar = common.toolbar()
    class_name = bar.selectbox("Class", classes, key="t_class", label_visibility="collapsed", width=220)
    versions = rv.class_versions(engine, class_name)
    if not versions:
        st.info("No results for this class yet.")
        return
    labels_of = {v["name"] + (" (active)" if v["active"] else ""): v for v in versions}
    chosen = labels_of[bar.selectbox("Model version", list(labels_of), key="t_version", label_visibility="collapsed",
                                     width=360, help="A threshold belongs to one model version of a class.")]
    version_id = chosen["id"]
    current = rv.current_threshold(engine, class_name, version_id)
    scores, labels = rv.reviewed_scores(engine, class_name, version_id)
    every = rv.class_scores(engine, class_name, model_version_id=version_id)
    message = ss.pop("t_message", None)
    if message:
        getattr(st, message[0])(message[1])
    header(class_name, chosen, current, scores, labels, every)
    if current is None:
        other = rv.latest_other_threshold(engine, class_name, version_id)
        if other is not None:
            share = float((every >= other["value"]).mean()) if every.size else 0.0
            st.warning(f"Not calibrated for {chosen['name']}: the threshold {other['value']:.4f} saved for "
                       f"{other['model_version'] or 'an earlier version'} would flag {100 * share:.1f} % of this "
                       "version's images. Save a threshold for this version.")
    elif current.get("kind") == "provisional":
        st.info(f"The threshold in force is **provisional** ({current['note']}): no reviewer has calibrated it.")
    value = editor(class_name, chosen, current, scores, labels, every, reviewer)
    plots(every, scores, labels, value)
    history_section(class_name, version_id, current, reviewer)
    calibration_section(scores, labels)
    compare_section(class_name, versions)


if __name__ == "__main__":
    render()
