"""Optional full model validation with fhir.resources R4B (pydantic).

The strict field checks in ``fields.py`` run on every resource. Model validation checks the whole
resource against the FHIR R4 structure, at ~30-70x the cost of a JSON parse, so it is a choice:
``full`` validates every resource, ``sample`` a deterministic sample (every ``stride``-th line of each
file, starting with its first: the same export always validates the same lines, every file has at
least its first line checked, and choosing a line costs one integer test, where hashing each line to
decide cost ~15 % of a parse), ``off`` none.

Errors are reported by *location* only (``valueQuantity.value``): pydantic's messages and inputs can
quote the resource, which may hold identifiers. A location names an element only where the R4B model
defines it (``r4b.element_path``): an unknown key is the input's own text (a name, an id) and is
reported as "an element not in the R4B specification".
"""

from __future__ import annotations

import importlib
import re

from qis_fhir.fhir.r4b import element_path

MODES = ("full", "sample", "off")
DEFAULT_VALIDATE = "sample"  # every command, the pipeline and the Dagster resource default to it
# The default share of resources validated against the R4B models in ``sample`` mode. A model
# validation costs ~100x a parse; at 0.2% it adds ~0.2 us a line (docs/extract.md) and still checks
# 2,000 resources of a million-resource export: enough to catch an export in the wrong structure
# (wrong FHIR version, a server bug), which is what sampling is for. Every value the pipeline reads
# is strictly checked on every line regardless.
DEFAULT_SAMPLE_RATE = 0.002
# pydantic's error types are its own snake_case words; anything else is shown as "invalid"
_ERROR_TYPE = re.compile(r"[a-z_]{1,40}")

_MODEL_MODULES = {
    "Patient": "fhir.resources.R4B.patient",
    "Condition": "fhir.resources.R4B.condition",
    "MedicationRequest": "fhir.resources.R4B.medicationrequest",
    "Observation": "fhir.resources.R4B.observation",
    "Medication": "fhir.resources.R4B.medication",
    "Encounter": "fhir.resources.R4B.encounter",
}


def sample_stride(mode: str, rate: float) -> int | None:
    """Validate lines 1, 1 + k, 1 + 2k... of each file (entries of a Bundle): this k, or None for none.

    ``full`` is k = 1; ``sample`` is k = round(1 / rate), so the rate actually used is 1 / k
    (``effective_rate``); ``off``, or a rate of 0, validates nothing.
    """
    if mode not in MODES:
        raise ValueError(f"validate must be one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if mode == "full":
        return 1
    if not 0.0 <= rate <= 1.0:
        raise ValueError("sample rate must be between 0 and 1")
    if rate == 0.0:
        return None
    return max(1, round(1.0 / rate))


def effective_rate(stride: int | None) -> float:
    """The share of lines a stride validates."""
    return 0.0 if stride is None else 1.0 / stride


class ModelValidator:
    """Validates raw resource JSON against the R4B model of its type; imports models lazily."""

    def __init__(self) -> None:
        self._models: dict[str, type] = {}
        self.validated = 0

    def _model(self, resource_type: str) -> type:
        model = self._models.get(resource_type)
        if model is None:
            module = importlib.import_module(_MODEL_MODULES[resource_type])
            model = getattr(module, resource_type)
            self._models[resource_type] = model
        return model

    def check(self, resource_type: str, raw: bytes) -> str | None:
        """None when valid, else a detail naming the failing locations (never the values)."""
        from pydantic import ValidationError

        model = self._model(resource_type)
        self.validated += 1
        try:
            model.model_validate_json(raw)
        except ValidationError as exc:
            locations = []
            for err in exc.errors(include_url=False, include_context=False, include_input=False):
                loc = element_path(model, tuple(p for p in err.get("loc", ()) if p != "__root__"))
                kind = err.get("type", "")
                locations.append(f"{loc} ({kind if _ERROR_TYPE.fullmatch(kind) else 'invalid'})")
                if len(locations) == 3:
                    break
            more = exc.error_count() - len(locations)
            suffix = f" and {more} more" if more > 0 else ""
            return "R4B model rejected: " + "; ".join(locations) + suffix
        except Exception as exc:  # fhir.resources raises plain ValueErrors for some structural checks
            return f"R4B model rejected the resource ({type(exc).__name__})"
        return None
