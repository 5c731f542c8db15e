"""The Review page: one image at a time, its heat overlay beside it, a zoom on the map's peak, and the verdict.

Built for a reviewer doing hundreds of images a shift on a 1400 x 900 screen: the filters fold into a popover
above the page, the pictures are fitted to the screen (side by side, or one above the other for wide
images; a small image is enlarged at most twice), so image, overlay, score, decision and the three verdict
buttons are on screen together without scrolling. Keys: ``a`` accept as normal, ``d`` reject as defect,
``s`` skip, ``u`` undo the last verdict, left / right the previous / next image (``r`` is Streamlit's own
rerun key, ``c`` its cache key). A verdict reruns only the image's fragment (``st.fragment``), and the
pictures are cached by image and result, so the next image follows in a fraction of a second.

``?image=ID`` in the address opens that image (its result of the chosen model version) whatever the filters.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from typing import Any

import streamlit as st
from inspector._dashboard import common, dicom_view, heatmap, panels

from inspector.store import decode_map
from inspector.store import review as rv

#: Room (width, height in px) for each fitted picture at 1400 x 900 with the page's compact style: side by side
#: for square and tall images, one above the other for images wider than ``WIDE``.
SIDE_BY_SIDE_BOX = (470, 610)
STACKED_BOX = (960, 290)
WIDE = 1.6
SIDE_PANEL = 370
#: The narrowest column a picture gets (room for its caption).
MIN_COLUMN = 180
#: Pictures side by side narrower than this (tall images) leave the context to the free column on the right.
NARROW = 600
#: The page's content width at 1400 px (the style's 1.5 rem margins): the columns' weights are pixels of it.
CONTENT_WIDTH = 1352
STATES = {"unreviewed": {"reviewed": False}, "reviewed": {"reviewed": True}, "all": {"reviewed": None},
          "audit sample": {"reviewed": False, "audit": True}}


@st.cache_data(max_entries=256, show_spinner=False)
def views(url: str, image_id: int, result_id: int, path: str, stamp: tuple[int, int, int], dicom: bool,
          box: tuple[int, int], threshold: float | None, floor: float, opacity: float) -> heatmap.Views:
    """The pictures of one result, cached by (image, result, the file's mtime / size / inode, display
    settings). The file is read through the store's guard (a watched folder, the file actually opened); a
    DICOM frame is the windowed frame it was scored in (``dicom_view.frame_image``)."""
    from inspector.imaging import open_image

    engine = common._engine(url)
    framed = dicom_view.frame_image(engine, image_id) if dicom else None
    if framed is not None:
        image = framed[0]
    else:
        image = open_image(io.BytesIO(rv.read_allowed_image(engine, path)), name=path)
    return heatmap.render(image, decode_map(rv.anomaly_map(engine, image_id, result_id)), box, threshold, floor,
                          opacity)


def is_wide(row: dict[str, Any]) -> bool:
    return bool(row.get("width") and row.get("height") and row["width"] / row["height"] > WIDE)


def views_for(row: dict[str, Any], display: dict[str, float]) -> heatmap.Views:
    """``views`` of a queue row; raises FileNotFoundError, ``rv.ImageNotAllowed``, OSError or ValueError (a
    ``dicom.DicomError`` is one)."""
    stat = os.stat(row["path"])
    return views(common.settings().database.url, row["id"], row["result_id"], row["path"],
                 (stat.st_mtime_ns, stat.st_size, stat.st_ino), bool(row.get("dicom")),
                 STACKED_BOX if is_wide(row) else SIDE_BY_SIDE_BOX, row["threshold"], display["floor"],
                 display["opacity"])


# -------------------------------------------------------------------------------------------------
# callbacks: they run before the fragment redraws, so what they write shows at once


def _note(kind: str, text: str) -> None:
    st.session_state["review_note"] = (kind, text)


def _unpin(image_id: int | None = None) -> None:
    if image_id is None or st.session_state.get("pin") == image_id:
        st.session_state.pop("pin", None)
        if "image" in st.query_params:
            del st.query_params["image"]


def on_verdict(verdict: str, row: dict[str, Any], advance: bool) -> None:
    ss = st.session_state
    reviewer = common.reviewer()
    try:
        review_id = rv.record_review(common.engine(), row["id"], verdict, reviewer, ss.get(f"reason_{row['id']}"),
                                     result_id=row["result_id"])
    except rv.ReviewError as exc:
        _note("error", str(exc))
        return
    ss.setdefault("undo_stack", []).append([review_id])
    _note("success", f"Saved #{row['id']}: {verdict} by {reviewer}")
    if "image" in st.query_params:  # the link has done its job: a reload shows the queue
        del st.query_params["image"]
    if ss.get("pin") == row["id"]:
        _unpin()
    elif advance:  # the list does not shrink (reviewed or all): move on
        ss["position"] = ss.get("position", 0) + 1


def on_undo() -> None:
    ss = st.session_state
    stack = ss.get("undo_stack") or []
    if not stack:
        return
    try:
        done, kept = rv.undo_reviews(common.engine(), stack[-1], common.reviewer())
    except rv.ReviewError as exc:  # kept on the stack: the next try can still undo it
        _note("error", str(exc))
        return
    stack.pop()
    if len(done) == 1:
        ss["pin"] = done[0]["image_id"]  # show the image whose verdict was undone
        restored = "not reviewed" if done[0]["verdict"] == rv.UNDONE else done[0]["verdict"]
        _note("info", f"Undid the verdict on #{done[0]['image_id']}: it is {restored} again.")
    elif done:
        _note("info", f"Undid {len(done)} verdicts.")
    if kept:
        _note("warning", f"{len(kept)} verdict(s) not undone: the image was reviewed again since.")


def on_accept_low(pairs: list[tuple[int, int]]) -> None:
    try:
        ids = rv.accept_low_scores(common.engine(), pairs, common.reviewer())
    except rv.ReviewError as exc:
        _note("error", str(exc))
        return
    if ids:
        st.session_state.setdefault("undo_stack", []).append(ids)
    _note("success", f"Accepted {len(ids)} low-score images of this page as normal (undo with u).")


def on_move(step: int, count: int) -> None:
    ss = st.session_state
    _unpin()
    ss["position"] = min(max(0, ss.get("position", 0) + step), max(0, count - 1))


def on_page(step: int) -> None:
    ss = st.session_state
    size = common.settings().dashboard.page_size
    _unpin()
    ss["offset"] = max(0, ss.get("offset", 0) + step * size)
    ss["position"] = 0


def on_filters() -> None:
    st.session_state["offset"] = 0
    st.session_state["position"] = 0
    _unpin()


# -------------------------------------------------------------------------------------------------
# filters


def filters() -> tuple[dict[str, Any], dict[str, float]]:
    """The filter and display popovers in the top bar: (the queue query, the display settings)."""
    engine = common.engine()
    ss = st.session_state
    classes = rv.classes(engine)
    sources = {f"{s['path']} ({s['class_name']})": s["id"] for s in rv.source_list(engine)}
    bar = common.toolbar()
    with bar.popover("Filters", icon=":material/filter_list:", key="f_popover"):
        c1, c2 = st.columns(2)
        class_name = c1.selectbox("Class", ["all", *classes], key="f_class", on_change=on_filters)
        decision = c2.selectbox("Decision", ["all", "defect", "normal"], key="f_decision", on_change=on_filters,
                                help="At the current threshold of the result's version.")
        state = c1.selectbox("Review state", list(STATES), key="f_reviewed", on_change=on_filters,
                             help="audit sample: the random share of passed images drawn to measure the escape "
                                  "rate (review them all: they are not chosen by score)")
        order = c2.radio("Order", ["score", "closeness"], horizontal=True, key="f_order", on_change=on_filters,
                         help="score: highest first; closeness: nearest to the class threshold first (the unsure "
                              "ones)")
        source = st.selectbox("Source", ["all", *sources], key="f_source", on_change=on_filters)
        versions: dict[str, int | None] = {"active (per class)": None}
        if class_name != "all":
            versions.update({v["name"] + (" (active)" if v["active"] else ""): v["id"]
                             for v in rv.class_versions(engine, class_name)})
        version_label = st.selectbox("Model version", list(versions), key="f_version", on_change=on_filters,
                                     help="Whose results to review: each class's active version, or another one "
                                          "(a shadow candidate, an earlier version).")
        low, high = st.slider("Score range", 0.0, 1.0, (0.0, 1.0), 0.01, key="f_scores", on_change=on_filters)
        dates = st.date_input("Scored between", value=(), key="f_dates", on_change=on_filters,
                              help="Pick a start and an end day (UTC).")
    with bar.popover("Display", icon=":material/tune:", key="f_display"):
        floor = st.slider("Heat floor", 0.0, 0.95, heatmap.FLOOR, 0.05, key="heat_floor",
                          help="Map values up to this are transparent; above it the colour and opacity rise.")
        opacity = st.slider("Heat opacity", 0.1, 1.0, heatmap.OPACITY, 0.05, key="heat_opacity")
    summary = [class_name if class_name != "all" else "all classes", state, f"by {order}"]
    if decision != "all":
        summary.append(decision)
    if source != "all":
        summary.append(source)
    if (low, high) != (0.0, 1.0):
        summary.append(f"score {low:.2f}–{high:.2f}")
    if len(dates) == 2:
        summary.append(f"{dates[0]}–{dates[1]}")
    if versions.get(version_label) is not None:
        summary.append(version_label)
    bar.caption(" · ".join(summary))
    query = dict(class_name=None if class_name == "all" else class_name,
                 source_id=None if source == "all" else sources[source],
                 since=dt.datetime.combine(dates[0], dt.time()) if len(dates) == 2 else None,
                 until=dt.datetime.combine(dates[1], dt.time()) + dt.timedelta(days=1) if len(dates) == 2 else None,
                 score_min=low, score_max=high, decision=None if decision == "all" else decision, order=order,
                 model_version_id=versions.get(version_label), **STATES[state])
    ss.setdefault("offset", 0)
    return query, {"floor": floor, "opacity": opacity}


# -------------------------------------------------------------------------------------------------
# the image under review


def low_score_candidates(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, int]], int]:
    """(image, result) pairs of the page that "accept the low scores" would accept, and how many audited
    passes it leaves alone (``rv.accept_low_scores`` checks again when it writes)."""
    pairs, audited = [], 0
    for r in rows:
        if r["verdict"] is not None or r["threshold"] is None:
            continue
        if r["image_score"] < r["threshold"] - (r["review_band"] or 0.0):
            if r["audit"]:
                audited += 1
            else:
                pairs.append((r["id"], r["result_id"]))
    return pairs, audited


def decision_badge(row: dict[str, Any]) -> None:
    if row["threshold"] is None:
        st.badge("no threshold for this version", color="gray")
        return
    colour = "red" if row["decision"] == "defect" else "green"
    st.badge(f"{row['decision']} at {row['threshold']:.6g} (v{row['threshold_version']})", color=colour)


def pictures(row: dict[str, Any], display: dict[str, float]) -> tuple[heatmap.Views | None, tuple[str, str] | None]:
    """(the views, None) or (None, (message kind, why the image is not shown))."""
    try:
        return views_for(row, display), None
    except rv.ImageNotAllowed as exc:
        return None, ("error", f"Not shown: {exc}")
    except FileNotFoundError:
        return None, ("warning", f"The file is gone: {row['path']}")
    except (OSError, ValueError) as exc:  # replaced by a non-image, unreadable: review it from the score
        return None, ("warning", f"The image cannot be shown ({exc}); its score and verdict buttons still work.")


def layout(row: dict[str, Any], shown: heatmap.Views | None):
    """(the original's place, the overlay's place, the context's place, the side panel): one above the other
    for wide images, else side by side in columns as wide as the fitted pictures; the side panel right of
    them; the context under the pictures, or right of the side panel when tall pictures leave room there."""
    if is_wide(row):
        width = shown.shown[0] if shown is not None else STACKED_BOX[0]
        left, side, _ = st.columns([width + 16, SIDE_PANEL, max(1, CONTENT_WIDTH - width - 16 - SIDE_PANEL)],
                                   gap="small")
        return left, left, left, side
    width = max(shown.shown[0], MIN_COLUMN) if shown is not None else SIDE_BY_SIDE_BOX[0]
    area = 2 * width + 16
    left, side, rest = st.columns([area, SIDE_PANEL, max(1, CONTENT_WIDTH - area - SIDE_PANEL)], gap="small")
    with left:
        first, second = st.columns(2, gap="small")
    return first, second, left if area >= NARROW else rest, side


def note() -> None:
    """The last action's confirmation (a caption: the same height whatever it says) or its problem."""
    message = st.session_state.get("review_note")
    if not message:
        return
    kind, text = message
    if kind in ("success", "info"):
        st.caption(f":material/check_circle: {text}" if kind == "success" else f":material/info: {text}")
    else:
        getattr(st, kind)(text)


@st.fragment
def review_fragment(query: dict[str, Any], display: dict[str, float]) -> None:
    """The image, its overlay, score, decision, verdict buttons, zoom, context and history. A verdict reruns
    only this function."""
    engine = common.engine()
    ss = st.session_state
    reviewer = common.reviewer()
    size = common.settings().dashboard.page_size
    offset = ss.get("offset", 0)
    rows = rv.review_queue(engine, limit=size, offset=offset, **query)
    position = min(ss.get("position", 0), max(0, len(rows) - 1))
    pin = ss.get("pin")
    pinned = None
    if pin is not None:
        index = next((i for i, r in enumerate(rows) if r["id"] == pin), None)
        if index is not None:
            position = index
            ss.pop("pin")
        else:
            found = rv.review_queue(engine, image_ids=[pin], model_version_id=query["model_version_id"])
            pinned = found[0] if found else None
            if pinned is None:
                st.warning(f"Image #{pin} has no result of this model version.")
                ss.pop("pin")
    ss["position"] = position
    if not rows and pinned is None:
        note()
        st.info("Nothing to review with these filters.")
        if offset:
            st.button("Back to the first page", on_click=on_page, args=(-(offset // size),), key="first_page")
        tools = st.container(horizontal=True, gap="small")
        tools.button("Undo", shortcut="u", key="undo", icon=":material/undo:", disabled=not ss.get("undo_stack"),
                     help="Undo the last verdict (u)", on_click=on_undo)
        return
    row = pinned or rows[position]
    page = offset // size + 1
    where = (f"Image **#{row['id']}**, opened by link or undo, not in this queue" if pinned else
             f"**{position + 1}** of {len(rows)} on page {page}")
    frame = f" · frame {row['frame'] + 1}" if row.get("dicom") else ""
    st.markdown(f"{where} · class **{row['class_name']}** · `{row['path']}`{frame}")
    shown, problem = pictures(row, display)
    first, second, below, side = layout(row, shown)
    if problem is not None:
        getattr(first, problem[0])(problem[1])
    else:
        w, h = shown.native
        width = shown.shown[0]  # the fitted size (a fixed width: a long caption does not stretch the picture)
        first.image(shown.original, caption=f"original · {w} × {h} px", alt=f"image #{row['id']}", width=width)
        second.image(shown.overlay, caption=f"map above {display['floor']:.2f} · peak {shown.peak_value:.2f} · "
                     "cyan: zoom", alt=f"overlay of image #{row['id']}", width=width)
    advance = pinned is None and query["reviewed"] is not False
    with side:
        head = st.container(horizontal=True, gap="small", vertical_alignment="center")
        head.metric("Image score", f"{row['image_score']:.5f}", width="content")
        with head.container(gap=None):
            decision_badge(row)
            stored = row["stored_decision"]
            if stored or row["audit"]:
                st.caption((f"stored as **{stored}**" if stored else "")
                           + (" · **audit sample**: review it" if row["audit"] else ""))
        buttons = st.container(horizontal=True, gap="small")
        buttons.button("Accept", shortcut="a", key="accept", disabled=not reviewer, width="stretch",
                       help="Accept as normal (a)", on_click=on_verdict, args=("normal", row, advance))
        buttons.button("Reject", shortcut="d", key="reject", disabled=not reviewer, width="stretch", type="primary",
                       help="Reject as defect (d)", on_click=on_verdict, args=("defect", row, advance))
        buttons.button("Skip", shortcut="s", key="skip", disabled=not reviewer, width="stretch",
                       help="Skip (s): counts as looked at, no verdict", on_click=on_verdict,
                       args=("skip", row, advance))
        st.text_input("Reason (optional)", key=f"reason_{row['id']}", label_visibility="collapsed",
                      placeholder="Reason (optional)")
        if not reviewer:
            st.warning("Enter your name above to review.")
        tools = st.container(horizontal=True, gap="small")
        tools.button("Undo", shortcut="u", key="undo", icon=":material/undo:", disabled=not ss.get("undo_stack"),
                     help="Undo the last verdict (u): a new review row restores the one before", on_click=on_undo)
        tools.button("", shortcut="left", key="prev", icon=":material/chevron_left:", help="Previous image (←)",
                     disabled=pinned is None and position == 0, on_click=on_move, args=(-1, len(rows)))
        tools.button("", shortcut="right", key="next", icon=":material/chevron_right:", help="Next image (→)",
                     disabled=pinned is None and position >= len(rows) - 1, on_click=on_move, args=(1, len(rows)))
        pairs, audited = low_score_candidates(rows)
        with tools.popover(f"Accept low scores ({len(pairs)})", disabled=not pairs or not reviewer, key="low_popover",
                           help="Accept every unreviewed image of this page below its threshold (minus the "
                                "review band) as normal, in one action"):
            st.write(f"Accept the **{len(pairs)}** unreviewed images of this page that score below their "
                     "threshold as normal." + (f" The {audited} audited passes among the low scores stay for "
                                               "you to review one by one." if audited else ""))
            st.button(f"Accept {len(pairs)} as normal", key="accept_low", type="primary", on_click=on_accept_low,
                      args=(pairs,), disabled=not reviewer)
        if pinned is not None:
            st.button("Back to the queue", key="unpin", on_click=_unpin)
        note()
        if shown is not None:
            x, y = shown.peak
            left, top, right, bottom = shown.zoom_box
            if (left, top, right, bottom) == (0, 0, *shown.native) and shown.shown[0] >= shown.native[0]:
                st.caption("No zoom: the whole image is shown at full resolution or more.")
            else:
                st.image(shown.zoom, caption=f"zoom ×{shown.zoom_scale}: {right - left} × {bottom - top} px at "
                         f"full resolution around the peak ({x}, {y})", alt=f"zoom of image #{row['id']}",
                         width=min((right - left) * shown.zoom_scale, SIDE_PANEL))
    with below:
        sources = {s["id"]: s for s in rv.source_list(engine)}
        panels.show(row, sources.get(row["source_id"]))
        if row.get("dicom"):
            dicom_view.show(engine, row["id"], st.expander("DICOM: UIDs, window / level"))
        history = rv.review_history(engine, row["id"])
        if history:
            with st.expander(f"Review history ({len(history)})"):
                st.markdown("  \n".join(f"{h['created_at']:%Y-%m-%d %H:%M} · **{h['verdict']}** by {h['reviewer']}"
                                        + (f" · {h['reason']}" if h["reason"] else "") for h in history))
        pages = st.container(horizontal=True, gap="small")
        pages.button("Previous page", key="prev_page", disabled=not offset, on_click=on_page, args=(-1,))
        pages.button("Next page", key="next_page", disabled=len(rows) < size, on_click=on_page, args=(1,))
    if pinned is None:  # warm the cache for the image that follows (the list shrinks or moves on: the same one)
        for nxt in rows[position + 1:position + 2]:
            try:
                views_for(nxt, display)
            except (OSError, ValueError):
                pass


def render() -> None:
    ss = st.session_state
    image = st.query_params.get("image")
    if image is not None and ss.get("pin_from_link") != image:  # a link opens its image once per address
        ss["pin_from_link"] = image
        if image.isdigit():
            ss["pin"] = int(image)
    query, display = filters()
    review_fragment(query, display)


if __name__ == "__main__":
    render()
