"""Words of the FHIR R4B specification, the only words from a resource that outputs may repeat.

A key name or a ``resourceType`` in an export is input: a hostile or broken exporter can put a
patient's name there. Outputs (the quarantine, ``summary.json``, logs) may name a resource type or
an element only when the R4B specification defines it, and use a fixed word otherwise.

``r4b_resource_types.txt`` lists the 141 concrete resource types of R4B, one a line, as the
``fhir.resources`` R4B models define them (a test rebuilds the list from the models and compares).
Element names are looked up in the ``fhir.resources`` model at their place in the resource.
"""

from __future__ import annotations

import typing
from functools import lru_cache
from pathlib import Path

RESOURCE_TYPES_FILE = Path(__file__).with_name("r4b_resource_types.txt")
NOT_R4B_TYPE = "not_an_r4b_type"  # counts every resourceType that is not an R4B type name
NOT_R4B_ELEMENT = "an element not in the R4B specification"


@lru_cache(maxsize=1)
def resource_types() -> frozenset[str]:
    """The concrete R4B resource type names (``Patient``, ``Observation``...)."""
    return frozenset(RESOURCE_TYPES_FILE.read_text(encoding="ascii").split())


def type_word(resource_type: str) -> str:
    """``resource_type`` if R4B defines it, else ``NOT_R4B_TYPE``."""
    return resource_type if resource_type in resource_types() else NOT_R4B_TYPE


@lru_cache(maxsize=512)
def _fields(model: type) -> dict[str, type | None]:
    """Element name (its JSON name and its Python name) -> the model of its value, if it has one."""
    out: dict[str, type | None] = {}
    for name, info in model.model_fields.items():
        target = _model_of(info.annotation)
        out[name] = target
        if info.alias:
            out[info.alias] = target
    return out


def _model_of(annotation: object) -> type | None:
    """The fhir.resources model a field's annotation names (``Optional[List[CodeableConceptType]]``
    -> CodeableConcept), or None for a primitive."""
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    name = getattr(annotation, "__name__", "")
    if name.endswith("Type") and annotation.__module__ in ("abc", "fhir.resources.R4B.fhirtypes"):
        from fhir.resources.R4B import get_fhir_model_class

        try:
            return get_fhir_model_class(name[: -len("Type")])
        except (KeyError, ValueError, AttributeError):
            return None
    return None


def element_path(resource_model: type, location: tuple) -> str:
    """A validation error's location as a dotted path of R4B element names and list indexes; the
    first part that is neither is replaced by ``NOT_R4B_ELEMENT`` and the rest is dropped."""
    parts: list[str] = []
    model: type | None = resource_model
    for part in location:
        if type(part) is int:
            parts.append(str(part))
            continue
        fields = _fields(model) if model is not None else {}
        if part not in fields:
            parts.append(f"({NOT_R4B_ELEMENT})")
            break
        parts.append(part)
        model = fields[part]
    return ".".join(parts) or "resource"
