"""The catalogue of named models (``noddi``, ``ball_stick``, ...), built from recipes.

Each named model is described by a TOML recipe in the repository's ``dictionaries/``
directory (``$FINGERPRINT_RECIPE_DIR`` overrides it); see :mod:`fingerprint.recipes`.

>>> from fingerprint.models import available_models, get_model, map_labels
>>> model = get_model("noddi")                      # a fresh MultiCompartmentModel
>>> map_labels("noddi")["odi"]
'SD1WatsonDistributed_1_SD1Watson_1_odi'
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.backends import register_backend
from fingerprint.core.units import DIFFUSIVITY, DIMENSIONLESS
from fingerprint.errors import InputError
from fingerprint.recipes import Recipe, load_recipes, recipe_dir, unknown_model
from fingerprint.signal_models.tensor_models import TENSOR_ELEMENTS, tensor_eigen
from fingerprint.volume_models import VOLUME_MODELS, get_volume_model, is_volume_model

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = [
    "DERIVED_MAPS",
    "DerivedMap",
    "available_models",
    "catalogue",
    "derived_map_specs",
    "derived_maps",
    "describe_model",
    "format_model",
    "models_markdown",
    "get_model",
    "get_recipe",
    "map_labels",
    "model_name",
    "model_count_penalty",
    "model_posterior_neighbors",
    "model_refine",
    "model_solver",
    "recipe_dir",
    "recipe_for_model",
    "requires_timing",
    "scheme_requirements",
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


def get_model(name: str, S0_tissue_responses: ArrayLike | None = None  # noqa: N803
              ) -> MultiCompartmentModelProperties:
    """A fresh instance of the named model (UnknownModelError listing the names); with
    ``S0_tissue_responses`` (one per top-level compartment, units of the data) a
    multi-tissue model whose fits report volume fractions
    (``fitted_multi_tissue_fractions``)."""
    return get_recipe(name).build_model(S0_tissue_responses)


def _spec_hash(model: Any) -> str | None:
    """Digest of the model's spec without its multi-tissue S0 responses (a named model
    with responses is still that named model)."""
    try:
        spec = dict(model.to_spec())
    except Exception:  # a model without specs cannot match a recipe
        return None
    spec.pop("S0_tissue_responses", None)
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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


def scheme_requirements(name_or_model: str | MultiCompartmentModelProperties) -> dict[str, float]:
    """The scheme requirements (``min_shells``, ``min_bmax`` in s/m², ``min_directions``)
    the recipe of a named model states ({} for a model built otherwise); checked before
    every fit by :func:`fingerprint.core.scheme_checks.check_scheme`."""
    recipe = recipe_for_model(name_or_model)
    return dict(recipe.requirements) if recipe is not None else {}


register_backend("model_requirements", scheme_requirements)


def model_solver(name_or_model: str | MultiCompartmentModelProperties) -> str:
    """The solver a named model is always fitted with ("" when any solver may fit it,
    ``'dti'`` for the linear tensor fit)."""
    recipe = recipe_for_model(name_or_model)
    return recipe.solver if recipe is not None else ""


def model_refine(name_or_model: str | MultiCompartmentModelProperties
                 ) -> bool | str | None:
    """The refinement a named model is fitted with when the user does not choose one
    (its recipe's ``[fit] refine``: True, False or ``'nonlinear'``), or None (the
    library's default: the local-linear step, plus the non-linear polish for models with
    more than one orientation)."""
    recipe = recipe_for_model(name_or_model)
    return recipe.refine if recipe is not None else None


def model_count_penalty(name_or_model: str | MultiCompartmentModelProperties
                        ) -> float | None:
    """The fascicle-count penalty a named multi-fascicle model is fitted with (its
    recipe's ``[fit] count_penalty``: the information-criterion cost of one parameter,
    :class:`~fingerprint.fitting.multifascicle.MultiFascicleSettings`), or None (log N,
    the BIC)."""
    recipe = recipe_for_model(name_or_model)
    return recipe.count_penalty if recipe is not None else None


def model_posterior_neighbors(name_or_model: str | MultiCompartmentModelProperties
                              ) -> int | None:
    """Atoms whose Rician posterior gives a named model's matched scalar parameters (its
    recipe's ``[fit] posterior_neighbors``, :mod:`fingerprint.fitting.posterior`), or None
    (the matcher's own neighbours and weights)."""
    recipe = recipe_for_model(name_or_model)
    return recipe.posterior_neighbors if recipe is not None else None


_REFINE_TEXT = {True: "matching with the local-linear step",
               False: "matching only (no refinement)",
               "nonlinear": "matching, the local-linear step and the non-linear "
                            "least-squares polish"}


# --------------------------------------------------------------------------- derived maps
@dataclass(frozen=True)
class DerivedMap:
    """An output map computed from fitted parameters (DTI's FA from the tensor)."""

    name: str
    #: parameters (full names' suffixes) the map is computed from
    needs: tuple[str, ...]
    compute: Callable[[dict[str, np.ndarray]], np.ndarray]
    units: str
    description: str
    #: values per voxel (3 for a direction)
    width: int = 1


def _tensor(params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    elements = np.stack([np.asarray(params[k], dtype=np.float64).reshape(-1)
                         for k in TENSOR_ELEMENTS], axis=1)
    return tensor_eigen(elements)


def _fa(params: dict[str, np.ndarray]) -> np.ndarray:
    lam, _ = _tensor(params)
    md = lam.mean(axis=1, keepdims=True)
    num = np.sqrt(1.5 * np.sum((lam - md) ** 2, axis=1))
    den = np.sqrt(np.sum(lam ** 2, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _md(params: dict[str, np.ndarray]) -> np.ndarray:
    return _tensor(params)[0].mean(axis=1)


def _ad(params: dict[str, np.ndarray]) -> np.ndarray:
    return _tensor(params)[0][:, 0]


def _rd(params: dict[str, np.ndarray]) -> np.ndarray:
    return _tensor(params)[0][:, 1:].mean(axis=1)


def _v1(params: dict[str, np.ndarray]) -> np.ndarray:
    return _tensor(params)[1]


#: Derived maps a recipe's ``[derived]`` table may name.
DERIVED_MAPS: dict[str, DerivedMap] = {m.name: m for m in (
    DerivedMap("fractional_anisotropy", TENSOR_ELEMENTS, _fa, DIMENSIONLESS,
               "fractional anisotropy of the diffusion tensor (0-1)"),
    DerivedMap("mean_diffusivity", TENSOR_ELEMENTS, _md, DIFFUSIVITY,
               "mean diffusivity: mean of the tensor's eigenvalues"),
    DerivedMap("axial_diffusivity", TENSOR_ELEMENTS, _ad, DIFFUSIVITY,
               "axial diffusivity: the tensor's largest eigenvalue"),
    DerivedMap("radial_diffusivity", TENSOR_ELEMENTS, _rd, DIFFUSIVITY,
               "radial diffusivity: mean of the tensor's two smaller eigenvalues"),
    DerivedMap("principal_direction", TENSOR_ELEMENTS, _v1, DIMENSIONLESS,
               "principal eigenvector V1: unit vector (x, y, z in the b-vector frame)",
               width=3),
)}


def _by_suffix(parameters: dict[str, np.ndarray], short: str) -> np.ndarray:
    if short in parameters:
        return parameters[short]
    hits = [k for k in parameters if k.endswith("_" + short)]
    if len(hits) != 1:
        raise InputError(f"derived map needs parameter {short!r}; parameters: "
                         f"{sorted(parameters)}")
    return parameters[hits[0]]


def derived_map_specs(name_or_model: str | MultiCompartmentModelProperties
                      ) -> dict[str, DerivedMap]:
    """Label -> :class:`DerivedMap` of a named model's ``[derived]`` maps ({} otherwise)."""
    recipe = recipe_for_model(name_or_model)
    if recipe is None:
        return {}
    out = {}
    for label, fname in recipe.derived.items():
        spec = DERIVED_MAPS.get(fname)
        if spec is None:
            raise InputError(f"recipe {recipe.name}: [derived] {label} names unknown derived "
                             f"map {fname!r}; known: {sorted(DERIVED_MAPS)}")
        out[label] = spec
    return out


def derived_maps(name_or_model: str | MultiCompartmentModelProperties,
                 parameters: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """The derived maps (label -> (n,) or (n, 3) array) of fitted ``parameters`` (full
    parameter name -> (n,) values) of a named model with a ``[derived]`` table."""
    out = {}
    for label, spec in derived_map_specs(name_or_model).items():
        values = {k: np.asarray(_by_suffix(parameters, k), dtype=np.float64).reshape(-1)
                  for k in spec.needs}
        out[label] = spec.compute(values)
    return out


# --------------------------------------------------------------------------- catalogue
#: Maps every fit writes besides a model's own (label: what it holds).
COMMON_MAPS = {
    "s0": "fitted signal without diffusion weighting (units of the input)",
    "r2": "coefficient of determination of the fitted signal",
    "sigma": "estimated noise standard deviation (units of the input)",
    "quality": "per-voxel quality flags (bit map, fingerprint.fitting.quality)",
}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def catalogue() -> dict[str, str]:
    """Every named model (recipes and the volume models such as ``mc_csd``) with its
    one-line description, by name."""
    out = dict(available_models())
    out.update({name: vm.description.split(". ")[0].rstrip(".") + "."
                for name, vm in VOLUME_MODELS.items()})
    return dict(sorted(out.items()))


def _describe_volume_model(name: str) -> dict[str, Any]:
    vm = get_volume_model(name)
    return {
        "name": vm.name, "description": vm.description, "reference": vm.reference,
        "class": "volume model", "spherical_mean": False,
        "solver": "its own volume fit (not dictionary matching)", "dictionary_size": None,
        "free_values": None,
        "parameters": [{"name": k, "label": "", "kind": "option", "units": "",
                        "bounds": f"default {d!r}: {text}"}
                       for k, (d, text) in vm.options.items()],
        "constraints": [], "requirements": [vm.requirements] if vm.requirements else [],
        "maps": dict(vm.outputs), "common_maps": {},
    }


def describe_model(name: str) -> dict[str, Any]:
    """Everything the catalogue says about a named model, from its recipe and the model
    it builds: description, reference, free parameters (map label, unit, SI bounds),
    constraints (fixed / linked parameters), scheme requirements, output maps, solver and
    dictionary size. What ``fingerprint models NAME`` prints and ``docs/models.md`` holds."""
    if is_volume_model(name):
        return _describe_volume_model(name)
    # the dictionary package's __init__ loads the builder, which needs this module
    from fingerprint.dictionary.sampling import (  # lazy: keeps numba, zarr off import
        ParameterSpace,
    )

    recipe = get_recipe(name)
    model = recipe.build_model()
    units = dict(model.parameter_units)
    labels = {v: k for k, v in recipe.maps.items()}
    space = ParameterSpace.from_model(model)
    ranges = dict(recipe.sampling.get("ranges", {}))
    params = []
    for p in space.parameters:
        bounds = [list(b) for b in p.bounds]
        if p.kind == "orientation":
            bounds_text = "unit sphere (theta in [0, pi], phi in [-pi, pi])"
        else:
            lo, hi = ranges.get(p.name, bounds[0])
            bounds_text = f"{_fmt(lo)} to {_fmt(hi)}"
        params.append({"name": p.name, "label": labels.get(p.name, ""), "kind": p.kind,
                       "units": units.get(p.name, "n/a"), "bounds": bounds_text})
    constraints = []
    tables = [("model", recipe.model_description)] + \
        [(f"distributed.{k}", v) for k, v in recipe.distributed.items()]
    for _, table in tables:
        for method, *args in table.get("links", []):
            if method == "set_fixed_parameter":
                constraints.append(f"{args[0]} fixed at {args[1]}")
            elif method == "set_equal_parameter":
                constraints.append(f"{args[0]} equal to {args[1]}")
            elif method == "set_tortuous_parameter":
                constraints.append(f"{args[0]} tortuous: {args[1]} x (1 - intra fraction "
                                   f"{', '.join(args[2:])})")
            elif method == "set_parameter_optimization_bounds":
                constraints.append(f"{args[0]} bounded to {args[1][0]:g} to {args[1][1]:g}")
    req = dict(recipe.requirements)
    spherical_mean = bool(getattr(model, "is_spherical_mean", False))
    card = dict(model.parameter_cardinality)
    n_free = int(sum(card.values())) - (1 if len(space.partial_volume_names) >= 2 else 0)
    requirements = []
    if requires_timing(recipe.name):
        requirements.append("pulse timing (delta, Delta)")
    shells = int(req.get("min_shells", 0))
    if spherical_mean:
        shells = max(shells, 2, n_free)
    if shells:
        requirements.append(f"at least {shells} diffusion-weighted shells")
    if "min_bmax" in req:
        requirements.append(f"largest b-value at least {req['min_bmax'] / 1e6:g} s/mm²")
    dirs = int(req.get("min_directions", 0))
    if not spherical_mean and recipe.solver != "dti":
        dirs = max(dirs, n_free)
    if dirs:
        requirements.append(f"at least {dirs} distinct gradient directions")
    derived = derived_map_specs(recipe.name)
    maps = {label: f"{pname} ({units.get(pname, 'n/a')})" for label, pname
            in recipe.maps.items()}
    maps.update({label: f"{spec.description} ({spec.units})"
                 for label, spec in derived.items()})
    return {
        "name": recipe.name,
        "description": recipe.description,
        "reference": recipe.reference,
        "class": str(recipe.model_description.get("class", "MultiCompartmentModel")),
        "spherical_mean": spherical_mean,
        "solver": recipe.solver or "fingerprint (or any registered solver)",
        "dictionary_size": recipe.sampling.get("size"),
        "default_refine": None if recipe.refine is None else _REFINE_TEXT[recipe.refine],
        "count_penalty": None if recipe.count_penalty is None else (
            f"fascicle count chosen with a penalty of {recipe.count_penalty:g} per "
            "parameter (the recipe's; the BIC's is log N)"),
        "posterior": None if recipe.posterior_neighbors is None else (
            f"scalar parameters are the Rician posterior mean over the "
            f"{recipe.posterior_neighbors} nearest atoms (the recipe's; off with "
            "refine=False)"),
        "free_values": n_free,
        "parameters": params,
        "constraints": constraints,
        "requirements": requirements,
        "maps": maps,
        "common_maps": dict(COMMON_MAPS),
    }


def format_model(name: str) -> str:
    """Plain-text description of a named model (``fingerprint models NAME``)."""
    d = describe_model(name)
    lines = [d["name"], "=" * len(d["name"]), d["description"], "",
             f"Reference: {d['reference'] or 'n/a'}",
             f"Model: {d['class']}; fitted by: {d['solver']}"
             + (f"; dictionary atoms: {d['dictionary_size']}" if d["dictionary_size"] else ""),
             *([f"Default fit: {d['default_refine']} (the recipe's; the refine option "
                "overrides it)"] if d.get("default_refine") else []),
             *([f"Fascicle count: {d['count_penalty']}"] if d.get("count_penalty") else []),
             *([f"Matching: {d['posterior']}"] if d.get("posterior") else []),
             "", "Options:" if d["class"] == "volume model" else
             "Parameters (SI units; bounds of the fit):"]
    for p in d["parameters"]:
        label = f" [{p['label']}]" if p["label"] else ""
        unit = f"{p['units']}, " if p["units"] else ""
        lines.append(f"  {p['name']}{label}: {unit}{p['bounds']}")
    if d["constraints"]:
        lines += ["", "Constraints:"] + [f"  {c}" for c in d["constraints"]]
    lines += ["", "Scheme requirements:"]
    lines += [f"  {r}" for r in d["requirements"]] or ["  none beyond a b=0 and diffusion "
                                                       "weighting"]
    lines += ["", "Output maps:"] + [f"  {k}: {v}" for k, v in d["maps"].items()]
    if d["common_maps"]:
        lines.append("  and " + ", ".join(d["common_maps"]))
    return "\n".join(lines) + "\n"


def models_markdown() -> str:
    """The model catalogue as Markdown (``docs/models.md``, written by
    ``scripts/gen_models_doc.py``)."""
    out = ["# Model catalogue", "",
           "Generated from the recipes in `dictionaries/` by `scripts/gen_models_doc.py`; "
           "do not edit by hand (a test checks that this file is up to date). "
           "`fingerprint models` lists the same models and `fingerprint models NAME` prints "
           "one of them.", "",
           "Every fit also writes " + ", ".join(
               f"`{k}` ({v})" for k, v in COMMON_MAPS.items()) + "; models fitted by "
           "dictionary matching add a `desc-uncertainty` map per scalar map. Parameters "
           "are in SI units (diffusivities m²/s, lengths m, angles rad); bounds are those "
           "of the fit (the dictionary's sampling range where the recipe narrows it).", "",
           "| model | description |", "| --- | --- |"]
    listed = catalogue()
    names = list(listed)
    for name in names:
        first = describe_model(name)["description"].split(". ")[0].rstrip(".")
        out.append(f"| [`{name}`](#{name.replace('_', '-')}) | {first}. |")
    for name in names:
        d = describe_model(name)
        out += ["", f"## {name}", "", d["description"], "",
                f"*Reference:* {d['reference'] or 'n/a'}", "",
                f"*Model:* `{d['class']}`; *fitted by:* {d['solver']}"
                + (f"; *dictionary atoms (default):* {d['dictionary_size']}"
                   if d["dictionary_size"] else ""), "",
                *([f"*Default fit:* {d['default_refine']} (the recipe's; the `refine` "
                   "option overrides it)", ""] if d.get("default_refine") else []),
                *([f"*Fascicle count:* {d['count_penalty']}", ""]
                  if d.get("count_penalty") else []),
                *([f"*Matching:* {d['posterior']}", ""] if d.get("posterior") else []),
                *(["| option | default and meaning |", "| --- | --- |"]
                  if d["class"] == "volume model" else
                  ["| parameter | map | unit | bounds |", "| --- | --- | --- | --- |"])]
        for p in d["parameters"]:
            if d["class"] == "volume model":
                out.append(f"| `{p['name']}` | {p['bounds']} |")
                continue
            out.append(f"| `{p['name']}` | {p['label'] or '—'} | {p['units']} | "
                       f"{p['bounds']} |")
        if d["constraints"]:
            out += ["", "*Constraints:* " + "; ".join(f"`{c}`" for c in d["constraints"])]
        out += ["", "*Scheme requirements (refused otherwise):* "
                + ("; ".join(d["requirements"]) if d["requirements"] else
                   "a b=0 measurement and diffusion weighting")]
        out += ["", "*Output maps:* " + "; ".join(f"`{k}`: {v}" for k, v in d["maps"].items())]
    return "\n".join(out) + "\n"
