"""The masking protocol over the DHT, end to end: five sites run a round through the site steps
(``qis_fhir.secagg.steps``: a fresh process state every step, as a nightly run has), over nodes on
127.0.0.1 that enforce the windows on the test's clock; the unmasked totals are the central sum."""

from __future__ import annotations

import stat

import numpy as np
import pytest
from dht_cluster import BASE_SITES, Clock, certify_nodes, make_network, round_nodes_in_thread

from qis_fhir.errors import RoundRepeatedError, RoundWindowError
from qis_fhir.packets.manifest import load_network
from qis_fhir.secagg.round import PHASES, SCHEDULE, RoundRef
from qis_fhir.secagg.steps import RESULT_FILE, SENT_DIR, STATE_FILE, RoundSetup, advance_step, reveal_step, unmask_step

pytestmark = [pytest.mark.timeout(240)]

KSIZE = 3
OPENS = "2026-03-02"
CELLS = 40


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_five_sites_over_the_dht_unmask_exactly_the_central_sum_of_the_contributors(tmp_path):
    net = make_network(tmp_path / "net", BASE_SITES)
    node_identities = certify_nodes(net.manifest, 4)
    context = load_network(net.manifest)
    ref = RoundRef(context.manifest.network_id, "v1", "sbp", "2025", "presence", OPENS)
    rng = np.random.default_rng(11)
    # small counts, and near-2^64 values (two's-complement negatives) that must wrap exactly
    vectors = {s: rng.integers(0, 12, CELLS, dtype=np.uint64) for s in BASE_SITES}
    vectors["site-a"][:3] = np.array([2**64 - 5, 2**64 - 1, 7], dtype=np.uint64)
    dropout = "site-e"  # shares its secrets, then never contributes a masked vector
    clock = Clock(SCHEDULE.starts(OPENS) + 3600)

    with round_nodes_in_thread(net.manifest, clock, node_identities, KSIZE) as addresses:
        setups = {s: RoundSetup(ref, net.sites[s], context, tmp_path / "state" / s, tuple(addresses[:1]), ksize=KSIZE) for s in BASE_SITES}
        for phase in PHASES:
            clock.t = SCHEDULE.closes(OPENS, phase) - 3600  # the last hour of the phase's window
            for s in BASE_SITES:
                if s == dropout and PHASES.index(phase) >= PHASES.index("masked"):
                    continue
                assert advance_step(setups[s], vectors[s], clock=clock)["posted"] == phase
            if phase == "advertise":
                # a second run the same night posts the same bytes again; a changed vector is refused
                assert advance_step(setups["site-b"], vectors["site-b"], clock=clock)["posted"] == "advertise"
                with pytest.raises(RoundRepeatedError, match="one contribution per site"):
                    advance_step(setups["site-b"], vectors["site-b"] + np.uint64(1), clock=clock)
            if phase == "consistency":
                with pytest.raises(RoundWindowError, match="did not post its masked message"):
                    advance_step(setups[dropout], clock=clock)
                with pytest.raises(RoundWindowError, match="in the consistency window"):
                    reveal_step(setups["site-a"], clock=clock)
        state = setups["site-a"].folder / STATE_FILE
        assert _mode(state) == 0o600 and _mode(setups["site-a"].folder / SENT_DIR / "masked") == 0o600

        clock.t = SCHEDULE.closes(OPENS, "reveal") + 60
        statuses = {s: advance_step(setups[s], clock=clock) for s in BASE_SITES}
        outsider = RoundSetup(ref, None, context, tmp_path / "state" / "reader", tuple(addresses[-1:]), ksize=KSIZE)
        reader = unmask_step(outsider, CELLS, clock=clock)

    contributors = [s for s in BASE_SITES if s != dropout]
    central = np.zeros(CELLS, dtype=np.uint64)
    for s in contributors:
        central = central + vectors[s]
    for s in BASE_SITES:
        assert statuses[s]["step"] == "unmask" and statuses[s]["contributors"] == 4 and statuses[s]["dropped"] == 1
        result = __import__("orjson").loads((setups[s].folder / RESULT_FILE).read_bytes())
        assert result["totals"] == [int(v) for v in central]
        assert result["contributors"] == contributors and result["dropped"] == [dropout]
        assert _mode(setups[s].folder / RESULT_FILE) == 0o600
        assert not (setups[s].folder / STATE_FILE).exists()  # the round's secrets are gone once it is summed
    assert reader["contributors"] == 4
