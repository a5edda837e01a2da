"""The layout of a model's parameter vectors: names, cardinalities, column slices and
units, in dmipy's order. Owned by the model (``model.parameter_layout``); the fitted
model, the estimator, the volume runner and the dictionary read columns through it
instead of recomputing offsets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fingerprint.core.units import DIMENSIONLESS
from fingerprint.errors import InputError

__all__ = ["ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """Columns of each parameter in a parameter vector (..., P)."""

    names: tuple[str, ...]
    cardinality: Mapping[str, int]
    units: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [n for n in self.names if n not in self.cardinality]
        if missing:
            raise InputError(f"parameter layout: no cardinality for {missing}")
        object.__setattr__(self, "cardinality",
                           {n: int(self.cardinality[n]) for n in self.names})
        object.__setattr__(self, "units",
                           {n: str(self.units.get(n, DIMENSIONLESS)) for n in self.names})

    @classmethod
    def from_cardinality(cls, cardinality: Mapping[str, int],
                         units: Mapping[str, str] | None = None) -> ParameterLayout:
        """The layout of ``cardinality`` (name -> number of values, in vector order)."""
        return cls(tuple(cardinality), dict(cardinality), dict(units or {}))

    @property
    def slices(self) -> dict[str, slice]:
        """Name -> columns."""
        out, pos = {}, 0
        for name in self.names:
            out[name] = slice(pos, pos + self.cardinality[name])
            pos += self.cardinality[name]
        return out

    @property
    def offsets(self) -> dict[str, int]:
        """Name -> first column."""
        return {name: sl.start for name, sl in self.slices.items()}

    @property
    def size(self) -> int:
        """P, the length of a parameter vector."""
        return sum(self.cardinality.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Parameter vectors (..., P) -> name -> (...) for scalars, (..., c) otherwise."""
        arr = np.asarray(vector)
        if arr.ndim == 0 or arr.shape[-1] != self.size:
            raise InputError(f"parameter vector must have last dimension {self.size} "
                             f"({', '.join(self.names)}), got shape {arr.shape}")
        return {name: arr[..., sl.start] if sl.stop - sl.start == 1 else arr[..., sl]
                for name, sl in self.slices.items()}
