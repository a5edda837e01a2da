"""fingerprint.fitting."""
