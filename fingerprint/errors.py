"""Exceptions raised by fingerprint.

Every user-facing error derives from :class:`FingerprintError`; errors caused by bad
input also derive from :class:`ValueError` so that generic callers can catch them as such.
Messages name the file, field or parameter at fault and what was expected.
"""

from __future__ import annotations


class FingerprintError(Exception):
    """Base class of all fingerprint errors."""


class InputError(FingerprintError, ValueError):
    """Invalid user input: a file, array, field or parameter that is not what was expected."""


class UnknownModelError(InputError, KeyError):
    """A model name that is not in the catalogue."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DictionaryError(FingerprintError):
    """A dictionary store that is missing, truncated, corrupt or built for something else."""


class CancelledError(FingerprintError):
    """A long-running operation was cancelled by its caller."""


class IncompatibleModelsError(InputError, AttributeError):
    """Sub-models that cannot be distributed together (dmipy raises AttributeError here,
    so this is both an :class:`InputError` and an :class:`AttributeError`)."""
