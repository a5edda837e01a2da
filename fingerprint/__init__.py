"""fingerprint: diffusion-MRI microstructure fitting by dictionary matching.

The modelling API mirrors dmipy (``fingerprint.core``, ``fingerprint.signal_models``,
``fingerprint.distributions``); fitting matches each voxel against a precomputed
dictionary of simulated signals (``fingerprint.dictionary``, ``fingerprint.fitting``).
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
