"""The text fields of the multipart forms, as pydantic models.

The fit form's options are learned from the library: every fit option whose
:class:`~fingerprint.fitting.options.OptionSpec` has ``server=True`` becomes a field of
:data:`FitForm` (name, type, bounds and help from the spec), and the values a client
gives are validated once by :class:`~fingerprint.fitting.options.FitOptions`, whose
errors name the option. The server adds only what the library cannot know: tighter
bounds where a value costs the server (:data:`SERVER_HIGH`), the form fields of the job
itself (model, output prefix, pulse timing, ``b0_threshold`` in s/mm²) and the 422
answer naming the field at fault.

Forms arrive through :func:`server.storage.receive_multipart` (streamed, bounded);
:func:`parse_form` turns its text fields into one of these models.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import ErrorDetails

from fingerprint.errors import InputError
from fingerprint.fitting.options import (
    FIT_OPTION_SPECS,
    RESPONSES_MAX_LENGTH,
    FitOptions,
    OptionError,
    OptionSpec,
    check_prefix,
    check_timing,
)

from .errors import ApiError

__all__ = ["SERVER_HIGH", "SERVER_OPTION_SPECS", "DictionaryForm", "FitForm", "JobForm",
           "ModelForm", "OptionInfo", "check_multi_tissue", "fit_options", "option_infos",
           "parse_form"]

#: The fit options the server offers (the library's specs marked ``server``).
SERVER_OPTION_SPECS: tuple[OptionSpec, ...] = tuple(s for s in FIT_OPTION_SPECS if s.server)
#: Upper bounds of the server tighter than the library's (threads of one job).
SERVER_HIGH: dict[str, float] = {"threads": 256}
#: Largest ``b0_threshold`` accepted (s/mm²).
B0_THRESHOLD_HIGH = 1e5


class _Form(BaseModel):
    """A form's text fields: unknown names are refused (the receiver refuses them first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _timing(name: str, value: float | None) -> float | None:
    try:
        return check_timing(name, value, flag=f"'{name}'")
    except InputError as exc:
        raise ValueError(str(exc)) from None


class _TimingForm(_Form):
    """The pulse timing of the acquisition, in seconds (for models that need it)."""

    delta: float | None = Field(None, description="gradient pulse duration (s), for models "
                                                  "that need timing")
    Delta: float | None = Field(None, description="gradient pulse separation (s)")
    TE: float | None = Field(None, description="echo time (s)")

    @field_validator("delta", "Delta", "TE", mode="after")
    @classmethod
    def _seconds(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _timing(str(info.field_name), value)

    def timing(self) -> dict[str, float]:
        """The timing given (``delta``, ``Delta``, ``TE``; s)."""
        values = {"delta": self.delta, "Delta": self.Delta, "TE": self.TE}
        return {k: float(v) for k, v in values.items() if v is not None}


class ModelForm(_TimingForm):
    """A job's model (by name) and the pulse timing of the acquisition."""

    model: str | None = Field(None, description="named model (GET /v1/models); default: "
                                                "the server's default model")


class JobForm(ModelForm):
    """The fit form's own fields (beyond the fit options and the files)."""

    prefix: str | None = Field(None, description="BIDS prefix of the output files "
                                                 "(sub-01_ses-1)")
    b0_threshold: float | None = Field(
        None, ge=0, lt=B0_THRESHOLD_HIGH,
        description="b-value (s/mm²) at or below which measurements are the b=0 reference "
                    "that normalises S0 (default 10); the forward models use every "
                    "measurement's own b-value")

    @field_validator("prefix", mode="after")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        try:
            return check_prefix(value, label="'prefix'")
        except InputError as exc:
            raise ValueError(str(exc)) from None


def _option_field(spec: OptionSpec) -> tuple[Any, Any]:
    """(type, Field) of the form field of fit option ``spec``."""
    high = SERVER_HIGH.get(spec.name, spec.high)
    extra: dict[str, Any] = {"x-fit-option": spec.kind}
    if spec.kind == "int":
        return int | None, Field(None, ge=spec.low, le=high, description=spec.help,
                                 json_schema_extra=extra)
    if spec.kind == "float":
        return float | None, Field(None, ge=spec.low, le=high, description=spec.help,
                                   json_schema_extra=extra)
    if spec.kind == "bool":
        return bool | None, Field(None, description=spec.help, json_schema_extra=extra)
    if spec.kind == "text":  # checked by FitOptions (e.g. multi-tissue responses)
        return str | None, Field(None, max_length=RESPONSES_MAX_LENGTH, description=spec.help,
                                 json_schema_extra=extra)
    # choices and 'refine' stay text: FitOptions checks them (and explains a refusal,
    # such as dmipy's 'amico' solver); the schema lists what is offered
    choices = list(spec.choices) if spec.kind == "choice" else ["true", "false", "nonlinear"]
    extra["enum"] = choices
    return str | None, Field(None, max_length=64, description=spec.help,
                             json_schema_extra=extra)


#: The fit form: :class:`JobForm` plus one field per offered fit option.
FitForm: type[JobForm] = create_model(  # type: ignore[call-overload]
    "FitForm", __base__=JobForm, __doc__="The text fields of a fit job's form.",
    **{spec.name: _option_field(spec) for spec in SERVER_OPTION_SPECS})


class DictionaryForm(ModelForm):
    """The text fields of a dictionary prebuild."""

    size: int | None = Field(None, ge=1, description="atoms (default: the model's)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the dictionary's sampling")


F = TypeVar("F", bound=BaseModel)


def _message(error: ErrorDetails) -> str:
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def parse_form(form: type[F], fields: dict[str, str]) -> F:
    """``fields`` (text fields of a multipart form; empty values are absent) as ``form``;
    422 naming the first field at fault otherwise."""
    values = {k: v for k, v in fields.items() if v != ""}
    try:
        return form.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        name = loc[0] if loc else None
        message = _message(first)
        if name and f"'{name}'" not in message:
            raw = str(values.get(name, ""))[:40]
            message = f"'{name}': {message}" + (f" (got {raw!r})" if raw else "")
        raise ApiError(422, message, name) from None


def fit_options(form: JobForm, *, b0_threshold: float | None = None
                ) -> tuple[FitOptions, dict[str, object]]:
    """The :class:`FitOptions` of a fit form's option fields (validated by the library;
    422 naming the option), and the options given, as the job records them (the library's
    normalised values; ``b0_threshold`` in s/m² as the library takes it)."""
    given = {s.name: getattr(form, s.name) for s in SERVER_OPTION_SPECS
             if getattr(form, s.name, None) is not None}
    if b0_threshold is not None:
        given["b0_threshold"] = float(b0_threshold) * 1e6
    try:
        options = FitOptions.from_mapping(given)
    except OptionError as exc:
        message = str(exc)
        if exc.option and f"'{exc.option}'" not in message:
            message = f"'{exc.option}': {message}"
        raise ApiError(422, message, exc.option) from None
    except InputError as exc:
        raise ApiError(422, str(exc)) from None
    normalised = options.to_dict()
    return options, {name: normalised[name] for name in given}


def check_multi_tissue(model: str, responses: str) -> None:
    """422 naming ``multi_tissue`` when the responses cannot apply to ``model`` (wrong
    count, tissues the model's recipe does not list, a one-compartment model)."""
    from fingerprint.fitting.multi_tissue import check_responses  # lazy: the fitting stack

    try:
        check_responses(model, responses)
    except InputError as exc:
        raise ApiError(422, f"'multi_tissue': {exc}", "multi_tissue") from None


class OptionInfo(BaseModel):
    """A fit option the server offers (from the library's option specs)."""

    name: str = Field(..., description="form field of POST /v1/jobs")
    kind: Literal["int", "float", "bool", "choice", "refine", "text"]
    help: str
    default: str | int | float | bool | None = Field(
        None, description="the library's default (null: chosen per model or machine)")
    low: float | None = None
    high: float | None = None
    choices: list[str] = Field(default_factory=list)


def option_infos() -> list[OptionInfo]:
    """The offered fit options with the library's defaults and the server's bounds."""
    defaults = FitOptions().to_dict()
    out = []
    for spec in SERVER_OPTION_SPECS:
        default = defaults.get(spec.name)
        choices = (list(spec.choices) if spec.kind == "choice" else
                   ["true", "false", "nonlinear"] if spec.kind == "refine" else [])
        out.append(OptionInfo(
            name=spec.name, kind=spec.kind, help=spec.help,
            default=default if isinstance(default, (str, int, float, bool)) else None,
            low=spec.low, high=SERVER_HIGH.get(spec.name, spec.high), choices=choices))
    return out



def _plain(prop: dict[str, Any]) -> dict[str, Any]:
    """A property of a form's JSON schema without its null branch (a form field is
    either given or absent, never null)."""
    out = {k: v for k, v in prop.items() if k not in ("anyOf", "default", "title")}
    for branch in prop.get("anyOf", ()):
        if branch.get("type") != "null":
            out.update(branch)
    if prop.get("default") is not None:
        out["default"] = prop["default"]
    return out


def multipart_body(form: type[BaseModel], files: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a multipart form: ``files`` (field -> (description,
    required)) and the text fields of ``form`` as its JSON schema describes them."""
    schema = form.model_json_schema()
    properties: dict[str, Any] = {
        name: {"type": "string", "format": "binary", "description": text}
        for name, (text, _) in files.items()}
    properties.update({name: _plain(prop) for name, prop in schema["properties"].items()})
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [n for n, (_, req) in files.items() if req],
        "additionalProperties": False, "properties": properties}}}}}
