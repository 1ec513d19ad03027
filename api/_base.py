"""Shared pieces of the tinv.api models: the base class and CEL rule declarations.

Every model field carries a one-sentence description that states its default; the CRD
generator (`tinv.api.crdgen`) copies descriptions, defaults, bounds and enums into the
OpenAPI schema, and the CEL rules declared here become `x-kubernetes-validations`.
The same rules run offline in `tinv.api.validation`, so a rule is written exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

CEL_KEY = "x-kubernetes-validations"


@dataclass(frozen=True)
class Rule:
    """One CEL validation rule, evaluated with `self` bound to the value it is attached to.

    `transition` rules use `oldSelf` and only run on updates (the apiserver skips them on
    create; offline validation skips them unless an old document is given).
    """

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None
    # A CEL expression giving the message from `self` (the apiserver's messageExpression), so a
    # refusal can name the values at fault; `message` stays the fallback when it cannot be evaluated.
    message_expression: str | None = None

    @property
    def transition(self) -> bool:
        return "oldSelf" in self.rule

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        return out


def immutable(what: str) -> Rule:
    """A transition rule that refuses any change after creation."""
    return Rule("self == oldSelf", f"{what} is immutable once the resource exists; create a new resource instead")


def cel(*rules: Rule) -> dict[str, Any]:
    """`json_schema_extra` for a Field: attach CEL rules to that field's schema."""
    return {CEL_KEY: [r.to_schema() for r in rules]}


class Model(BaseModel):
    """Base of every tinv.api model: camelCase in YAML, unknown fields refused.

    Subclasses list object-level CEL rules in `__cel__`; they end up on the object's schema.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    __cel__: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):  # type: ignore[override]
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if cls.__cel__:
            target[CEL_KEY] = [r.to_schema() for r in cls.__cel__]
        return schema

    def to_doc(self) -> dict[str, Any]:
        """The document as Kubernetes stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
