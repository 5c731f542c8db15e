"""Alembic scripts, installed as the package ``inspector._migrations`` (see pyproject.toml)."""
