"""`qis-fhir network`, `keys` and `verify` from the command line: outputs, files, exit codes."""

from __future__ import annotations

import json

import pytest

from qis_fhir.cli import main
from qis_fhir.errors import ExitCode


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QIS_FHIR_HOME", str(tmp_path / "home"))


def test_network_keys_verify_end_to_end(tmp_path, capsys):
    net, a = tmp_path / "net", tmp_path / "a"
    assert run(["network", "new", "--out", str(net), "--network-id", "cli-net", "--min-cell-size", "5"], capsys)[0] == 0
    assert run(["keys", "new", "--site-id", "site-a", "--out", str(a)], capsys)[0] == 0
    code, _, err = run(["keys", "new", "--site-id", "site-a", "--out", str(a)], capsys)
    assert code == ExitCode.ALREADY_EXISTS and "refusing to overwrite" in err
    assert run(["network", "add-site", str(net), str(a)], capsys)[0] == 0

    from qis_fhir.packets import PacketSigner, load_site, write_packets

    site = load_site(a)
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    good = [
        signer.sign(fingerprint=f"{i:064x}", treatment="TX_0001", measure="hba1c", period="2024", patients=12,
                    responders=3, mean_change=-0.5, sd_change=1.0, mapping_version="v1", seq=1)
        for i in range(3)
    ]
    write_packets(tmp_path / "p.ndjson", good)
    code, out, _ = run(["verify", str(tmp_path / "p.ndjson"), "--network", str(net / "manifest.json"), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {"network_id": "cli-net", "manifest_version": 2, "packets": 3, "accepted": 3, "rejected": 0, "by_reason": {"ok": 3}}

    with open(tmp_path / "p.ndjson", "ab") as fh:
        fh.write(b"not a packet\n")
    code, out, err = run(["verify", str(tmp_path / "p.ndjson"), "--network", str(net)], capsys)
    assert code == ExitCode.PACKETS_REJECTED
    assert "3 accepted, 1 rejected" in out and "malformed" in out

    assert run(["network", "revoke", str(net), "site-a"], capsys)[0] == 0
    code, out, _ = run(["verify", str(tmp_path / "p.ndjson"), "--network", str(net), "--json"], capsys)
    assert code == ExitCode.PACKETS_REJECTED
    assert json.loads(out)["by_reason"] == {"malformed": 1, "revoked_key": 3}


def test_verify_refuses_a_rolled_back_manifest(tmp_path, capsys):
    net, a = tmp_path / "net", tmp_path / "a"
    run(["network", "new", "--out", str(net), "--network-id", "rb"], capsys)
    old = (net / "manifest.json").read_bytes()
    run(["keys", "new", "--site-id", "a", "--out", str(a)], capsys)
    run(["network", "add-site", str(net), str(a)], capsys)
    (tmp_path / "empty.ndjson").write_text("")
    assert run(["verify", str(tmp_path / "empty.ndjson"), "--network", str(net)], capsys)[0] == 0
    (net / "manifest.json").write_bytes(old)
    code, _, err = run(["verify", str(tmp_path / "empty.ndjson"), "--network", str(net)], capsys)
    assert code == ExitCode.MANIFEST_INVALID and "rollback" in err


def test_verify_missing_file_and_bad_site_id(tmp_path, capsys):
    run(["network", "new", "--out", str(tmp_path / "net")], capsys)
    code, _, _ = run(["verify", str(tmp_path / "none.ndjson"), "--network", str(tmp_path / "net")], capsys)
    assert code == ExitCode.INPUT_NOT_FOUND
    code, _, err = run(["keys", "new", "--site-id", "Bad Site!", "--out", str(tmp_path / "x")], capsys)
    assert code == ExitCode.USAGE
    assert not (tmp_path / "x").exists()


def test_verify_state_file_refuses_replays_across_runs(tmp_path, capsys):
    net, a = tmp_path / "net", tmp_path / "a"
    run(["network", "new", "--out", str(net), "--network-id", "st"], capsys)
    run(["keys", "new", "--site-id", "a", "--out", str(a)], capsys)
    run(["network", "add-site", str(net), str(a)], capsys)
    from qis_fhir.packets import PacketSigner, load_site, write_packets

    site = load_site(a)
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)

    def one(seq):
        return signer.sign(fingerprint="0" * 64, treatment="TX_0001", measure="hba1c", period="2024", patients=12,
                           responders=3, mean_change=-0.5, sd_change=1.0, mapping_version="v1", seq=seq)

    write_packets(tmp_path / "new.ndjson", [one(2)])
    write_packets(tmp_path / "old.ndjson", [one(1)])
    state = tmp_path / "replay.json"
    assert run(["verify", str(tmp_path / "new.ndjson"), "--network", str(net), "--state", str(state)], capsys)[0] == 0
    assert run(["verify", str(tmp_path / "old.ndjson"), "--network", str(net)], capsys)[0] == 0  # no state: fine
    code, out, _ = run(["verify", str(tmp_path / "old.ndjson"), "--network", str(net), "--state", str(state), "--json"], capsys)
    assert code == ExitCode.PACKETS_REJECTED and json.loads(out)["by_reason"] == {"replay": 1}
    code, out, _ = run(["verify", str(tmp_path / "new.ndjson"), "--network", str(net), "--state", str(state), "--json"], capsys)
    assert code == 0 and json.loads(out)["by_reason"] == {"duplicate": 1}


def test_network_new_accepts_only_the_versions_named(tmp_path, capsys):
    net = tmp_path / "net"
    run(["network", "new", "--out", str(net), "--network-id", "only", "--mapping-version", "v1"], capsys)
    assert json.loads(run(["network", "show", str(net)], capsys)[1])["accepted_mapping_versions"] == ["v1"]


def test_network_show_and_accept_mapping(tmp_path, capsys):
    net = tmp_path / "net"
    run(["network", "new", "--out", str(net), "--network-id", "show", "--min-cell-size", "20"], capsys)
    code, out, _ = run(["network", "show", str(net)], capsys)
    assert json.loads(out)["accepted_mapping_versions"] == ["v1", "v2"]  # by default every shipped mapping version
    assert run(["network", "accept-mapping", str(net), "v3"], capsys)[0] == 0
    code, out, _ = run(["network", "show", str(net)], capsys)
    body = json.loads(out)
    assert code == 0 and body["version"] == 2 and body["policy"]["min_cell_size"] == 20
    assert body["accepted_mapping_versions"] == ["v1", "v2", "v3"] and body["revoked_sites"] == []
    assert (tmp_path / "home" / "trust" / "manifest_pins.json").exists()  # the CLI pins by default


def test_verify_accepts_v2_control_packets_beside_v1(tmp_path, capsys):
    net, a = tmp_path / "net", tmp_path / "a"
    run(["network", "new", "--out", str(net), "--network-id", "v2-net", "--min-cell-size", "5"], capsys)
    run(["keys", "new", "--site-id", "site-a", "--out", str(a)], capsys)
    run(["network", "add-site", str(net), str(a)], capsys)

    from qis_fhir.packets import PacketSigner, load_site, write_packets

    site = load_site(a)
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    common = dict(fingerprint="ab" * 32, treatment="TX_0002", period="2023", patients=12, responders=3, seq=1)
    write_packets(tmp_path / "p.ndjson", [
        signer.sign(measure="systolic_bp", mean_change=-8.0, sd_change=9.0, mapping_version="v1", **common),
        signer.sign(measure="bp_control", mean_change=141.5, sd_change=11.0, mapping_version="v2", measured=9, **common),
        signer.sign(measure="lipid_control", mean_change=0.0, sd_change=0.0, mapping_version="v2", measured=0, **common),
        signer.sign(measure="hba1c_poor_control", mean_change=8.5, sd_change=1.0, mapping_version="v2", measured=4, **common),
    ])
    code, out, _ = run(["verify", str(tmp_path / "p.ndjson"), "--network", str(net), "--json"], capsys)
    # the last one's mean covers 4 patients, under the minimum cell size of 5
    assert code == ExitCode.PACKETS_REJECTED and json.loads(out)["by_reason"] == {"ok": 3, "out_of_range": 1}


def test_network_migrate_and_revoke_node_from_the_command_line(tmp_path, capsys):
    import os
    import shutil
    from pathlib import Path

    legacy = Path(__file__).parent / "data" / "legacy_v1_net"
    net = tmp_path / "net"
    net.mkdir()
    for name in ("manifest.json", "governance_key.pem"):
        shutil.copy(legacy / name, net / name)
    os.chmod(net / "governance_key.pem", 0o600)
    assert run(["network", "revoke-node", str(net), "ab" * 16], capsys)[0] == 9  # format v1: migrate first
    code, out, _ = run(["network", "migrate", str(net), "--min-sites", "4"], capsys)
    assert code == 0 and "format v2" in out
    assert run(["network", "migrate", str(net)], capsys)[0] != 0  # already migrated
    assert run(["network", "revoke-node", str(net), "ab" * 16], capsys)[0] == 0
    body = json.loads(run(["network", "show", str(net)], capsys)[1])
    assert body["policy"] == {"min_cell_size": 5, "min_sites": 4, "max_nodes_per_site": 4}
    assert body["revoked_node_key_ids"] == ["ab" * 16] and body["version"] == 6
