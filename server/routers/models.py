"""/v1/models and /v1/fit-options: the named models the server can fit, and the fit
options a job may ask for (the library's, as its option specs declare them)."""

from __future__ import annotations

from fastapi import APIRouter

from fingerprint.models import available_models

from ..dependencies import CallerKey
from ..forms import OptionInfo, option_infos
from ..schemas import ErrorBody, ModelInfo

router = APIRouter(prefix="/models", tags=["models"])
#: ``/v1/fit-options``
options_router = APIRouter(tags=["models"])


@router.get("", response_model=list[ModelInfo], summary="List the named models",
            responses={401: {"model": ErrorBody}})
def list_models(key: CallerKey) -> list[ModelInfo]:
    """Names and one-line descriptions of the models jobs may ask for."""
    return [ModelInfo(name=n, description=d) for n, d in available_models().items()]


@options_router.get("/fit-options", response_model=list[OptionInfo],
                    summary="The fit options a job may set",
                    responses={401: {"model": ErrorBody}})
def list_fit_options(key: CallerKey) -> list[OptionInfo]:
    """The fit options of ``POST /v1/jobs`` beyond the model, files, prefix, pulse timing
    and ``b0_threshold``: name, kind (int, float, bool, choice, refine), help, the
    library's default, the accepted range and the choices. They come from the library's
    option declarations (solver, neighbours, refinement, the classical solvers'
    settings, ...); a job validates them with the library's options object."""
    return option_infos()
