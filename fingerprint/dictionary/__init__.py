"""fingerprint.dictionary."""
