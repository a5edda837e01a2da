"""Recipes: small TOML descriptions of named models (``dictionaries/*.toml``).

A recipe names a model, describes it declaratively (compartment classes, distributed
models, and the dmipy calls that fix, link and bound parameters, applied in order),
gives its default dictionary sampling and labels its output maps::

    name = "noddi"
    description = "NODDI-Watson: ..."
    requires_timing = false

    [model]
    class = "MultiCompartmentModel"       # or "MultiCompartmentSphericalMeanModel"
    models = ["G1Ball", "bundle"]         # compartment classes or [distributed.*] names
    links = [["set_fixed_parameter", "G1Ball_1_lambda_iso", 3e-9]]

    [distributed.bundle]
    class = "SD1WatsonDistributed"
    models = ["C1Stick", "G2Zeppelin"]
    links = [
      ["set_tortuous_parameter", "G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
       "partial_volume_0"],
      ["set_equal_parameter", "G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par"],
      ["set_fixed_parameter", "G2Zeppelin_1_lambda_par", 1.7e-9],
    ]

    [sampling]                            # fingerprint.dictionary.SamplingSpec fields
    size = 100000
    [sampling.ranges]
    "G1Ball_1_lambda_iso" = [1e-10, 3e-9]

    [maps]                                # output label -> parameter name
    odi = "SD1WatsonDistributed_1_SD1Watson_1_odi"

    [fit]                                 # optional: the model's fit defaults
    refine = "nonlinear"                  # (FIT_DEFAULT_KEYS; a user's option wins)
    count_penalty = 3.0                   # multi-fascicle models: fascicle-count penalty
    posterior_neighbors = 2048            # Rician posterior over this many atoms

Every ``links`` entry is ``[method, *arguments]``, a call of one of
:data:`LINK_METHODS` on the model (or distributed model) with dmipy's positional
arguments, in SI units. Recipes are read from the repository's ``dictionaries/``
directory, or from ``$FINGERPRINT_RECIPE_DIR`` when set.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fingerprint
from fingerprint.errors import InputError, UnknownModelError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties
    from fingerprint.dictionary.sampling import SamplingSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "LINK_METHODS",
    "RECIPE_DIR_ENV",
    "FIT_DEFAULT_KEYS",
    "REQUIREMENT_KEYS",
    "Recipe",
    "TISSUES",
    "load_recipe",
    "load_recipes",
    "recipe_dir",
]

#: Environment variable overriding the recipe directory.
RECIPE_DIR_ENV = "FINGERPRINT_RECIPE_DIR"

#: Model methods a recipe may call to constrain parameters (dmipy names and arguments).
LINK_METHODS = ("set_fixed_parameter", "set_tortuous_parameter", "set_equal_parameter",
                "set_parameter_optimization_bounds")

_MODEL_CLASSES = ("MultiCompartmentModel", "MultiCompartmentSphericalMeanModel")
_COMPARTMENT_MODULES = ("fingerprint.signal_models.cylinder_models",
                        "fingerprint.signal_models.gaussian_models",
                        "fingerprint.signal_models.tensor_models",
                        "fingerprint.signal_models.sphere_models")
_DISTRIBUTED_MODULE = "fingerprint.distributions.distribute_models"
_TOP_KEYS = {"name", "description", "reference", "requires_timing", "model", "distributed",
             "sampling", "maps", "requirements", "derived", "solver", "tissues", "fit"}
#: Fit defaults a recipe may set in its ``[fit]`` table: ``refine`` (true, false or
#: ``"nonlinear"``: the model's default refinement after matching, used by every entry
#: point unless the user gives ``refine``) and ``count_penalty`` (multi-fascicle models:
#: the information-criterion cost of one parameter when the fascicle count is chosen, a
#: number >= 0; unset is log N, the BIC) and ``posterior_neighbors`` (atoms whose Rician
#: posterior gives the matched scalars, :mod:`fingerprint.fitting.posterior`; unset: the
#: matcher's Gaussian-weighted neighbours).
FIT_DEFAULT_KEYS = ("refine", "count_penalty", "posterior_neighbors")
#: Tissues a recipe's top-level compartments may belong to (``tissues = ["csf", "wm"]``):
#: white matter, grey matter, cerebrospinal fluid (multi-tissue fits).
TISSUES = ("wm", "gm", "csf")
#: Scheme requirements a recipe may state (``[requirements]``), checked before every fit
#: by :func:`fingerprint.core.scheme_checks.check_scheme`: diffusion-weighted shells at
#: least, largest b-value at least (s/m²), distinct gradient directions at least.
REQUIREMENT_KEYS = ("min_shells", "min_bmax", "min_directions")


def recipe_dir() -> Path:
    """Directory holding the recipes: ``$FINGERPRINT_RECIPE_DIR``, else the repository's
    ``dictionaries/`` (source checkout or editable install), else the copy a regular
    install puts in ``<prefix>/share/fingerprint/dictionaries``."""
    env = os.environ.get(RECIPE_DIR_ENV)
    if env:
        return Path(env).expanduser()

    checkout = Path(fingerprint.__file__).resolve().parents[1] / "dictionaries"
    installed = Path(sys.prefix) / "share" / "fingerprint" / "dictionaries"
    if not checkout.is_dir() and installed.is_dir():
        return installed
    return checkout


@dataclass(frozen=True)
class Recipe:
    """A named model: declarative description, default sampling and map labels."""

    name: str
    description: str
    requires_timing: bool
    model_description: Mapping[str, Any]
    distributed: Mapping[str, Mapping[str, Any]]
    sampling: Mapping[str, Any]
    maps: Mapping[str, str]
    reference: str = ""
    path: Path | None = field(default=None, compare=False)
    #: scheme requirements beyond timing (:data:`REQUIREMENT_KEYS`, SI units)
    requirements: Mapping[str, float] = field(default_factory=dict)
    #: derived output maps: label -> name of a function of
    #: :data:`fingerprint.derived.DERIVED_MAPS` (e.g. DTI's ``fa``)
    derived: Mapping[str, str] = field(default_factory=dict)
    #: the solver this model is fitted with whatever solver is asked for (``dti``: a
    #: linear tensor fit), or "" (any registered solver)
    solver: str = ""
    #: tissue (:data:`TISSUES`) of each top-level compartment, or () when not declared
    tissues: tuple[str, ...] = ()
    #: the model's default refinement after matching (``[fit] refine``: True, False or
    #: ``'nonlinear'``), or None (the library's default); a user's ``refine`` wins
    refine: bool | str | None = None
    #: the fascicle-count penalty of a multi-fascicle model (``[fit] count_penalty``), or
    #: None (log N, the BIC)
    count_penalty: float | None = None
    #: atoms whose Rician posterior gives the matched scalar parameters (``[fit]
    #: posterior_neighbors``, :mod:`fingerprint.fitting.posterior`), or None (the
    #: matcher's own neighbours and weights)
    posterior_neighbors: int | None = None

    def build_model(self, S0_tissue_responses: ArrayLike | None = None  # noqa: N803
                    ) -> MultiCompartmentModelProperties:
        """A fresh model instance described by this recipe (with dmipy's multi-tissue
        ``S0_tissue_responses``, one per top-level compartment, when given)."""
        return _build(self, S0_tissue_responses)

    def sampling_spec(self, **overrides: Any) -> SamplingSpec:
        """The recipe's default :class:`~fingerprint.dictionary.SamplingSpec`, with
        ``overrides`` (e.g. ``size=``, ``seed=``; ``None`` values ignored) applied."""
        from fingerprint.dictionary.sampling import SamplingSpec  # lazy: keeps numba off import

        spec = SamplingSpec.from_dict(dict(self.sampling))
        return spec.replace(**overrides)


def _where(path: Path | None) -> str:
    return f"recipe {path}" if path is not None else "recipe"


def _parse(data: Mapping[str, Any], path: Path | None) -> Recipe:
    where = _where(path)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; "
                         f"expected some of {sorted(_TOP_KEYS)}")
    for key in ("name", "description", "model"):
        if key not in data:
            raise InputError(f"{where}: missing required field {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise InputError(f"{where}: 'name' must be a lower-case identifier, got {name!r}")
    model = data["model"]
    if not isinstance(model, Mapping):
        raise InputError(f"{where}: [model] must be a table")
    cls = model.get("class", "MultiCompartmentModel")
    if cls not in _MODEL_CLASSES:
        raise InputError(f"{where}: [model] class must be one of {_MODEL_CLASSES}, got {cls!r}")
    distributed = data.get("distributed", {})
    for table_name, table in [("model", model)] + [(f"distributed.{k}", v)
                                                   for k, v in distributed.items()]:
        extra = set(table) - {"class", "models", "links"}
        if extra:
            raise InputError(f"{where}: [{table_name}] has unknown field(s) {sorted(extra)}")
        models = table.get("models")
        if not isinstance(models, list) or not models or \
                not all(isinstance(m, str) for m in models):
            raise InputError(f"{where}: [{table_name}] 'models' must be a non-empty list of "
                             "class or distributed-model names")
        for link in table.get("links", []):
            if not isinstance(link, list) or not link or link[0] not in LINK_METHODS:
                raise InputError(f"{where}: [{table_name}] link {link!r} must be "
                                 f"[method, *arguments] with method one of {LINK_METHODS}")
        if table_name != "model" and "class" not in table:
            raise InputError(f"{where}: [{table_name}] needs a 'class' (e.g. "
                             "'SD1WatsonDistributed')")
    maps = data.get("maps", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in maps.items()):
        raise InputError(f"{where}: [maps] must map labels to parameter names (strings)")
    sampling = dict(data.get("sampling", {}))
    from fingerprint.dictionary.sampling import SamplingSpec  # lazy: keeps numba off import

    try:
        SamplingSpec.from_dict(sampling)
    except InputError as exc:
        raise InputError(f"{where}: [sampling]: {exc}") from None
    requires_timing = data.get("requires_timing", False)
    if not isinstance(requires_timing, bool):
        raise InputError(f"{where}: 'requires_timing' must be true or false")
    requirements = data.get("requirements", {})
    if not isinstance(requirements, Mapping) or set(requirements) - set(REQUIREMENT_KEYS) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                       for v in requirements.values()):
        raise InputError(f"{where}: [requirements] must map some of {REQUIREMENT_KEYS} to "
                         f"positive numbers (b-values in s/m²), got {requirements!r}")
    derived = data.get("derived", {})
    if not isinstance(derived, Mapping) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in derived.items()):
        raise InputError(f"{where}: [derived] must map labels to derived-map names (strings)")
    solver = data.get("solver", "")
    if not isinstance(solver, str):
        raise InputError(f"{where}: 'solver' must be a solver name")
    tissues = data.get("tissues", [])
    if not isinstance(tissues, list) or not all(t in TISSUES for t in tissues) or (
            tissues and len(tissues) != len(model["models"])):
        raise InputError(f"{where}: 'tissues' must list one of {TISSUES} per top-level "
                         f"compartment ({len(model['models'])}), got {tissues!r}")
    fit = data.get("fit", {})
    if not isinstance(fit, Mapping) or set(fit) - set(FIT_DEFAULT_KEYS):
        raise InputError(f"{where}: [fit] may set only {FIT_DEFAULT_KEYS}, got {fit!r}")
    refine = fit.get("refine")
    if isinstance(refine, str) and refine.lower() == "nonlinear":
        refine = "nonlinear"
    elif refine is not None and not isinstance(refine, bool):
        raise InputError(f"{where}: [fit] refine must be true, false or \"nonlinear\", "
                         f"got {refine!r}")
    count_penalty = fit.get("count_penalty")
    if count_penalty is not None and (
            isinstance(count_penalty, bool) or not isinstance(count_penalty, (int, float))
            or not math.isfinite(count_penalty) or count_penalty < 0):
        raise InputError(f"{where}: [fit] count_penalty must be a finite number >= 0, "
                         f"got {count_penalty!r}")
    posterior_neighbors = fit.get("posterior_neighbors")
    if posterior_neighbors is not None and (
            isinstance(posterior_neighbors, bool) or not isinstance(posterior_neighbors, int)
            or posterior_neighbors < 1):
        raise InputError(f"{where}: [fit] posterior_neighbors must be an integer >= 1, "
                         f"got {posterior_neighbors!r}")
    return Recipe(name=name, description=str(data["description"]).strip(),
                  requires_timing=requires_timing, model_description=dict(model),
                  distributed={k: dict(v) for k, v in distributed.items()},
                  sampling=sampling, maps=dict(maps), reference=str(data.get("reference", "")),
                  path=path, requirements={k: float(v) for k, v in requirements.items()},
                  derived=dict(derived), solver=solver, tissues=tuple(tissues),
                  refine=refine,
                  count_penalty=None if count_penalty is None else float(count_penalty),
                  posterior_neighbors=posterior_neighbors)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse one recipe file (InputError naming the file on malformed content)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"recipe {path} is not valid TOML: {exc}") from None
    recipe = _parse(data, path)
    if recipe.name != path.stem:
        raise InputError(f"recipe {path}: name {recipe.name!r} must match the file name")
    return recipe


def load_recipes(directory: str | os.PathLike | None = None) -> dict[str, Recipe]:
    """All recipes of ``directory`` (default :func:`recipe_dir`), by name."""
    directory = Path(directory) if directory is not None else recipe_dir()
    return dict(_load_dir(str(directory.resolve()) if directory.exists() else str(directory),
                          _dir_stamp(directory)))


def _dir_stamp(directory: Path) -> tuple:
    if not directory.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                        for p in directory.glob("*.toml")))


@lru_cache(maxsize=8)
def _load_dir(directory: str, stamp: tuple) -> tuple[tuple[str, Recipe], ...]:
    path = Path(directory)
    if not path.is_dir():
        return ()
    return tuple((p.stem, load_recipe(p)) for p in sorted(path.glob("*.toml")))


# --------------------------------------------------------------------------- building
def _compartment_class(name: str, where: str) -> Any:
    if not name.isidentifier() or name.startswith("_"):
        raise InputError(f"{where}: {name!r} is not a compartment class name")
    for module_name in _COMPARTMENT_MODULES:
        module = importlib.import_module(module_name)
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    raise InputError(f"{where}: unknown compartment class {name!r} (looked in "
                     f"{', '.join(_COMPARTMENT_MODULES)})")


def _apply_links(obj: Any, links: list[list[Any]], where: str) -> None:
    for link in links:
        method, *args = link
        try:
            getattr(obj, method)(*args)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where}: {method}{tuple(args)!r} failed: {exc}") from exc


def _build(recipe: Recipe, s0_responses: Any = None) -> Any:
    where = _where(recipe.path)
    framework = importlib.import_module("fingerprint.core.modeling_framework")
    distribute = None
    built_distributed: dict[str, Any] = {}

    def make(name: str) -> Any:
        nonlocal distribute
        if name in recipe.distributed:
            table = recipe.distributed[name]
            if distribute is None:
                distribute = importlib.import_module(_DISTRIBUTED_MODULE)
            cls = getattr(distribute, table["class"], None)
            if not isinstance(cls, type):
                raise InputError(f"{where}: unknown distributed model class {table['class']!r}")
            inner = [make(m) for m in table["models"]]
            obj = cls(models=inner)
            _apply_links(obj, table.get("links", []), f"{where} [distributed.{name}]")
            built_distributed[name] = obj
            return obj
        return _compartment_class(name, where)()

    description = recipe.model_description
    models = [make(m) for m in description["models"]]
    cls = getattr(framework, description.get("class", "MultiCompartmentModel"))
    model = cls(models=models, S0_tissue_responses=s0_responses)
    _apply_links(model, description.get("links", []), f"{where} [model]")
    return model


def unknown_model(name: str, names: list[str]) -> UnknownModelError:
    """The error for an unknown model name, listing the available ones."""
    listed = ", ".join(names) if names else "(none: no recipes found in " \
        f"{recipe_dir()})"
    return UnknownModelError(f"unknown model {name!r}; available models: {listed}")
