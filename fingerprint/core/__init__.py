"""fingerprint.core."""
