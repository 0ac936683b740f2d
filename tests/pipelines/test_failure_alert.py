"""A failed nightly run raises an alert a team can route: the run-failure sensor, evaluated on the
instance the run failed on, writes the alert file and POSTs it to the configured webhook."""

from __future__ import annotations

import json

import pytest
from dagster import build_run_status_sensor_context, materialize

from pipelines.assets import fhir_extract, mapping_set
from pipelines.resources import SiteConfig
from pipelines.sensors import run_failure_alert_sensor

PARTITION = "2026-11-27"


@pytest.fixture
def webhook(receiver):
    server, handler = receiver
    return f"http://127.0.0.1:{server.server_port}/alert", handler.bodies


def _evaluate(result, instance, site):
    context = build_run_status_sensor_context(
        sensor_name=run_failure_alert_sensor.name,
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"site": site},
    ).for_run_failure()
    run_failure_alert_sensor(context)


def _fail_extract_with(raiser, tmp_path, instance, monkeypatch):
    """Run the extract of a present export folder with its merge (``extract_staged_step``) raising what
    ``raiser`` raises, evaluate the sensor, and return the one alert written."""
    import qis_fhir.stages

    monkeypatch.setattr(qis_fhir.stages, "extract_staged_step", raiser)
    (tmp_path / "exports" / PARTITION).mkdir(parents=True)
    (tmp_path / "exports" / PARTITION / "Patient.000.ndjson").write_text('{"resourceType": "Patient", "id": "p1"}\n')
    site = SiteConfig(export_root=str(tmp_path / "exports"), out_root=str(tmp_path / "out"),
                      site_secret_path=str(tmp_path / "site.secret"))
    result = materialize([mapping_set, fhir_extract], partition_key=PARTITION, resources={"site": site},
                         instance=instance, raise_on_error=False)
    assert not result.success
    _evaluate(result, instance, site)
    (path,) = (tmp_path / "out" / "alerts").glob("*.json")
    return path


def test_a_missing_export_folder_raises_an_alert_file_and_webhook(tmp_path, instance, webhook):
    url, received = webhook
    (tmp_path / "exports").mkdir()  # the night's folder never arrived
    site = SiteConfig(export_root=str(tmp_path / "exports"), out_root=str(tmp_path / "out"),
                      site_secret_path=str(tmp_path / "site.secret"), alert_webhook=url)
    result = materialize([mapping_set, fhir_extract], partition_key=PARTITION, resources={"site": site},
                         instance=instance, raise_on_error=False)
    assert not result.success

    _evaluate(result, instance, site)

    files = list((tmp_path / "out" / "alerts").glob("*.json"))
    assert [f.name.endswith(f"-{result.run_id}.json") for f in files] == [True]
    alert = json.loads(files[0].read_text())
    assert (alert["partition"], alert["run_id"], alert["step"]) == (PARTITION, result.run_id, "fhir_extract.plan_extract")
    assert (alert["error_class"], alert["exit_name"]) == ("InputNotFoundError", "INPUT_NOT_FOUND")
    assert alert["message"] == f"export directory {tmp_path / 'exports' / PARTITION} does not exist"
    assert received == [alert]


def test_a_bug_alerts_by_class_without_its_message(tmp_path, instance, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("Maria Jones")  # an arbitrary exception quoting what it found

    path = _fail_extract_with(broken, tmp_path, instance, monkeypatch)
    alert = json.loads(path.read_text())
    assert (alert["error_class"], alert["exit_code"], alert["message"]) == ("KeyError", None, None)
    assert "Maria" not in path.read_text()


def test_a_qis_error_raised_from_another_keeps_its_exit_code(tmp_path, instance, monkeypatch):
    from qis_fhir.errors import SecretError

    def unreadable(*args, **kwargs):
        try:
            raise PermissionError(13, "Permission denied")
        except PermissionError as exc:
            raise SecretError("the site secret is unreadable") from exc

    alert = json.loads(_fail_extract_with(unreadable, tmp_path, instance, monkeypatch).read_text())
    assert (alert["error_class"], alert["exit_name"], alert["message"]) == (
        "SecretError", "SECRET_INVALID", "the site secret is unreadable")
