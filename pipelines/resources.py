"""Where a site's exports, outputs, keys and mapping live (``SiteConfig``), and which DHT it publishes to (``DhtConfig``).

Values come from environment variables when set (shown as such in the Dagster UI, never baked into
the code location), else from defaults that work from the repository root. A hospital sets them in
the environment ``dagster dev`` / the daemon runs with (see docs/dagster.md):

| variable               | field            | default                                   |
| ---------------------- | ---------------- | ----------------------------------------- |
| QIS_EXPORT_ROOT        | export_root      | ``exports`` (one ``<YYYY-MM-DD>/`` folder per nightly export) |
| QIS_EXPORT_DIR         | export_dir       | unset; set it to read one fixed folder for every partition (demo, tests) |
| QIS_OUT_ROOT           | out_root         | ``out/dagster`` (outputs under ``<out_root>/<YYYY-MM-DD>/``) |
| QIS_SITE_DIR           | site_dir         | unset; the site directory (`qis-fhir keys new`): its signing key and patient-key secret |
| QIS_NETWORK            | network_dir      | unset; the network manifest (or its folder); set with QIS_SITE_DIR |
| QIS_SITE_SECRET        | site_secret_path | unset: the library's default secret path (created 0600 on first use); only without QIS_SITE_DIR |
| QIS_MAPPING_DIR        | mapping_dir      | unset: ``mappings/v2`` of this checkout |
| QIS_VALIDATE           | validation       | ``sample`` (``full``, ``sample`` or ``off``) |
| QIS_ALERT_WEBHOOK      | alert_webhook    | unset: failed runs are alerted by file and log line only (``qis_fhir.alerts``) |
| QIS_BOOTSTRAP          | (DhtConfig) bootstrap | unset: ``HOST:PORT[,HOST:PORT]`` of DHT nodes to publish to and query |
| QIS_BIND               | (DhtConfig) bind | unset: the client's local ``HOST[:PORT]`` (default any address, free port) |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import ConfigurableResource, EnvVar

from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE, DEFAULT_VALIDATE

if TYPE_CHECKING:
    from qis_fhir.mapping.model import MappingSet
    from qis_fhir.stages import SiteSetup


class SiteConfig(ConfigurableResource):
    """One hospital site's paths and extraction settings."""

    export_root: str = "exports"
    export_dir: str | None = None
    out_root: str = "out/dagster"
    site_dir: str | None = None
    network_dir: str | None = None
    site_secret_path: str | None = None
    mapping_dir: str | None = None
    validation: str = DEFAULT_VALIDATE  # full | sample | off (not `validate`: pydantic owns that name)
    sample_rate: float = DEFAULT_SAMPLE_RATE
    alert_webhook: str | None = None  # http(s) URL the run-failure alert JSON is POSTed to

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

    def setup(self) -> SiteSetup:
        """Mapping, patient-key secret, site keys and network, by the rule ``qis-fhir run`` applies
        (``qis_fhir.stages.open_site``): the site directory's secret when a site is configured."""
        from qis_fhir.stages import open_site

        return open_site(mapping_dir=self.mapping_dir, site_dir=self.site_dir, network_dir=self.network_dir,
                         site_secret_path=self.site_secret_path)


class DhtConfig(ConfigurableResource):
    """The DHT nodes a site publishes its packets to and pools the network's evidence from."""

    bootstrap: str | None = None  # HOST:PORT[,HOST:PORT...]
    bind: str | None = None  # the client's local HOST[:PORT]; None: any address, free port

    def addresses(self) -> tuple[tuple[str, int], ...]:
        from qis_fhir.dht.address import parse_addresses
        from qis_fhir.errors import UsageError

        addresses = tuple(parse_addresses(self.bootstrap))
        if not addresses:
            raise UsageError("no DHT node configured to publish to: set QIS_BOOTSTRAP (DhtConfig.bootstrap) to HOST:PORT[,HOST:PORT]")
        return addresses


#: environment variable -> SiteConfig field
ENVIRONMENT: dict[str, str] = {
    "QIS_EXPORT_ROOT": "export_root",
    "QIS_EXPORT_DIR": "export_dir",
    "QIS_OUT_ROOT": "out_root",
    "QIS_SITE_DIR": "site_dir",
    "QIS_NETWORK": "network_dir",
    "QIS_SITE_SECRET": "site_secret_path",
    "QIS_MAPPING_DIR": "mapping_dir",
    "QIS_VALIDATE": "validation",
    "QIS_ALERT_WEBHOOK": "alert_webhook",
}


#: environment variable -> DhtConfig field
DHT_ENVIRONMENT: dict[str, str] = {"QIS_BOOTSTRAP": "bootstrap", "QIS_BIND": "bind"}


def _from_env(cls: type[ConfigurableResource], variables: dict[str, str], environ: dict[str, str] | None) -> Any:
    """``cls`` taking each field from its environment variable when that is set.

    ``EnvVar`` defers reading the value to run time and shows the variable name in the UI; fields
    whose variable is unset keep their defaults (``EnvVar`` itself has no default).
    """
    env = os.environ if environ is None else environ
    return cls(**{field: EnvVar(var) for var, field in variables.items() if env.get(var)})


def site_config_from_env(environ: dict[str, str] | None = None) -> SiteConfig:
    return _from_env(SiteConfig, ENVIRONMENT, environ)


def dht_config_from_env(environ: dict[str, str] | None = None) -> DhtConfig:
    return _from_env(DhtConfig, DHT_ENVIRONMENT, environ)


RESOURCES: dict[str, Any] = {"site": site_config_from_env(), "dht": dht_config_from_env()}
