"""SiteConfig: environment variables choose the paths, resolved when a run starts."""

# no `from __future__ import annotations` here: Dagster reads the resource annotation of `probe`

import pytest
from dagster import asset, materialize

from pipelines.resources import DhtConfig, SiteConfig, dht_config_from_env, site_config_from_env
from qis_fhir.errors import UsageError


def test_defaults_work_from_the_repository_root():
    site = site_config_from_env({})
    assert site.export_path("2026-01-02").as_posix() == "exports/2026-01-02"
    assert site.out_path("2026-01-02").as_posix() == "out/dagster/2026-01-02"
    assert site.validation == "sample"


def test_environment_variables_choose_values(monkeypatch, tmp_path, instance):
    monkeypatch.setenv("QIS_EXPORT_ROOT", str(tmp_path / "exports"))
    monkeypatch.setenv("QIS_OUT_ROOT", str(tmp_path / "out"))
    monkeypatch.setenv("QIS_VALIDATE", "full")
    monkeypatch.setenv("QIS_ALERT_WEBHOOK", "http://127.0.0.1:8080/qis")
    site = site_config_from_env()
    seen = {}

    @asset
    def probe(site: SiteConfig) -> None:
        seen["export"] = site.export_path("2026-01-02")
        seen["out"] = site.out_path("2026-01-02")
        seen["validation"] = site.validation
        seen["webhook"] = site.alert_webhook

    assert materialize([probe], resources={"site": site}, instance=instance).success
    assert seen == {
        "export": tmp_path / "exports" / "2026-01-02",
        "out": tmp_path / "out" / "2026-01-02",
        "validation": "full",
        "webhook": "http://127.0.0.1:8080/qis",
    }


def test_fixed_export_dir_overrides_the_dated_folders(tmp_path):
    assert SiteConfig(export_dir=str(tmp_path / "demo")).export_path("2026-01-02") == tmp_path / "demo"


def test_the_dht_resource_reads_its_nodes_from_the_environment(monkeypatch, instance):
    monkeypatch.setenv("QIS_BOOTSTRAP", "127.0.0.1:4000,[::1]:4001")
    monkeypatch.setenv("QIS_BIND", "127.0.0.1")
    dht = dht_config_from_env()
    seen = {}

    @asset
    def probe(dht: DhtConfig) -> None:
        seen["addresses"], seen["bind"] = dht.addresses(), dht.bind

    assert materialize([probe], resources={"dht": dht}, instance=instance).success
    assert seen == {"addresses": (("127.0.0.1", 4000), ("::1", 4001)), "bind": "127.0.0.1"}
    with pytest.raises(UsageError, match="set QIS_BOOTSTRAP"):
        dht_config_from_env({}).addresses()
