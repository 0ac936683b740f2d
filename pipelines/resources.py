"""Where a site's exports, outputs, secret and mapping live: one ``SiteConfig`` resource.

Values come from environment variables when set (shown as such in the Dagster UI, never baked into
the code location), else from defaults that work from the repository root. A hospital sets them in
the environment ``dagster dev`` / the daemon runs with (see docs/dagster.md):

| variable               | field            | default                                   |
| ---------------------- | ---------------- | ----------------------------------------- |
| QIS_EXPORT_ROOT        | export_root      | ``exports`` (one ``<YYYY-MM-DD>/`` folder per nightly export) |
| QIS_EXPORT_DIR         | export_dir       | unset; set it to read one fixed folder for every partition (demo, tests) |
| QIS_OUT_ROOT           | out_root         | ``out/dagster`` (outputs under ``<out_root>/<YYYY-MM-DD>/``) |
| QIS_SITE_SECRET        | site_secret_path | unset: the library's default secret path (created 0600 on first use) |
| QIS_MAPPING_DIR        | mapping_dir      | unset: ``mappings/v1`` of this checkout |
| QIS_VALIDATE           | validation       | ``sample`` (``full``, ``sample`` or ``off``) |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import ConfigurableResource, EnvVar

from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE, DEFAULT_VALIDATE

if TYPE_CHECKING:
    from qis_fhir.mapping.model import MappingSet


class SiteConfig(ConfigurableResource):
    """One hospital site's paths and extraction settings."""

    export_root: str = "exports"
    export_dir: str | None = None
    out_root: str = "out/dagster"
    site_secret_path: str | None = None
    mapping_dir: str | None = None
    validation: str = DEFAULT_VALIDATE  # full | sample | off (not `validate`: pydantic owns that name)
    sample_rate: float = DEFAULT_SAMPLE_RATE

    def export_path(self, partition_key: str) -> Path:
        """The export folder of one daily partition (or the fixed ``export_dir``)."""
        if self.export_dir:
            return Path(self.export_dir)
        return Path(self.export_root) / partition_key

    def out_path(self, partition_key: str) -> Path:
        """Where one partition's outputs go: the ``qis-fhir run --out DIR`` layout, quality reports in ``quality/``."""
        return Path(self.out_root) / partition_key

    def load_mapping(self) -> MappingSet:
        from qis_fhir.mapping import load_mapping

        return load_mapping(self.mapping_dir)

    def secret(self) -> bytes:
        """The site's pseudonymisation secret (created with mode 0600 on first use)."""
        from qis_fhir.privacy.secrets import load_or_create_secret

        return load_or_create_secret(self.site_secret_path)


#: environment variable -> SiteConfig field
ENVIRONMENT: dict[str, str] = {
    "QIS_EXPORT_ROOT": "export_root",
    "QIS_EXPORT_DIR": "export_dir",
    "QIS_OUT_ROOT": "out_root",
    "QIS_SITE_SECRET": "site_secret_path",
    "QIS_MAPPING_DIR": "mapping_dir",
    "QIS_VALIDATE": "validation",
}


def site_config_from_env(environ: dict[str, str] | None = None) -> SiteConfig:
    """``SiteConfig`` taking each field from its environment variable when that is set.

    ``EnvVar`` defers reading the value to run time and shows the variable name in the UI; fields
    whose variable is unset keep their defaults (``EnvVar`` itself has no default).
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {field: EnvVar(var) for var, field in ENVIRONMENT.items() if env.get(var)}
    return SiteConfig(**values)


RESOURCES: dict[str, Any] = {"site": site_config_from_env()}
