"""Data shipped with fingerprint: named acquisition schemes
(:mod:`.saved_acquisition_schemes`)."""
