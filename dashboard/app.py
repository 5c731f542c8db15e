"""inspector's review and threshold dashboard (Streamlit). Start it with `inspector dashboard`.

Every read and write goes through ``inspector.store``: the dashboard holds no data of its own. This file is
the entry point: the page style, the optional password, the reviewer's name, and the navigation between
three pages, each its own script (``st.navigation`` clears one page's widgets before the next draws):

* Review (``review_page.py``): the queue, image and heat overlay side by side, zoom on the peak, verdicts
  with the keys a / d / s, undo (u), accept a page's low scores;
* Thresholds (``thresholds_page.py``): histogram, ROC and PR on reviewed images, a slider scaled to the
  class's scores, versioned save and rollback, version comparison;
* Overview (``overview_page.py``): throughput, flagged rates, active versions, escape rate, errors, export.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from inspector._dashboard import common

HERE = Path(__file__).parent
PAGES = (("review_page.py", "Review", "review", ":material/fact_check:"),
         ("thresholds_page.py", "Thresholds", "thresholds", ":material/tune:"),
         ("overview_page.py", "Overview", "overview", ":material/monitoring:"))

st.set_page_config(page_title="inspector", layout="wide", initial_sidebar_state="collapsed")
common.style()
if common.gate():
    page = st.navigation([st.Page(HERE / file, title=title, url_path=path, icon=icon, default=i == 0)
                          for i, (file, title, path, icon) in enumerate(PAGES)], position="top")
    common.top_bar()
    page.run()
