"""inspector's review and threshold dashboard (Streamlit). Start it with `inspector dashboard`.

Every read and write goes through ``inspector.store``: this file holds no data of its own. Pages:
Review (queue, heatmap overlay, accept / reject / skip with keys a / d / s (r is Streamlit's own rerun key)), Thresholds (per-class
histogram, ROC and PR from reviewed images, live effect of a slider, versioned save and rollback) and
Overview (throughput, flagged rate, queue, errors, CSV export).
"""

from __future__ import annotations

import datetime as dt
import hmac
import os

import numpy as np
import streamlit as st
from PIL import Image, ImageFilter

from inspector.config import load_settings
from inspector.store import decode_map, open_store
from inspector.store import review as rv

st.set_page_config(page_title="inspector", layout="wide")


@st.cache_resource
def _engine(url: str):
    return open_store(url, auto_upgrade=True)


settings = load_settings()
engine = _engine(settings.database.url)


#: Pause after the n-th wrong password of a session: 0.25 s, doubling, at most 2 s.
WRONG_PASSWORD_DELAYS = (0.25, 0.5, 1.0, 2.0)
#: Characters that render as nothing although unicodedata files them as letters or symbols: braille blank,
#: Hangul fillers.
INVISIBLE_LETTERS = frozenset("\u2800\u115f\u1160\u3164\uffa0")


def password_matches(entered: str, password: str) -> bool:
    """Constant-time comparison of the UTF-8 bytes (NFC), so non-ASCII passwords and attempts work."""
    import unicodedata

    def encode(text: str) -> bytes:
        return unicodedata.normalize("NFC", text).encode("utf-8")

    return hmac.compare_digest(encode(entered), encode(password))


def gate() -> bool:
    """The optional shared password (config or INSPECTOR_DASHBOARD__PASSWORD); each new wrong attempt of a
    session waits longer (``WRONG_PASSWORD_DELAYS``) before the page answers."""
    import hashlib
    import time

    password = settings.dashboard.password
    if not password or st.session_state.get("authenticated"):
        return True
    entered = st.text_input("Password", type="password", key="password")
    if entered and password_matches(entered, password):
        st.session_state["authenticated"] = True
        st.session_state.pop("wrong_attempts", None)
        st.rerun()
    if entered:
        attempt = hashlib.sha256(entered.encode("utf-8", "surrogatepass")).hexdigest()
        if st.session_state.get("last_wrong_attempt") != attempt:  # a rerun with the same text is no new try
            wrong = st.session_state.get("wrong_attempts", 0) + 1
            st.session_state["wrong_attempts"] = wrong
            st.session_state["last_wrong_attempt"] = attempt
            time.sleep(WRONG_PASSWORD_DELAYS[min(wrong, len(WRONG_PASSWORD_DELAYS)) - 1])
        st.error("Wrong password.")
    return False


def visible_name(raw: str) -> str:
    """A reviewer name with surrounding blanks removed, or "" when nothing visible is left (zero-width and
    other format characters, spaces of every kind, controls, combining marks alone, braille blank...)."""
    import unicodedata

    def invisible(ch: str) -> bool:
        return ch in INVISIBLE_LETTERS or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl",
                                                                        "Zp", "Mn", "Me")

    name = unicodedata.normalize("NFC", raw)
    start, end = 0, len(name)
    while start < end and invisible(name[start]):
        start += 1
    while end > start and invisible(name[end - 1]):
        end -= 1
    name = name[start:end]
    return name if any(not invisible(ch) for ch in name) else ""


def reviewer_input() -> str:
    """The sidebar's reviewer name, refused (with a warning) when it shows nothing."""
    raw = st.sidebar.text_input("Your name (required to review)", key="reviewer")
    name = visible_name(raw)
    if raw and not name:
        st.sidebar.warning("This name has no visible characters; enter your name to review.")
    return name


def heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-green-yellow-red ramp."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 200, 100], [255, 220, 0], [220, 20, 20]], dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(x).astype(int).clip(0, len(stops) - 2)
    frac = (x - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def overlay(data: bytes, map_png: bytes, opacity: float, threshold: float | None, width: int = 560,
            name: str = "image") -> Image.Image:
    """The image (its file's bytes) with its anomaly map as a heatmap and, at the current threshold, the
    mask's contour."""
    import io

    from inspector.imaging import open_image

    image = open_image(io.BytesIO(data), name=name)
    height = max(1, round(image.height * width / image.width))
    image = image.resize((width, height), Image.BILINEAR)
    values = np.asarray(Image.fromarray((decode_map(map_png) * 255).astype(np.uint8)).resize(
        (width, height), Image.BILINEAR), dtype=np.float64) / 255.0
    blended = Image.blend(image, Image.fromarray(heat(values)), opacity)
    if threshold is not None:
        mask = Image.fromarray(((values >= threshold) * 255).astype(np.uint8))
        edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), dtype=np.int16) - np.asarray(
            mask.filter(ImageFilter.MinFilter(3)), dtype=np.int16)
        array = np.array(blended)
        array[edge > 0] = (255, 255, 255)
        blended = Image.fromarray(array)
    return blended


# -------------------------------------------------------------------------------------------------
# pages


def review_page(reviewer: str) -> None:
    st.header("Review")
    classes = rv.classes(engine)
    sources = {f"{s['path']} ({s['class_name']})": s["id"] for s in rv.source_list(engine)}
    c1, c2, c3, c4 = st.columns(4)
    class_name = c1.selectbox("Class", ["all", *classes], key="f_class")
    decision = c2.selectbox("Decision", ["all", "defect", "normal"], key="f_decision")
    state = c3.selectbox("Review state", ["unreviewed", "reviewed", "all", "audit sample"], key="f_reviewed",
                         help="audit sample: the random share of passed images drawn to measure the escape "
                              "rate (review them all: they are not chosen by score)")
    order = c4.radio("Order", ["score", "closeness"], horizontal=True, key="f_order",
                     help="score: highest first; closeness: nearest to the class threshold first (the unsure ones)")
    c5, c6, c7, c8 = st.columns(4)
    source = c5.selectbox("Source", ["all", *sources], key="f_source")
    versions = {"active (per class)": None}
    if class_name != "all":
        versions.update({f"{v['name']}" + (" (active)" if v["active"] else ""): v["id"]
                         for v in rv.class_versions(engine, class_name)})
    version_label = c8.selectbox("Model version", list(versions), key="f_version",
                                 help="Whose results to review: each class's active version, or another one "
                                      "(a shadow candidate, an earlier version).")
    low, high = c6.slider("Score range", 0.0, 1.0, (0.0, 1.0), 0.01, key="f_scores")
    dates = c7.date_input("Scored between", value=(), key="f_dates", help="Pick a start and an end day (UTC).")
    rows = rv.review_queue(
        engine, class_name=None if class_name == "all" else class_name,
        source_id=None if source == "all" else sources[source],
        since=dt.datetime.combine(dates[0], dt.time()) if len(dates) == 2 else None,
        until=dt.datetime.combine(dates[1], dt.time()) + dt.timedelta(days=1) if len(dates) == 2 else None,
        score_min=low, score_max=high, decision=None if decision == "all" else decision,
        reviewed={"unreviewed": False, "reviewed": True, "all": None, "audit sample": False}[state], order=order,
        audit=True if state == "audit sample" else None,
        limit=settings.dashboard.page_size, offset=st.session_state.get("offset", 0),
        model_version_id=versions.get(version_label))
    if not rows:
        st.info("Nothing to review with these filters.")
        if st.session_state.get("offset") and st.button("Back to the first page"):
            st.session_state["offset"] = 0
            st.rerun()
        return
    position = min(st.session_state.get("position", 0), len(rows) - 1)
    row = rows[position]
    st.caption(f"{position + 1} of {len(rows)} on this page · image #{row['id']}")
    left, right = st.columns([3, 2])
    with left:
        opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
        try:  # the file actually opened is checked (regular, under a watched folder, still the scored one)
            data = rv.read_allowed_image(engine, row["path"])
            st.image(overlay(data, rv.anomaly_map(engine, row["id"], row["result_id"]), opacity, row["threshold"],
                             name=row["path"]), caption=os.path.basename(row["path"]))
        except rv.ImageNotAllowed as exc:
            st.error(f"Not shown: {exc}")
        except FileNotFoundError:
            st.warning(f"The file is gone: {row['path']}")
        except (OSError, ValueError) as exc:  # replaced by a non-image, unreadable: review it from the score
            st.warning(f"The image cannot be shown ({exc}); its score and verdict buttons still work.")
    with right:
        st.metric("Image score", f"{row['image_score']:.4f}")
        threshold = row["threshold"]
        st.write(f"Class **{row['class_name']}** · model version `{row['model_version']}` · threshold "
                 + (f"{threshold:.3f} (v{row['threshold_version']}) → **{row['decision']}**" if threshold is not None
                    else "not calibrated for this version"))
        if row["stored_decision"]:
            st.write(f"Decided when stored: **{row['stored_decision']}**"
                     + (" · in the audit sample (a random pass: review it)" if row["audit"] else ""))
        reason = st.text_input("Reason (optional)", key=f"reason_{row['id']}")
        b1, b2, b3 = st.columns(3)
        verdict = None
        if b1.button("Accept as normal (a)", shortcut="a", key="accept", disabled=not reviewer, type="secondary"):
            verdict = "normal"
        if b2.button("Reject as defect (d)", shortcut="d", key="reject", disabled=not reviewer, type="primary"):
            verdict = "defect"
        if b3.button("Skip (s)", shortcut="s", key="skip", disabled=not reviewer):
            verdict = "skip"
        if not reviewer:
            st.warning("Enter your name in the sidebar to review.")
        if verdict:
            rv.record_review(engine, row["id"], verdict, reviewer, reason, result_id=row["result_id"])
            st.session_state["last_review"] = f"#{row['id']}: {verdict} by {reviewer}"
            if state == "all" or state == "reviewed":
                st.session_state["position"] = position + 1  # the list does not shrink: move on
            st.rerun()
        if st.session_state.get("last_review"):
            st.success(f"Saved {st.session_state['last_review']}")
        history = rv.review_history(engine, row["id"])
        if history:
            st.write("History")
            st.dataframe([{k: h[k] for k in ("created_at", "reviewer", "verdict", "reason")} for h in history],
                         hide_index=True)
    p1, p2 = st.columns(2)
    if p1.button("Previous page", disabled=not st.session_state.get("offset")):
        st.session_state["offset"] = max(0, st.session_state.get("offset", 0) - settings.dashboard.page_size)
        st.rerun()
    if p2.button("Next page", disabled=len(rows) < settings.dashboard.page_size):
        st.session_state["offset"] = st.session_state.get("offset", 0) + settings.dashboard.page_size
        st.rerun()


def _curves(scores: np.ndarray, labels: np.ndarray):
    from inspector.metrics import _curve

    tps, fps = _curve(labels, scores)
    roc = {"false positive rate": np.r_[0, fps / max(fps[-1], 1)], "true positive rate": np.r_[0, tps / max(tps[-1], 1)]}
    pr = {"recall": tps / max(tps[-1], 1), "precision": tps / np.maximum(tps + fps, 1)}
    return roc, pr


def thresholds_page(reviewer: str) -> None:
    st.header("Thresholds")
    classes = rv.classes(engine)
    if not classes:
        st.info("No scored images yet.")
        return
    class_name = st.selectbox("Class", classes, key="t_class")
    versions = rv.class_versions(engine, class_name)
    if not versions:
        st.info("No results for this class yet.")
        return
    labels_of = {f"{v['name']}" + (" (active)" if v["active"] else ""): v for v in versions}
    chosen = labels_of[st.selectbox("Model version", list(labels_of), key="t_version",
                                    help="A threshold belongs to one model version of a class.")]
    version_id = chosen["id"]
    current = rv.current_threshold(engine, class_name, version_id)
    scores, labels = rv.reviewed_scores(engine, class_name, version_id)
    every = rv.class_scores(engine, class_name, model_version_id=version_id)
    st.write(f"{every.size} scored images, {scores.size} reviewed ({int(labels.sum())} defects). Current threshold: "
             + (f"**{current['value']:.3f}** (v{current['version']} by {current['created_by']})" if current
                else "**not calibrated for this version**"))
    if current is None:
        other = rv.latest_other_threshold(engine, class_name, version_id)
        if other is not None:
            share = float((every >= other["value"]).mean()) if every.size else 0.0
            st.warning(f"Not calibrated for {chosen['name']}: the threshold {other['value']:.3f} saved for "
                       f"{other['model_version'] or 'an earlier version'} would flag {100 * share:.1f}% of this "
                       "version's images. Save a threshold for this version.")
    if "t_value" not in st.session_state or st.session_state.get("t_for") != (class_name, version_id):
        st.session_state["t_value"] = float(current["value"]) if current else 0.5
        st.session_state["t_for"] = (class_name, version_id)
    if current is not None and current.get("kind") == "provisional":
        st.info(f"The threshold in force is **provisional** ({current['note']}): no reviewer has calibrated it.")
    calibration_section(scores, labels)
    target = st.number_input("Reach recall", 0.0, 1.0, 0.95, 0.01, key="t_recall")
    if st.button("Set the threshold for this recall", key="t_reach"):
        found = rv.threshold_for_recall(scores, labels, target)
        if found is None:
            st.warning("No reviewed defects yet.")
        else:
            st.session_state["t_value"] = round(found, 4)
    value = st.slider("Threshold", 0.0, 1.0, step=0.001, key="t_value", format="%.3f")
    effect = rv.threshold_effect(scores, labels, every, value)
    m1, m2, m3, m4 = st.columns(4)
    pct = (lambda v: "–" if v is None else f"{100 * v:.1f}%")
    m1.metric("Precision", pct(effect["precision"]))
    m2.metric("Recall", pct(effect["recall"]))
    m3.metric("False-positive rate", pct(effect["fpr"]))
    m4.metric("Flagged share", pct(effect["flagged_share"]))
    if scores.size:
        bins = np.linspace(0, 1, 21)
        hist = {"score": [f"{b:.2f}" for b in bins[:-1]],
                "normal": np.histogram(scores[labels == 0], bins)[0], "defect": np.histogram(scores[labels == 1], bins)[0]}
        st.bar_chart(hist, x="score", y=["normal", "defect"], color=["#4c78a8", "#e45756"])
        if 0 < labels.sum() < labels.size:
            roc, pr = _curves(scores, labels)
            c1, c2 = st.columns(2)
            c1.caption("ROC (reviewed images)")
            c1.line_chart(roc, x="false positive rate", y="true positive rate")
            c2.caption("Precision-recall (reviewed images)")
            c2.line_chart(pr, x="recall", y="precision")
    note = st.text_input("Note for this version", key="t_note")
    band = st.number_input("Review band (± around the threshold: decision 'review')", 0.0, 0.49,
                           float(current["review_band"]) if current else 0.0, 0.001, format="%.3f", key="t_band")
    if st.button("Save threshold", key="t_save", disabled=not reviewer, type="primary"):
        version = rv.save_threshold(engine, class_name, value, reviewer, note, model_version_id=version_id,
                                    review_band=band)
        st.success(f"Saved {class_name} threshold {value:.3f} as v{version} for {chosen['name']}; every decision "
                   "of this version now uses it.")
    if not reviewer:
        st.warning("Enter your name in the sidebar to change thresholds.")
    history = rv.threshold_history(engine, class_name, version_id)
    if history:
        st.subheader("History")
        st.dataframe(history, hide_index=True)
        version = st.selectbox("Roll back to", [h["version"] for h in history], key="t_rollback_version")
        if st.button("Roll back", key="t_rollback", disabled=not reviewer):
            new = rv.rollback_threshold(engine, class_name, int(version), reviewer, model_version_id=version_id)
            st.success(f"v{new} restores the value of v{version}.")
            st.rerun()
    compare_section(class_name, versions)


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
    report = rv.compare_versions(engine, class_name, active["id"], other["id"])
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
        st.write(f"{len(report['disagreements'])} images where the decisions differ")
        st.dataframe(report["disagreements"], hide_index=True)


def overview_page() -> None:
    st.header("Overview")
    info = rv.overview(engine)
    c1, c2, c3 = st.columns(3)
    c1.metric("Queue depth", info["queue_depth"])
    c2.metric("Scored", info["scored"])
    c3.metric("Active model", info["active_model"] or "–")
    if info["fallback"]:
        st.warning(f"Day one: {info['fallback']}.")
    if info["random_weights"]:
        st.error("The active model has RANDOM or untrained weights: its scores mean nothing.")
    if info["per_hour"]:
        rows = info["per_hour"]
        st.caption("Images per hour (last 24 h)")
        st.bar_chart({"hour": [r["hour"] for r in rows], "images": [r["images"] for r in rows],
                      "class": [r["class_name"] for r in rows]}, x="hour", y="images", color="class")
        st.caption("Flagged share per class and hour, at the current thresholds")
        st.dataframe([{"hour": r["hour"], "class": r["class_name"], "images": r["images"],
                       "flagged": r["flagged"] if r["with_threshold"] else "no threshold",
                       "rate": f"{100 * (r['flagged'] or 0) / r['images']:.1f}%" if r["with_threshold"] else "–"}
                      for r in rows], hide_index=True)
    if info["active_by_class"]:
        st.caption("Active model version per class")
        st.dataframe([{"class": c, "model version": v} for c, v in info["active_by_class"].items()],
                     hide_index=True)
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
                          "escape rate": "–" if e.rate is None else f"{100 * e.rate:.2f} %",
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


def main() -> None:
    st.sidebar.title("inspector")
    if not gate():
        return
    reviewer = reviewer_input()
    page = st.sidebar.radio("Page", ["Review", "Thresholds", "Overview"], key="page")
    st.sidebar.caption(f"Database: {engine.url.render_as_string(hide_password=True)}")
    if page == "Review":
        review_page(reviewer)
    elif page == "Thresholds":
        thresholds_page(reviewer)
    else:
        overview_page()


main()
