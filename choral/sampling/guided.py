"""vLLM's structured-output parameters (``GuidedDecodingParams``, now ``StructuredOutputsParams``),
turned into the one constraint choral's grammar engine takes: a JSON schema, a regex or a grammar.

``SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))`` and
``SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`` port unchanged from
vLLM; a dict with the same keys works too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from choral.errors import InvalidRequestError

_BACKENDS = (None, "auto", "guidance", "llguidance")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON schema: dict, JSON text, or a pydantic model class),
    ``json_object`` (any JSON object), ``regex``, ``choice`` (one of these strings) or ``grammar``
    (GBNF/EBNF or Lark). ``backend`` may name llguidance (the only engine here) or be left unset."""

    json: Any = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:  # frozen and hashable, like the rest of SamplingParams
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence):
                raise InvalidRequestError(f"choice: must be a list of strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", json.dumps(self.json, sort_keys=True))


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name for the same parameters


def as_structured(name: str, value: Any) -> StructuredOutputsParams:
    """``value`` (a StructuredOutputsParams, vLLM's own object of that shape, or a dict) checked."""
    if isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, Mapping):
        options = dict(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        options = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    else:
        raise InvalidRequestError(f"{name}: must be a StructuredOutputsParams or a dict, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(StructuredOutputsParams)}
    unknown = sorted(k for k, v in options.items() if k not in known and v not in (None, False))
    if unknown:
        raise InvalidRequestError(f"{name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return StructuredOutputsParams(**{k: v for k, v in options.items() if k in known})


def to_constraint(name: str, params: StructuredOutputsParams) -> tuple[str, str]:
    """(``json_schema`` | ``regex`` | ``grammar``, its text) for the sampler's grammar engine."""
    if params.backend not in _BACKENDS:
        raise InvalidRequestError(f"{name}.backend: {params.backend!r} is not available; choral's structured "
                                  "output runs on llguidance (leave backend unset, or 'guidance')")
    for flag in ("structural_tag", "whitespace_pattern"):
        if getattr(params, flag) is not None:
            raise InvalidRequestError(f"{name}.{flag}: not supported")
    for flag in ("disable_any_whitespace", "disable_additional_properties"):
        if getattr(params, flag):
            raise InvalidRequestError(f"{name}.{flag}: not supported (JSON follows the schema as written)")
    given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
             if getattr(params, k) not in (None, False)]
    if len(given) != 1:
        what = ", ".join(given) if given else "none"
        raise InvalidRequestError(f"{name}: set exactly one of json, regex, choice, grammar, json_object "
                                  f"(got {what})")
    kind = given[0]
    if kind == "json":
        return "json_schema", _schema_text(name, params.json)
    if kind == "json_object":
        return "json_schema", '{"type": "object"}'
    if kind == "choice":
        choices = list(params.choice or ())
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequestError(f"{name}.choice: must be a non-empty list of non-empty strings")
        # A grammar of string literals: no regex escaping rules to get right.
        return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    value = getattr(params, kind)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name}.{kind}: must be a non-empty string, got {value!r}")
    return kind, value


def _schema_text(name: str, schema: Any) -> str:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        return json.dumps(schema.model_json_schema(), sort_keys=True)
    if isinstance(schema, bool):
        return json.dumps(schema)
    if isinstance(schema, str):
        return schema
    raise InvalidRequestError(f"{name}.json: must be a JSON schema (dict or JSON text), got {type(schema).__name__}")
