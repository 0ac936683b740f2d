"""Control cells (mapping v2) in the evidence stage: the share is the controlled (or poorly controlled)
share, the mean covers only the patients with a reading, poor control ranks lower-is-better, and every
control row says it compares prevalent users and is confounded by indication."""

from __future__ import annotations

import math

import pytest
from dht_cluster import make_network
from report_tables import embedded_data

from qis_fhir.evidence.collect import WRONG_DESIGN, cohort_grid, collect_answers
from qis_fhir.evidence.flags import FLAG_TEXT
from qis_fhir.evidence.report import write_report
from qis_fhir.evidence.tables import UNTREATED_DISPLAY, build_tables, write_tables
from qis_fhir.mapping import load_mapping
from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR
from qis_fhir.packets.codec import PacketSigner, encode_packet
from qis_fhir.packets.manifest import load_network
from qis_fhir.privacy.fingerprint import Fingerprinter

HTN = ("hypertension", "40-64", "female")
T2D = ("type2_diabetes", "65+", "male")


class V2Net:
    def __init__(self, root):
        self.net = make_network(root, ["site-a", "site-c"])  # a new network accepts v1 and v2
        self.mapping = load_mapping(DEFAULT_MAPPING_DIR.parent / "v2")
        self.context = load_network(self.net.net_dir)

    def fp(self, cohort) -> str:
        return Fingerprinter(self.context.secret, "v2")(*cohort)

    def wire(self, site_id, cohort, *, measure="bp_control", treatment="TX_0002", period="2023", patients=20, responders=8,
             measured=15, mean=142.0, sd=10.0) -> bytes:
        site = self.net.sites[site_id]
        return encode_packet(PacketSigner(site.private_key, site.site_id, site.key_id).sign(
            fingerprint=self.fp(cohort), treatment=treatment, measure=measure, period=period, patients=patients,
            responders=responders, mean_change=mean, sd_change=sd, mapping_version="v2", seq=20240110, measured=measured))

    def collect(self, wires):
        answers: dict[str, list[bytes]] = {}
        for cohort, wire in wires:
            answers.setdefault(self.fp(cohort), []).append(wire)
        grid = cohort_grid(self.context, self.mapping)
        return collect_answers(answers, self.context.manifest, grid, "v2", local_site_id="site-a",
                               control_measures=self.mapping.control_measures)


@pytest.fixture(scope="module")
def v2net(tmp_path_factory):
    return V2Net(tmp_path_factory.mktemp("v2net"))


def _tables(v2net, wires):
    return build_tables(v2net.collect(wires), v2net.mapping, run_date="2024-01-15")


def _two_sites(v2net, a: dict, c: dict):
    """The one pooled row (and the tables) of a bp_control cell reported by site A and site C."""
    t = _tables(v2net, [(HTN, v2net.wire("site-a", HTN, **a)), (HTN, v2net.wire("site-c", HTN, **c))])
    (row,) = t.pooled.to_dict("records")
    return row, t


def test_a_pooled_control_cell_weighs_the_mean_by_the_patients_with_a_reading(v2net):
    row, _ = _two_sites(v2net, dict(patients=20, responders=8, measured=15, mean=142.0, sd=10.0),
                        dict(patients=30, responders=18, measured=25, mean=136.0, sd=12.0))
    assert (row["patients"], row["responders"], row["measured"]) == (50, 26, 40)
    assert row["resp_pooled"] == pytest.approx(26 / 50)  # the controlled share of the whole denominator
    # by hand: (15 x 142 + 25 x 136) / 40; weighing by the denominators (20, 30) would give 138.4
    assert row["mean_pooled"] == pytest.approx(138.25)
    # combined SD: (14 x 10^2 + 24 x 12^2 + 15 x 3.75^2 + 25 x 2.25^2) / 39 = 5193.5 / 39
    assert row["sd_pooled"] == pytest.approx(math.sqrt(5193.5 / 39))
    assert row["measure_kind"] == "control" and row["response_direction"] == "higher"
    assert "prevalent users" in row["design"] and "confounded by indication" in row["design"]
    assert "prevalent_users" in row["flags"].split(";")


def test_a_site_that_withheld_its_mean_counts_in_the_share_only(v2net):
    row, t = _two_sites(v2net, dict(patients=20, responders=8, measured=0, mean=0.0, sd=0.0),
                        dict(patients=30, responders=18, measured=25, mean=136.0, sd=12.0))
    assert (row["patients"], row["responders"], row["measured"]) == (50, 26, 25)
    assert row["mean_pooled"] == pytest.approx(136.0)  # not pulled towards the withheld 0.0
    withheld = t.per_site[t.per_site["measured"] == 0]
    assert len(withheld) == 1 and withheld["mean"].isna().all()


def test_poor_control_ranks_the_lowest_share_first(v2net):
    wires = [(T2D, v2net.wire(s, T2D, measure="hba1c_poor_control", treatment=tx, patients=40, responders=r, measured=30,
                              mean=8.1, sd=1.2))
             for s in ("site-a", "site-c") for tx, r in (("TX_0005", 8), ("TX_0006", 20), ("TX_NONE", 14))]
    wires += [(HTN, v2net.wire(s, HTN, treatment=tx, patients=40, responders=r, measured=30))
              for s in ("site-a", "site-c") for tx, r in (("TX_0001", 8), ("TX_0002", 20))]
    t = _tables(v2net, wires)
    rank = {(r["measure"], r["treatment"]): r["rank"] for r in t.pooled.to_dict("records")}
    assert rank[("hba1c_poor_control", "TX_0005")] == 1  # 20 % poorly controlled: the best
    assert rank[("hba1c_poor_control", "TX_NONE")] == 2
    assert rank[("hba1c_poor_control", "TX_0006")] == 3  # 50 % poorly controlled: the worst
    assert rank[("bp_control", "TX_0002")] == 1 and rank[("bp_control", "TX_0001")] == 2  # controlled: higher is better
    poor = t.pooled[t.pooled["measure"] == "hba1c_poor_control"]
    assert set(poor["response_direction"]) == {"lower"} and set(poor["measure_kind"]) == {"poor_control"}
    assert set(poor.loc[poor["treatment"] == "TX_NONE", "treatment_display"]) == {UNTREATED_DISPLAY}


def test_a_packet_whose_form_is_not_its_measures_design_is_refused(v2net):
    site = v2net.net.sites["site-c"]
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)

    def v1(measure):
        return encode_packet(signer.sign(fingerprint=v2net.fp(HTN), treatment="TX_0002", measure=measure, period="2023",
                                         patients=20, responders=8, mean_change=140.0, sd_change=9.0, mapping_version="v2", seq=1))

    c = v2net.collect([
        (HTN, v1("bp_control")),  # a control measure without the patients its mean covers
        (HTN, v2net.wire("site-a", HTN, measure="systolic_bp")),  # a change measure with them
        (HTN, v2net.wire("site-a", HTN)),  # the one right packet
    ])
    assert c.rejected == {WRONG_DESIGN: 2}
    assert [(p.measure, p.site_id) for p in c.packets] == [("bp_control", "site-a")]


def test_the_report_names_the_controlled_share_and_its_direction(v2net, tmp_path):
    wires = [(T2D, v2net.wire(s, T2D, measure="hba1c_poor_control", treatment=tx, patients=40, responders=r, measured=30,
                              mean=8.1, sd=1.2))
             for s in ("site-a", "site-c") for tx, r in (("TX_0005", 8), ("TX_0006", 20))]
    wires += [(HTN, v2net.wire(s, HTN)) for s in ("site-a", "site-c")]
    write_tables(_tables(v2net, wires), tmp_path)
    data = embedded_data(write_report(tmp_path).read_text(encoding="utf-8"))
    poor, bp = data["measures"]["hba1c_poor_control"], data["measures"]["bp_control"]
    assert (poor["response_direction"], poor["words"]["response"]) == ("lower", "Poorly controlled")
    assert (bp["response_direction"], bp["words"]["response"]) == ("higher", "Controlled")
    assert "confounded by indication" in poor["design"] and "confounded by indication" in bp["design"]
    texts = {f["text"] for g in data["groups"] for t in g["treatments"] for f in t["flags"]}
    assert FLAG_TEXT["prevalent_users"] in texts
    site_lines = [s["text"] for g in data["groups"] for t in g["treatments"] for s in t["plot"]["sites"]]
    assert any("poorly controlled" in line and "mean reading" in line for line in site_lines)
