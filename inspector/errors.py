"""The errors a user can cause, as one family: the CLI prints an ``InspectorError`` as one line (exit 2);
anything else is a bug, printed as "internal error" with its traceback under ``--verbose``.

Each concept keeps its own subclass where it lives (``ConfigError`` in ``config``, ``DatasetError`` in
``data.records``, ``BackboneError`` in ``backbone``, ``RegistryError``, ``StoreError``, ...); those that are
not a concept's own live here.
"""

from __future__ import annotations


class InspectorError(Exception):
    """A mistake in what a user asked for or handed us, or an environment that cannot do it; the message
    says what and how to fix it."""


class UsageError(InspectorError, ValueError):
    """Arguments or settings that do not fit together (a missing file, a flag a detector does not take)."""


class HeadFormatError(InspectorError, ValueError):
    """A detector head or official checkpoint file that is not what it claims to be (every detector)."""
