"""The catalogue of named models (``noddi``, ``ball_stick``, ...), built from recipes.

Each named model is described by a TOML recipe in the repository's ``dictionaries/``
directory (``$FINGERPRINT_RECIPE_DIR`` overrides it); see :mod:`fingerprint.recipes`.

>>> from fingerprint.models import available_models, get_model, map_labels
>>> model = get_model("noddi")                      # a fresh MultiCompartmentModel
>>> map_labels("noddi")["odi"]
'SD1WatsonDistributed_1_SD1Watson_1_odi'
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fingerprint.errors import InputError
from fingerprint.recipes import Recipe, load_recipes, recipe_dir, unknown_model

if TYPE_CHECKING:
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = [
    "available_models",
    "get_model",
    "get_recipe",
    "map_labels",
    "model_name",
    "recipe_dir",
    "recipe_for_model",
    "requires_timing",
]


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def available_models() -> dict[str, str]:
    """Named models and their one-line descriptions, by name."""
    return {name: recipe.description.splitlines()[0] if recipe.description else ""
            for name, recipe in sorted(load_recipes().items())}


def get_recipe(name: str) -> Recipe:
    """The recipe of a named model (UnknownModelError listing the names)."""
    if not isinstance(name, str):
        raise InputError(f"model name must be a string, got {type(name).__name__}")
    recipes = load_recipes()
    recipe = recipes.get(_normalise(name))
    if recipe is None:
        raise unknown_model(name, sorted(recipes))
    return recipe


def get_model(name: str) -> MultiCompartmentModelProperties:
    """A fresh instance of the named model (UnknownModelError listing the names)."""
    return get_recipe(name).build_model()


def _spec_hash(model: Any) -> str | None:
    try:
        return str(model.spec_hash)
    except Exception:  # a model without specs cannot match a recipe
        return None


@lru_cache(maxsize=64)
def _recipe_hashes(stamp: tuple) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, recipe in load_recipes().items():
        try:
            key = _spec_hash(recipe.build_model())
            if key is not None:
                out[key] = name
        except Exception as exc:  # a recipe that does not build matches nothing
            logger.warning("recipe %s does not build: %s", name, exc)
    return out


def recipe_for_model(model: str | MultiCompartmentModelProperties) -> Recipe | None:
    """The recipe whose model is identical (same spec hash) to ``model``, or None."""
    if isinstance(model, str):
        return get_recipe(model)
    digest = _spec_hash(model)
    if digest is None:
        return None
    recipes = load_recipes()
    stamp = tuple(sorted((n, id(r)) for n, r in recipes.items()))
    name = _recipe_hashes(stamp).get(digest)
    return recipes.get(name) if name else None


def model_name(model: str | MultiCompartmentModelProperties) -> str | None:
    """Name of the recipe ``model`` was built from (same spec), or None."""
    recipe = recipe_for_model(model)
    return recipe.name if recipe else None


def map_labels(name_or_model: str | MultiCompartmentModelProperties) -> dict[str, str]:
    """Output map label -> parameter name.

    For a named model (or a model identical to one) this is the recipe's ``[maps]`` table
    (NODDI: icvf, odi, isovf, direction); for any other model every free parameter is its
    own label (the dmipy parameter name).
    """
    recipe = recipe_for_model(name_or_model)
    if recipe is not None:
        return dict(recipe.maps)
    assert not isinstance(name_or_model, str)  # a name has its recipe (or raised)
    return {name: name for name in name_or_model.parameter_names}


def requires_timing(name_or_model: str | MultiCompartmentModelProperties) -> bool:
    """Whether simulating the model needs pulse timing (delta, Delta) in the scheme."""
    recipe = recipe_for_model(name_or_model)
    if recipe is not None and recipe.requires_timing:
        return True
    if isinstance(name_or_model, str):
        if recipe is None:
            raise unknown_model(name_or_model, sorted(load_recipes()))
        model = recipe.build_model()
    else:
        model = name_or_model
    required = getattr(model, "_required_acquisition_parameters", None) or []
    return any(p in ("delta", "Delta", "qvalues", "gradient_strengths") for p in required)
