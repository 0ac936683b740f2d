"""The round's Dagster assets over real node processes on 127.0.0.1, on the real clock: a round opening
today is in its advertise window, so the contribution posts and the reveal and totals are refused."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest
from dagster import materialize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dht"))
from dht_cluster import BASE_SITES, LOOPBACK, joined_cluster, make_network  # noqa: E402

from pipelines.assets.secagg import secagg_contribution, secagg_reveal, secagg_totals  # noqa: E402
from pipelines.resources import DhtConfig, SiteConfig  # noqa: E402
from qis_fhir.packets.manifest import load_manifest  # noqa: E402
from qis_fhir.secagg.round import RoundRef  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _failure_message(result) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.step_failure_data.error.cause.message


def test_the_contribution_posts_and_the_reveal_waits_for_its_window(tmp_path, instance):
    net = make_network(tmp_path / "net", BASE_SITES)
    ref = RoundRef(load_manifest(net.manifest).network_id, "v1", "sbp", "2025", "presence", datetime.now(UTC).date().isoformat())
    round_file = tmp_path / "round.json"
    round_file.write_bytes(orjson.dumps(dataclasses.asdict(ref)))
    np.save(tmp_path / "vector.npy", np.arange(8, dtype=np.uint64))
    config = {"round_file": str(round_file), "state_dir": str(tmp_path / "state"), "vector_file": str(tmp_path / "vector.npy")}
    site = SiteConfig(site_dir=str(net.sites["site-a"].site_dir), network_dir=str(net.net_dir), out_root=str(tmp_path / "out"))
    with joined_cluster(tmp_path / "nodes", net.manifest, 3, 3) as cluster:
        dht = DhtConfig(bootstrap=f"{LOOPBACK}:{cluster.nodes[0].port}", bind=LOOPBACK)
        resources = {"site": site, "dht": dht}
        posted = materialize([secagg_contribution], resources=resources, instance=instance,
                             run_config={"ops": {"secagg_contribution": {"config": config}}})
        assert posted.success
        status = posted.asset_materializations_for_node("secagg_contribution")[0].metadata["status"].value
        assert status["posted"] == "advertise"
        for asset, why in ((secagg_reveal, "it is in the advertise window"), (secagg_totals, "unmasked after its last window closes")):
            refused = materialize([asset], resources=resources, instance=instance, raise_on_error=False,
                                  run_config={"ops": {asset.key.path[-1]: {"config": config}}})
            assert not refused.success and why in _failure_message(refused)
    sent = json.loads((next((tmp_path / "state").glob("*/status.json"))).read_text())
    assert sent["posted"] == "advertise"
