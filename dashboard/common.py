"""What every page of the dashboard shares: the settings, the store's engine, the password gate, the
reviewer's name and the compact page style."""

from __future__ import annotations

import hmac
import threading

import streamlit as st

from inspector.config import load_settings
from inspector.store import open_store

#: Pause after the n-th wrong password of a session: 0.25 s, doubling, at most 2 s.
WRONG_PASSWORD_DELAYS = (0.25, 0.5, 1.0, 2.0)
#: Characters that render as nothing although unicodedata files them as letters or symbols: braille blank,
#: Hangul fillers.
INVISIBLE_LETTERS = frozenset("\u2800\u115f\u1160\u3164\uffa0")

#: The page without Streamlit's roomy margins: the review page needs the whole 900 px of a laptop screen.
STYLE = """<style>
[data-testid="stMainBlockContainer"] { padding: 3.9rem 1.5rem 1rem 1.5rem; }
[data-testid="stMainBlockContainer"] h2 { padding: 0 0 0.25rem 0; }
[data-testid="stExpander"] details summary { padding-top: 0.35rem; padding-bottom: 0.35rem; }
[data-testid="stAppDeployButton"] { display: none; }
</style>"""


_bar = threading.local()  # each session's script runs in its own thread


@st.cache_resource
def _engine(url: str):
    return open_store(url, auto_upgrade=True)


def settings():
    return load_settings()


def engine():
    return _engine(settings().database.url)


def style() -> None:
    st.html(STYLE)


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

    password = settings().dashboard.password
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


def top_bar():
    """The row above every page: the reviewer's name (required to review or change thresholds), then what the
    page adds (``toolbar()``: the review filters, the page's position). Returns the reviewer's name."""
    bar = st.container(horizontal=True, vertical_alignment="center", gap="small")
    with bar:
        raw = st.text_input("Your name (required to review)", key="reviewer", width=230,
                            label_visibility="collapsed", placeholder="Your name (required to review)",
                            help="Every verdict and threshold is saved with this name.")
    _bar.container = bar
    name = visible_name(raw)
    if raw and not name:
        st.warning("This name has no visible characters; enter your name to review.")
    return name


def toolbar():
    """The rest of the row ``top_bar`` started, for the page being drawn (one per script thread)."""
    return getattr(_bar, "container", None) or st.container()


def reviewer() -> str:
    """The reviewer's name as the pages read it (entered in the top bar)."""
    return visible_name(st.session_state.get("reviewer") or "")


def pct(value: float | None, digits: int = 1) -> str:
    """0.1234 -> "12.3 %"; None -> "–"."""
    return "–" if value is None else f"{100 * value:.{digits}f} %"
