"""/v1/models: the named models the server can fit."""

from __future__ import annotations

from fastapi import APIRouter

from ..dependencies import CallerKey
from ..schemas import ErrorBody, ModelInfo

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=list[ModelInfo], summary="List the named models",
            responses={401: {"model": ErrorBody}})
def list_models(key: CallerKey) -> list[ModelInfo]:
    """Names and one-line descriptions of the models jobs may ask for."""
    from fingerprint.models import available_models

    return [ModelInfo(name=n, description=d) for n, d in available_models().items()]
