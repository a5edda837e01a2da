"""The ``fingerprint`` command-line interface."""
