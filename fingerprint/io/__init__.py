"""fingerprint.io."""
