"""Panels beside the image under review: each one a function ``panel(row, source)`` that writes what it knows
about the image into the current Streamlit container.

``row`` is the image's row of ``store.review.review_queue`` (path, class, scores, decision, model version,
``created_at`` = scored time...), ``source`` the watched folder's row (path, line) or None. The review page
calls every function of ``PANELS`` in order for the image it shows; a format with its own metadata (DICOM
tags, camera EXIF) adds a function here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import streamlit as st

#: Folder names that say a dataset's image is defect-free (MVTec AD and VisA use "good"; lines often "ok").
NORMAL_FOLDERS = frozenset({"good", "ok", "normal", "pass", "no_defect", "defect_free", "defect-free"})
#: Folder names that say an image shows a defect without naming it.
DEFECT_FOLDERS = frozenset({"ng", "bad", "defect", "defects", "anomaly", "anomalous", "abnormal", "fail", "reject"})
#: Split folders under which a folder named for its defect type sits (MVTec AD: test/<defect>/000.png).
SPLIT_FOLDERS = frozenset({"test", "val", "validation", "train"})


def folder_hint(path: str) -> str | None:
    """What the image's folder says about it: "defect-free folder 'good'", "defect folder 'scratch'", or None
    when the folder names nothing known."""
    parts = PurePath(path).parts
    if len(parts) < 2:
        return None
    folder = parts[-2]
    if folder.lower() in NORMAL_FOLDERS:
        return f"defect-free folder '{folder}'"
    if folder.lower() in DEFECT_FOLDERS or (len(parts) >= 3 and parts[-3].lower() in SPLIT_FOLDERS):
        return f"defect folder '{folder}'"
    return None


def context_panel(row: dict[str, Any], source: dict[str, Any] | None) -> None:
    """Where the image comes from and what scored it: full path, source folder and line, what its folder says,
    native size, scored time (UTC), model version."""
    lines = [f"**File** `{row['path']}`"]
    if source is not None:
        lines.append(f"**Source** `{source['path']}`" + (f" · line **{source['line']}**" if source.get("line") else ""))
    hint = folder_hint(row["path"])
    if hint:
        lines.append(f"**Folder** {hint}")
    if row.get("width") and row.get("height"):
        lines.append(f"**Size** {row['width']} × {row['height']} px")
    scored = row.get("created_at")
    lines.append(f"**Scored** {scored:%Y-%m-%d %H:%M:%S} UTC" if scored else "**Scored** –")
    lines.append(f"**Model version** `{row['model_version']}`")
    st.markdown("  \n".join(lines))


PANELS: list[Callable[[dict[str, Any], dict[str, Any] | None], None]] = [context_panel]


def show(row: dict[str, Any], source: dict[str, Any] | None) -> None:
    for panel in PANELS:
        panel(row, source)


def short_path(path: str, keep: int = 3) -> str:
    """The last ``keep`` parts of a path (for narrow places; the full path is in the context panel)."""
    parts = PurePath(path).parts
    return path if len(parts) <= keep else os.path.join("…", *parts[-keep:])
