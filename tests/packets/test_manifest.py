"""The signed network manifest: signature, rollback pins, updates, files and their modes."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import orjson
import pytest

from qis_fhir.errors import AlreadyExistsError, InputNotFoundError, ManifestError, SecretError
from qis_fhir.packets.keys import create_site, load_site
from qis_fhir.packets.manifest import (
    accept_mapping_version,
    add_site,
    create_network,
    load_manifest,
    load_network,
    migrate,
    revoke,
    revoke_node,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def netdir(tmp_path):
    create_network(tmp_path / "net", network_id="m-net", min_cell_size=7)
    return tmp_path / "net"


def test_new_network_files_and_modes(netdir):
    assert _mode(netdir / "governance_key.pem") == 0o600
    assert _mode(netdir / "network.secret") == 0o600
    m = load_manifest(netdir / "manifest.json")
    assert (m.network_id, m.version, m.min_cell_size, m.accepted_mapping_versions, m.sites) == ("m-net", 1, 7, ("v1", "v2"), ())
    # the public manifest holds neither the secret nor the governance private key
    text = (netdir / "manifest.json").read_text()
    assert (netdir / "network.secret").read_text().strip() not in text
    assert "PRIVATE" not in text


def test_network_and_site_refuse_to_overwrite(netdir, tmp_path):
    with pytest.raises(AlreadyExistsError):
        create_network(netdir)
    create_site("s1", tmp_path / "s1")
    before = (tmp_path / "s1" / "site_key.pem").read_bytes()
    with pytest.raises(AlreadyExistsError):
        create_site("s1", tmp_path / "s1")
    assert (tmp_path / "s1" / "site_key.pem").read_bytes() == before


def test_site_files_and_modes(tmp_path):
    site = create_site("s1", tmp_path / "s1")
    assert _mode(tmp_path / "s1" / "site_key.pem") == 0o600
    assert _mode(tmp_path / "s1" / "site.secret") == 0o600
    info = orjson.loads((tmp_path / "s1" / "site.json").read_bytes())
    assert info["site_id"] == "s1" and info["key_id"] == site.key_id
    again = load_site(tmp_path / "s1")
    assert again.key_id == site.key_id and again.patient_secret == site.patient_secret
    assert "PRIVATE" not in repr(again) and site.patient_secret.hex() not in repr(again)


def test_unsafe_private_key_mode_is_refused(tmp_path):
    create_site("s1", tmp_path / "s1")
    os.chmod(tmp_path / "s1" / "site_key.pem", 0o644)
    with pytest.raises(SecretError):
        load_site(tmp_path / "s1")


def test_bad_site_id_is_refused(tmp_path):
    with pytest.raises(ValueError):
        create_site("Site A", tmp_path / "x")


def test_add_site_and_revoke_grow_the_version(netdir, tmp_path):
    create_site("s1", tmp_path / "s1")
    create_site("s2", tmp_path / "s2")
    assert add_site(netdir, tmp_path / "s1").version == 2
    assert add_site(netdir, tmp_path / "s2").version == 3
    with pytest.raises(AlreadyExistsError):
        add_site(netdir, tmp_path / "s1")
    m = revoke(netdir, "s1")
    assert m.version == 4 and m.revoked_key_ids == {load_site(tmp_path / "s1").key_id}
    with pytest.raises(InputNotFoundError):
        revoke(netdir, "nobody")
    with pytest.raises(ManifestError):  # a revoked key cannot come back
        add_site(netdir, tmp_path / "s1")
    assert accept_mapping_version(netdir, "v3").accepted_mapping_versions == ("v1", "v2", "v3")
    assert load_manifest(netdir).version == 5


def _tamper(path, edit):
    doc = orjson.loads(path.read_bytes())
    edit(doc)
    path.write_bytes(orjson.dumps(doc))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["manifest"]["policy"].__setitem__("min_cell_size", 1),
        lambda d: d["manifest"]["policy"].__setitem__("min_sites", 4),
        lambda d: d["manifest"]["policy"].__setitem__("max_nodes_per_site", 64),
        lambda d: d["manifest"]["revoked_node_key_ids"].append("0" * 32),
        lambda d: d["manifest"].__setitem__("version", 99),
        lambda d: d["manifest"]["accepted_mapping_versions"].append("v9"),
        lambda d: d["manifest"]["revoked_key_ids"].append("0" * 32),
        lambda d: d.__setitem__("signature", d["signature"][:-4] + "AAA="),
    ],
)
def test_tampered_manifest_is_refused(netdir, edit):
    _tamper(netdir / "manifest.json", edit)
    with pytest.raises(ManifestError):
        load_manifest(netdir)


def test_manifest_resigned_by_another_governance_key_is_refused_by_a_pinned_reader(netdir, tmp_path):
    pins = tmp_path / "pins.json"
    load_manifest(netdir, pinned_state=pins)
    create_network(tmp_path / "rogue", network_id="m-net")  # same network id, different governance
    with pytest.raises(ManifestError, match="governance key"):
        load_manifest(tmp_path / "rogue", pinned_state=pins)


def test_manifest_with_an_added_site_not_signed_by_governance_is_refused(netdir, tmp_path):
    """An attacker adds its own site to the manifest without the governance key."""
    create_site("evil", tmp_path / "evil")
    info = orjson.loads((tmp_path / "evil" / "site.json").read_bytes())

    def edit(d):
        d["manifest"]["sites"].append({"site_id": "evil", "key_id": info["key_id"], "public_key": info["public_key"], "added": "2026-01-01"})

    _tamper(netdir / "manifest.json", edit)
    with pytest.raises(ManifestError, match="signature"):
        load_manifest(netdir)


def test_rollback_to_an_older_version_is_refused(netdir, tmp_path):
    pins = tmp_path / "pins.json"
    old = (netdir / "manifest.json").read_bytes()
    create_site("s1", tmp_path / "s1")
    add_site(netdir, tmp_path / "s1")
    revoke(netdir, "s1")  # version 3: s1 revoked
    assert load_manifest(netdir, pinned_state=pins).version == 3
    assert load_manifest(netdir, pinned_state=pins).version == 3  # same version again is fine
    (netdir / "manifest.json").write_bytes(old)  # an attacker serves version 1 (validly signed)
    assert load_manifest(netdir).version == 1  # without a pin it verifies...
    with pytest.raises(ManifestError, match="rollback"):
        load_manifest(netdir, pinned_state=pins)  # ...but a reader that has seen v3 refuses it
    assert orjson.loads(pins.read_bytes())["m-net"]["version"] == 3


def test_missing_and_garbage_manifests(tmp_path):
    with pytest.raises(InputNotFoundError):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ManifestError):
        load_manifest(tmp_path / "empty.json")


def test_load_network_reads_the_secret_beside_the_manifest(netdir):
    ctx = load_network(netdir / "manifest.json")
    assert len(ctx.secret) == 32
    assert ctx.secret.hex() not in repr(ctx)
    os.chmod(netdir / "network.secret", 0o644)
    with pytest.raises(SecretError):
        load_network(netdir)


# --- a corrupt pin file: a clear ManifestError naming the file and what to do, never its content ----

_MARKER = "zz-marker-zz"  # a value planted in corrupt pins: it must never reach the message


def _good_pins(netdir, tmp_path):
    pins = tmp_path / "pins.json"
    load_manifest(netdir, pinned_state=pins)
    return pins, pins.read_bytes()


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]  # a write cut short (disk full, power loss)


def _wrong_types(good: bytes) -> bytes:
    doc = orjson.loads(good)
    doc["m-net"]["version"] = _MARKER  # was an int
    return orjson.dumps(doc)


def _entry_not_an_object(good: bytes) -> bytes:
    return orjson.dumps({"m-net": [_MARKER]})


def _binary_garbage(good: bytes) -> bytes:
    return b"\x1f\x8b\x08\x00" + bytes(range(256)) + _MARKER.encode()  # e.g. a gzip file copied over it


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (_truncated, "is corrupt: not JSON"),
        (_wrong_types, "is corrupt: an entry is not"),
        (_entry_not_an_object, "is corrupt: an entry is not"),
        (lambda good: b'["m-net"]', "is corrupt: not a JSON object"),
        (_binary_garbage, "is corrupt: not JSON"),
    ],
)
def test_corrupt_pin_file_is_a_manifest_error_naming_the_file(netdir, tmp_path, corrupt, problem):
    pins, good = _good_pins(netdir, tmp_path)
    bad = corrupt(good)
    pins.write_bytes(bad)
    with pytest.raises(ManifestError) as info:
        load_manifest(netdir, pinned_state=pins)
    msg = str(info.value)
    assert msg.startswith(f"pin file {pins} {problem}")
    assert "restore it from a backup" in msg and info.value.exit_code == 9
    assert _MARKER not in msg
    assert pins.read_bytes() == bad  # left as found, for whoever inspects it


def test_unreadable_pin_file_is_a_manifest_error(netdir, tmp_path):
    pins = tmp_path / "pins.json"
    pins.mkdir()
    with pytest.raises(ManifestError, match=r"cannot be read \(IsADirectoryError\)"):
        load_manifest(netdir, pinned_state=pins)


def test_run_with_a_corrupt_site_pin_file_exits_9_without_a_traceback(netdir, tmp_path, capsys, monkeypatch):
    """The nightly run reads SITE_DIR/manifest_pins.json before extracting anything."""
    from qis_fhir.cli import main
    from qis_fhir.packets.manifest import PINS

    monkeypatch.setenv("QIS_FHIR_HOME", str(tmp_path / "home"))
    site = tmp_path / "site"
    create_site("s1", site)
    add_site(netdir, site)
    (site / PINS).write_bytes(_binary_garbage(b""))
    (tmp_path / "export").mkdir()
    args = ["run", str(tmp_path / "export"), "--out", str(tmp_path / "out"), "--site", str(site), "--network", str(netdir)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 9
    assert err.startswith(f"error: pin file {site / PINS} is corrupt: not JSON") and "Traceback" not in err
    assert _MARKER not in err


# --- format v2 (policy, node revocations) and the migration of a format-v1 network -------------------

LEGACY = Path(__file__).parent / "data" / "legacy_v1_net"  # written by the release before format v2


def _legacy_net(tmp_path) -> Path:
    net = tmp_path / "legacy"
    net.mkdir()
    shutil.copy(LEGACY / "manifest.json", net / "manifest.json")
    shutil.copy(LEGACY / "governance_key.pem", net / "governance_key.pem")
    os.chmod(net / "governance_key.pem", 0o600)
    return net


def test_new_network_is_format_v2_with_its_policy(tmp_path):
    m = create_network(tmp_path / "n", network_id="p-net", min_cell_size=5, min_sites=4, max_nodes_per_site=2)
    body = orjson.loads((tmp_path / "n" / "manifest.json").read_bytes())["manifest"]
    assert body["format"] == "qis-fhir/manifest/v2" and "min_cell_size" not in body
    assert body["policy"] == {"min_cell_size": 5, "min_sites": 4, "max_nodes_per_site": 2}
    again = load_manifest(tmp_path / "n")
    assert (again.format_version, again.min_cell_size, again.min_sites, again.max_nodes_per_site) == (2, 5, 4, 2)
    assert again == m


@pytest.mark.parametrize("policy", [{"min_sites": 2}, {"max_nodes_per_site": 0}, {"max_nodes_per_site": 65}, {"min_cell_size": 0}])
def test_a_policy_outside_its_bounds_is_refused(tmp_path, policy):
    """m below 3 would let two sites' values be summed: one member then reads the other's off the total."""
    with pytest.raises(ManifestError):
        create_network(tmp_path / "n", **policy)


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.__setitem__("min_cell_size", 11),  # a v1 field in a v2 document
        lambda b: b["policy"].__setitem__("extra", 1),
        lambda b: b.pop("revoked_node_key_ids"),
        lambda b: b.__setitem__("format", "qis-fhir/manifest/v3"),
    ],
)
def test_a_document_whose_fields_do_not_match_its_format_is_refused(netdir, edit):
    _tamper(netdir / "manifest.json", lambda d: edit(d["manifest"]))
    with pytest.raises(ManifestError):
        load_manifest(netdir)


def test_a_format_v1_manifest_from_the_previous_release_still_verifies(tmp_path):
    m = load_manifest(LEGACY)
    assert (m.format_version, m.network_id, m.version, m.min_cell_size) == (1, "legacy-net", 4, 5)
    assert sorted(s.site_id for s in m.sites) == ["site-a", "site-b"] and len(m.revoked_key_ids) == 1
    assert m.to_json() == (LEGACY / "manifest.json").read_bytes()  # its bytes round-trip unchanged
    with pytest.raises(ManifestError, match="network migrate"):
        m.require_format(2, "node certificates")


def test_migration_keeps_everything_and_pinned_readers_accept_it(tmp_path):
    net = _legacy_net(tmp_path)
    pins = tmp_path / "pins.json"
    before = load_manifest(net, pinned_state=pins)
    after = migrate(net, min_sites=5, max_nodes_per_site=3)
    assert (after.format_version, after.version, after.min_sites, after.max_nodes_per_site) == (2, 5, 5, 3)
    assert (after.sites, after.revoked_key_ids, after.min_cell_size, after.accepted_mapping_versions) == (
        before.sites, before.revoked_key_ids, before.min_cell_size, before.accepted_mapping_versions)
    assert load_manifest(net, pinned_state=pins) == after  # the next version for a pinned reader
    with pytest.raises(AlreadyExistsError):
        migrate(net)
    # and the old v1 document is now a rollback for that reader
    shutil.copy(LEGACY / "manifest.json", net / "manifest.json")
    with pytest.raises(ManifestError, match="rollback"):
        load_manifest(net, pinned_state=pins)


def test_a_v1_signature_never_verifies_as_a_v2_document(tmp_path):
    """The format is in the signed domain: relabelling a signed v1 body as v2 fails the signature."""
    net = _legacy_net(tmp_path)

    def relabel(d):
        b = d["manifest"]
        b["format"] = "qis-fhir/manifest/v2"
        b["policy"] = {"min_cell_size": b.pop("min_cell_size"), "min_sites": 3, "max_nodes_per_site": 4}
        b["revoked_node_key_ids"] = []

    _tamper(net / "manifest.json", relabel)
    with pytest.raises(ManifestError, match="signature"):
        load_manifest(net)


def test_revoke_node_needs_format_v2_and_grows_the_version(tmp_path, netdir):
    m = revoke_node(netdir, "ab" * 16)
    assert m.revoked_node_key_ids == {"ab" * 16} and m.version == 2
    with pytest.raises(ManifestError, match="network migrate"):
        revoke_node(_legacy_net(tmp_path), "ab" * 16)
    with pytest.raises(ManifestError):
        revoke_node(netdir, "not-a-key-id")
