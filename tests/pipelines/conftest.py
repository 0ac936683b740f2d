"""Dagster tests run against a throwaway DAGSTER_HOME with telemetry off (nothing leaves the machine)."""

from __future__ import annotations

import os

import pytest

from pipelines.dev import prepare_home


@pytest.fixture(scope="session", autouse=True)
def dagster_home(tmp_path_factory):
    home = prepare_home(tmp_path_factory.mktemp("dagster_home"))  # what `python -m pipelines.dev` does
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


@pytest.fixture
def instance():
    from dagster import DagsterInstance

    with DagsterInstance.ephemeral() as inst:
        yield inst
