"""What the round steps refuse to start from: a round file or a vector that is not what it must be."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from qis_fhir.errors import ExitCode, QisError
from qis_fhir.secagg.steps import read_round, read_vector

ROUND = {"network_id": "net-a", "mapping_version": "v1", "measure": "sbp", "period": "2025", "stage": "presence", "opens": "2026-03-02"}


def test_a_round_file_reads_back_as_its_reference(tmp_path):
    path = tmp_path / "round.json"
    path.write_bytes(orjson.dumps(ROUND))
    assert read_round(path).opens == "2026-03-02" and read_round(path).stage == "presence"


@pytest.mark.parametrize("change", [{"opens": "2026-3-2"}, {"opens": "next week"}, {"stage": "final"}, {"measure": None}])
def test_a_malformed_round_file_is_refused_by_name(tmp_path, change):
    path = tmp_path / "round.json"
    doc = {**ROUND, **change}
    path.write_bytes(orjson.dumps({k: v for k, v in doc.items() if v is not None}))
    with pytest.raises(QisError, match="is not a round reference") as err:
        read_round(path)
    assert err.value.exit_code == ExitCode.INPUT_NOT_FOUND


@pytest.mark.parametrize("array", [np.arange(4, dtype=np.int64), np.zeros((2, 2), dtype=np.uint64), np.zeros(0, dtype=np.uint64)])
def test_a_vector_must_be_a_non_empty_1d_uint64_array(tmp_path, array):
    path = tmp_path / "v.npy"
    np.save(path, array)
    with pytest.raises(QisError, match="non-empty 1-D uint64"):
        read_vector(path)


def test_a_pickled_vector_is_not_loaded(tmp_path):
    path = tmp_path / "v.npy"
    np.save(path, np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    with pytest.raises(QisError, match="not a .npy array of numbers"):
        read_vector(path)


def test_a_value_round_opening_before_its_presence_round_is_unmasked_is_refused(tmp_path):
    from qis_fhir.errors import UsageError
    from qis_fhir.packets.manifest import create_network
    from qis_fhir.secagg.steps import open_round

    create_network(tmp_path / "net", network_id="net-a")
    presence, value = tmp_path / "presence.json", tmp_path / "value.json"
    presence.write_bytes(orjson.dumps(ROUND))
    value.write_bytes(orjson.dumps({**ROUND, "stage": "value", "opens": "2026-03-08"}))  # presence unmasks 2026-03-09
    with pytest.raises(UsageError, match="before its presence round can be unmasked"):
        open_round(value, network_dir=tmp_path / "net", state_dir=tmp_path / "state", bootstrap=(), after=presence)
    value.write_bytes(orjson.dumps({**ROUND, "stage": "value", "opens": "2026-03-09"}))
    with pytest.raises(QisError, match="has not been unmasked at this site"):  # in time; the presence result is what is missing
        open_round(value, network_dir=tmp_path / "net", state_dir=tmp_path / "state", bootstrap=(), after=presence)
