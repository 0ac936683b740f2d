"""The release policy: backfills release nothing older, same-day re-runs get a higher seq, the state is
recorded only at commit, and concurrent writers serialise."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_build import BIG, SMALL, _fresh_site, make_events, released

from qis_fhir.errors import UsageError
from qis_fhir.packets.build import build_packets, encode_packet
from qis_fhir.packets.release import RELEASE_MARK, RELEASE_STATE, day_of_seq, load_release_state, open_release
from qis_fhir.packets.replay import MemoryReplayState
from qis_fhir.packets.verifier import Verifier


@pytest.fixture(scope="module")
def mapping():
    from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping

    return load_mapping(MAPPINGS_ROOT / "v1")  # change events only: control packets are test_build_control's


def _state(site) -> dict[str, bytes | None]:
    return {name: (site.site_dir / name).read_bytes() if (site.site_dir / name).exists() else None for name in (RELEASE_STATE, RELEASE_MARK)}


def test_a_backfill_of_an_older_day_releases_nothing_and_leaves_the_state(tmp_path, mapping, caplog):
    site, network = _fresh_site(tmp_path)
    newer = released(make_events({BIG: 30, SMALL: 20}, seed=1), mapping, site, network, "2024-03-05")
    assert {p.seq for p in newer.packets} == {2024030500}
    before = _state(site)

    with caplog.at_level(logging.WARNING):
        older = released(make_events({BIG: 60, SMALL: 40}, seed=2), mapping, site, network, "2024-03-02")
    assert older.packets == []  # nothing older than the newest release, not even a held re-send
    assert older.disclosure_report["release"] == {"day": "2024-03-02", "status": "stale", "seq": None,
                                                  "newest_released_day": "2024-03-05", "withheld": 2}
    assert older.disclosure_report["cells"]["published"] == 0
    assert _state(site) == before  # byte for byte: the state never moves backwards
    assert "nothing released: 2024-03-02 is older than the newest day this site released (2024-03-05)" in caplog.text
    assert "2 cells withheld, none released" in caplog.text

    # the next day after the newest still releases, measured against the newest release
    nxt = released(make_events({BIG: 60, SMALL: 20}, seed=2), mapping, site, network, "2024-03-06")
    assert sorted((p.patients, p.seq) for p in nxt.packets) == [(20, 2024030500), (60, 2024030600)]


def test_a_same_day_rerun_with_changed_data_gets_a_higher_seq_the_verifier_accepts(tmp_path, mapping):
    site, network = _fresh_site(tmp_path)
    replay = MemoryReplayState()
    verifier = Verifier(network.manifest, replay)
    first = released(make_events({BIG: 20, SMALL: 15}, seed=3), mapping, site, network, "2024-03-05")
    assert [verifier.verify(encode_packet(p)).reason for p in first.packets] == ["ok", "ok"]

    changed = make_events({BIG: 40, SMALL: 15}, seed=3)  # BIG gained 20 patients, SMALL is as it was
    again = released(changed, mapping, site, network, "2024-03-05")
    by_n = {p.patients: p for p in again.packets}
    assert (by_n[40].seq, by_n[15].seq) == (2024030501, 2024030500)
    assert again.disclosure_report["release"]["revision"] == 1
    verdicts = {p.patients: verifier.verify(encode_packet(p)).reason for p in again.packets}
    assert verdicts == {40: "ok", 15: "duplicate"}  # not a replay, not an equivocation

    third = released(make_events({BIG: 40, SMALL: 30}, seed=4), mapping, site, network, "2024-03-05")
    assert {p.patients: p.seq for p in third.packets} == {40: 2024030501, 30: 2024030502}
    assert {p.patients: verifier.verify(encode_packet(p)).reason for p in third.packets} == {40: "duplicate", 30: "ok"}

    # the same data once more: identical packets, no new revision used up
    assert released(make_events({BIG: 40, SMALL: 30}, seed=4), mapping, site, network, "2024-03-05").packets == third.packets
    assert json.loads((site.site_dir / RELEASE_MARK).read_bytes())["newest_seq"] == 2024030502


def test_a_pre_revision_seq_in_the_state_is_superseded(tmp_path, mapping):
    """State written when seq was the bare date (YYYYMMDD): the same day re-released goes above it."""
    site, network = _fresh_site(tmp_path)
    events = make_events({BIG: 30}, seed=5)
    legacy = build_packets(events.iloc[:12], mapping, site, network, seq=20240305)  # no release state
    (site.site_dir / RELEASE_STATE).write_bytes(b"".join(encode_packet(p) + b"\n" for p in legacy.packets))
    rerun = released(events, mapping, site, network, "2024-03-05")
    assert [p.seq for p in rerun.packets] == [2024030500]
    assert day_of_seq(20240305) == day_of_seq(2024030500) == 20240305
    assert released(events, mapping, site, network, "2024-03-04").disclosure_report["release"]["status"] == "stale"


def test_a_release_day_must_be_a_date(tmp_path):
    site, _ = _fresh_site(tmp_path)
    with pytest.raises(UsageError, match="must be a date"), open_release(site, 7):
        pass


def test_a_failed_block_records_nothing(tmp_path, mapping):
    site, network = _fresh_site(tmp_path)
    with pytest.raises(RuntimeError), open_release(site, "2024-03-05") as release:
        build_packets(make_events({BIG: 30}), mapping, site, network, release_state=release)
        raise RuntimeError("the run failed after building its packets")
    assert _state(site) == {RELEASE_STATE: None, RELEASE_MARK: None}


KILLED_RUN = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from qis_fhir import stages
    from qis_fhir.runfolder import PACKETS, QUALITY, start_run

    events, out, site_dir, net_dir, day, how, mapping_dir = sys.argv[1:]
    setup = stages.open_site(mapping_dir=mapping_dir, site_dir=site_dir, network_dir=net_dir)
    if how == "run":  # qis-fhir run: packets built in the staging folder, killed before the swap
        with start_run(Path(out), command="run", planned=["packets"]) as run:
            shutil.copy(events, run.path / "outcome_events.parquet")
            run.mark(QUALITY)
            stages.packets_step(run, setup, day)
            print("built", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    else:  # the Dagster packets asset: an amendment of a complete run, killed before it returns
        with stages.amend_stage(Path(out), PACKETS) as run:
            stages.packets_step(run, setup, day)
            print("built", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("how", ["run", "amend"])
def test_a_run_killed_after_building_its_packets_records_no_release(tmp_path, mapping, how):
    from qis_fhir import stages
    from qis_fhir.runfolder import QUALITY, start_run

    site, network = _fresh_site(tmp_path)
    released(make_events({BIG: 20}, seed=6), mapping, site, network, "2024-03-04")
    before = _state(site)
    events = tmp_path / "events.parquet"
    make_events({BIG: 40}, seed=6).to_parquet(events)
    out = tmp_path / "out"
    if how == "amend":
        with start_run(out, command="test", planned=[]) as run:
            (run.path / "outcome_events.parquet").write_bytes(events.read_bytes())
            run.mark(QUALITY)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    proc = subprocess.run([sys.executable, str(script), str(events), str(out), str(site.site_dir), str(tmp_path / "n"), "2024-03-05", how,
                           str(mapping.path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert proc.stdout.strip() == "built"  # the packets were built and signed before the kill
    assert _state(site) == before  # and no release was recorded

    # the next attempt is not held back by the packets that never committed, and the lock is free
    setup = stages.open_site(mapping_dir=mapping.path, site_dir=site.site_dir, network_dir=tmp_path / "n")
    with start_run(tmp_path / "next", command="test", planned=[]) as run:
        (run.path / "outcome_events.parquet").write_bytes(events.read_bytes())
        run.mark(QUALITY)
        built = stages.packets_step(run, setup, "2024-03-05")
    assert [(p.patients, p.seq) for p in built.packets] == [(40, 2024030500)]
    assert [p.patients for p in load_release_state(site.site_dir / RELEASE_STATE, site).values()] == [40]


WRITER = textwrap.dedent("""
    import json, random, sys
    from qis_fhir.packets.codec import PacketSigner
    from qis_fhir.packets.keys import load_site
    from qis_fhir.packets.release import open_release

    site_dir, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    site = load_site(site_dir)
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    rng = random.Random(seed)
    for _ in range(rounds):
        day = f"2024-03-{rng.randint(1, 6):02d}"
        cell = rng.choice(["aa", "bb", "cc"])
        with open_release(site, day) as release:
            if release.stale:
                print(json.dumps({"stale": day, "newest": release.newest}), flush=True)
                continue
            p = signer.sign(fingerprint=cell * 32, treatment="TX_0001", measure="hba1c", period="2024",
                            patients=rng.randint(11, 10**6), responders=0, mean_change=0.0, sd_change=0.0,
                            mapping_version="v1", seq=release.seq)
            release.stage([p])
        print(json.dumps({"packet_id": p.packet_id, "seq": p.seq, "day": day}), flush=True)
""")


def test_two_concurrent_writers_leave_a_consistent_state(tmp_path):
    """Two processes release random days and cells at once. Each decision is made and recorded under
    the lock, so no seq is used twice (two commits picking the same seq for different content would be an
    equivocation), and the state holds every cell's highest committed seq: no update was lost."""
    site, _ = _fresh_site(tmp_path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(site.site_dir), str(seed), "40"], stdout=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    lines = [json.loads(line) for log in logs for line in log.splitlines()]
    commits = [e for e in lines if "seq" in e]
    assert len(lines) == 80 and commits
    assert len({e["seq"] for e in commits}) == len(commits)  # every release got its own seq
    newest = {}
    for e in commits:
        newest[e["packet_id"]] = max(newest.get(e["packet_id"], 0), e["seq"])
    state = load_release_state(site.site_dir / RELEASE_STATE, site)
    assert {pid: p.seq for pid, p in state.items()} == newest
    assert json.loads((site.site_dir / RELEASE_MARK).read_bytes())["newest_seq"] == max(newest.values())


def test_a_control_cell_is_held_when_the_patients_its_mean_covers_moved_by_too_few():
    """Differencing the mean: a control cell's mean covers only ``measured`` of its ``n`` patients. If
    ``n`` moves by many but ``measured`` by one, ``mean2 * m2 - mean1 * m1`` is that one patient's
    reading; such a cell must be re-sent as released, exactly as when ``n`` moves by too few."""
    from qis_fhir.packets.model import Packet
    from qis_fhir.packets.release import Release

    before = Packet(fingerprint="a" * 64, treatment="TX_0001", measure="bp_control", period="2024", patients=100,
                    responders=40, mean_change=131.5, sd_change=12.25, mapping_version="v2", site_id="site-a",
                    key_id="b" * 32, seq=2024030500, measured=30)
    release = Release(path=Path("unused"), site_id="site-a", day=20240306, previous={"cell": before}, newest=2024030500)
    assert release.held("cell", 150, 11, measured=31) is before  # 50 more patients, one more reading
    assert release.held("cell", 150, 11, measured=20) is before  # ten fewer readings
    assert release.held("cell", 150, 11, measured=41) is None  # 11 more readings: a new release
    assert release.held("cell", 150, 11, measured=0) is None  # the new mean is withheld: nothing to difference
    assert release.held("cell", 105, 11, measured=60) is before  # too few patients, as for every cell
    release.previous["change"] = dataclasses.replace(before, measure="systolic_bp", measured=None)
    assert release.held("change", 150, 11) is None  # a change cell's mean covers all n
