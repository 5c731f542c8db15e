"""The Streamlit dashboard, installed as the package ``inspector._dashboard`` (see pyproject.toml)."""
