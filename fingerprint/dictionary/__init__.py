"""Dictionary generator: sample a model's parameters, simulate atoms, store them.

>>> from fingerprint.dictionary import get_or_build_dictionary, open_dictionary
>>> d = get_or_build_dictionary("noddi", scheme, size=100_000)   # cached by key
>>> d.features.shape, d.parameter_names

See docs/dictionary-format.md for the on-disk format.
"""

from .build import (
    DEFAULT_CHUNK_ATOMS,
    DEFAULT_SIZE,
    build_dictionary,
    get_or_build_dictionary,
    prepare_build,
    simulate_atoms,
)
from .cache import default_dictionary_dir, dictionary_key, list_dictionaries, store_path
from .sampling import ParameterSpace, SamplingPlan, SamplingSpec, resolve_sampling
from .store import FORMAT_VERSION, Dictionary, open_dictionary

__all__ = [
    "DEFAULT_CHUNK_ATOMS",
    "DEFAULT_SIZE",
    "FORMAT_VERSION",
    "Dictionary",
    "ParameterSpace",
    "SamplingPlan",
    "SamplingSpec",
    "build_dictionary",
    "default_dictionary_dir",
    "dictionary_key",
    "get_or_build_dictionary",
    "list_dictionaries",
    "open_dictionary",
    "prepare_build",
    "resolve_sampling",
    "simulate_atoms",
    "store_path",
]
