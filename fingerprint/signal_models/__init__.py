"""fingerprint.signal_models."""
