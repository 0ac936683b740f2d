"""The R4B words outputs may repeat: the resource type list matches the fhir.resources R4B models, and
element paths name only elements those models define at that place."""

from __future__ import annotations

import importlib
import pkgutil

from qis_fhir.fhir.r4b import NOT_R4B_TYPE, element_path, resource_types, type_word


def test_the_resource_type_list_is_the_concrete_r4b_resources_of_fhir_resources():
    import fhir.resources.R4B as r4b
    from fhir.resources.R4B.resource import Resource

    found = set()
    for module in pkgutil.iter_modules(r4b.__path__):
        for name, value in vars(importlib.import_module(f"fhir.resources.R4B.{module.name}")).items():
            if isinstance(value, type) and issubclass(value, Resource) and value.__module__.endswith(f".{module.name}") \
                    and name == getattr(value, "__resource_type__", None):
                found.add(name)
    found -= {"Resource", "DomainResource"}  # abstract: no resource has them as its resourceType
    assert resource_types() == found
    assert len(found) == 141


def test_type_word_keeps_r4b_types_and_replaces_anything_else():
    assert type_word("Encounter") == "Encounter"
    assert type_word("encounter") == NOT_R4B_TYPE
    assert type_word("Fredrick_Kris") == NOT_R4B_TYPE
    assert type_word("Resource") == NOT_R4B_TYPE


def test_element_path_walks_the_models_and_stops_at_the_first_unknown_key():
    from fhir.resources.R4B.observation import Observation

    assert element_path(Observation, ("component", 1, "valueQuantity", "value")) == "component.1.valueQuantity.value"
    assert element_path(Observation, ("_status", "extension")) == "_status.extension"  # a primitive's extension
    assert element_path(Observation, ("code", "coding", 0, "Fredrick", "id")) == \
        "code.coding.0.(an element not in the R4B specification)"
    assert element_path(Observation, ("valueQuantity", "value", "x")) == \
        "valueQuantity.value.(an element not in the R4B specification)"  # a primitive has no elements
    assert element_path(Observation, ()) == "resource"
