"""Helpers under dmipy's module names: coordinates and rotations (:mod:`.utils`),
spherical harmonics and convolution (:mod:`.spherical_convolution`), spherical means
(:mod:`.spherical_mean`) and CSD observation matrices
(:mod:`.construct_observation_matrix`)."""
