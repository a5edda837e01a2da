"""Orientation (Watson, Bingham) and size (Gamma) distributions of compartments."""

from fingerprint.distributions.distribute_models import (
    DD1GammaDistributed,
    DistributedModel,
    SD1WatsonDistributed,
    SD2BinghamDistributed,
    kappa2odi,
    odi2kappa,
)

__all__ = [
    "DD1GammaDistributed",
    "DistributedModel",
    "SD1WatsonDistributed",
    "SD2BinghamDistributed",
    "kappa2odi",
    "odi2kappa",
]
