"""fingerprint.distributions."""
