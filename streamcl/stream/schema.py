"""The schema of a JSON sample message, checked with pydantic.

Its own module, imported at the first JSON message: a binary stream (the default, and the fast
path) never pays pydantic's import, which is most of what stands between the consumer process's
spawn and its first batch.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, ValidationError

from streamcl.stream.messages import INT64_MAX, INT64_MIN, _clip

_NonNegInt = Annotated[int, Strict(), Field(ge=0, le=INT64_MAX)]
_Int64 = Annotated[int, Strict(), Field(ge=INT64_MIN, le=INT64_MAX)]
_FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]


class SampleMessage(BaseModel):
    """Schema of a JSON sample message (``x``'s numbers and shape are checked with numpy).

    Strict types: ``"3"`` or ``2.5`` is not a label, because silently coercing a producer's
    mistake would train the model on the wrong class. Unknown fields are ignored so producers
    can add their own.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    x: list[Any]
    y: _NonNegInt
    task: _Int64 | None = None
    id: Annotated[str, Strict()] | None = None
    ts: _FiniteFloat | None = None
    dtype: Annotated[str, Strict()] | None = None


_FIELD_CODES = {"x": "bad_shape", "y": "bad_label", "task": "bad_task", "id": "bad_meta",
                "ts": "bad_meta", "dtype": "bad_dtype"}
_FIELD_RULES = {"x": "x must be a list", "y": "y must be a non-negative integer",
                "task": "task must be an integer", "id": "id must be a string",
                "ts": "ts must be a finite number", "dtype": "dtype must be a string"}


def schema_reason(exc: ValidationError) -> str:
    """The dead-letter reason (``code: what``) for a message the schema refused."""
    err = exc.errors(include_url=False)[0]
    field = str(err["loc"][0]) if err["loc"] else "x"
    code = _FIELD_CODES.get(field, "bad_schema")
    if field == "x" and err["type"] == "missing":
        return "bad_schema: x missing"
    if err["type"] == "missing":
        return f"{code}: {field} missing"
    return f"{code}: {_FIELD_RULES.get(field, field)}, got {_clip(repr(err.get('input')))}"


__all__ = ["SampleMessage", "ValidationError", "schema_reason"]
