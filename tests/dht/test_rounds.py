"""Round chunks without a network: the one wire form, what a node's gate admits and when, what a
reader reassembles, and that nothing but the network secret opens a payload."""

from __future__ import annotations

import dataclasses
import os

import pytest
from dht_cluster import BASE_SITES, make_network

from qis_fhir.dht.rounds import (
    HEADER_SIZE,
    MAX_CHUNKS,
    PIECE,
    ChunkVerifier,
    RoundGate,
    RoundKeys,
    decode_chunk,
    reassemble,
    seal,
)
from qis_fhir.dht.storage import PacketStore
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import load_network
from qis_fhir.packets.model import MAX_WIRE_BYTES
from qis_fhir.secagg.round import SCHEDULE, RoundRef

OPENS = "2026-03-02"
DAY = 86400.0


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = make_network(tmp_path_factory.mktemp("rounds-net"), BASE_SITES)
    network.context = load_network(network.manifest)
    return network


def _ref(net, opens: str = OPENS, stage: str = "presence") -> RoundRef:
    return RoundRef(net.context.manifest.network_id, "v1", "sbp", "2025", stage, opens)


def _seal(net, site_id: str, phase: str, message: bytes, ref: RoundRef | None = None, secret: bytes | None = None) -> list[bytes]:
    ref = ref or _ref(net)
    site = net.sites[site_id]
    keys = RoundKeys.derive(ref, secret if secret is not None else net.context.secret)
    return seal(message, ref=ref, keys=keys, phase=phase, key_id=site.key_id, sign=site.private_key.sign)


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _Static:
    """The node's packet verifier as the gate sees it: only its manifest matters for chunks."""

    def __init__(self, manifest) -> None:
        self.manifest = manifest


def _gate(net, at: float):
    store = PacketStore(":memory:")
    return RoundGate(_Static(net.context.manifest), store.replay_view(), clock=_Clock(at)), store


def _at(phase: str, offset: float) -> float:
    """``offset`` seconds after ``phase`` closes (negative: before)."""
    return SCHEDULE.closes(OPENS, phase) + offset


@pytest.mark.parametrize("size", [1, PIECE - 1, PIECE, PIECE + 1, 40_000])
def test_any_message_size_seals_into_chunks_of_at_most_512_bytes_and_reads_back(net, size):
    message = os.urandom(size)
    wires = _seal(net, "site-a", "masked", message)
    assert len(wires) == -(-size // PIECE)
    assert all(len(w) <= MAX_WIRE_BYTES for w in wires)
    ref = _ref(net)
    read = reassemble(reversed(wires), ref=ref, keys=RoundKeys.derive(ref, net.context.secret), phase="masked",
                      verifier=ChunkVerifier(net.context.manifest))
    assert read.messages == {"site-a": message}


def test_a_message_over_the_chunk_bound_is_refused_before_sealing(net):
    with pytest.raises(ValueError, match="round message"):
        _seal(net, "site-a", "masked", bytes(PIECE * MAX_CHUNKS + 1))


def test_one_wire_form_only(net):
    wire = _seal(net, "site-a", "advertise", os.urandom(PIECE + 10))[1]  # the short last chunk
    verifier = ChunkVerifier(net.context.manifest)
    assert verifier.verify(wire).ok
    variants = {
        "extra byte": wire + b"\x00",
        "truncated": wire[:-1],
        # header offsets: magic 0, tag 4, key id 20, opens 36, phase 46, index 47, count 49, length 51
        "count that does not fit the length": wire[:49] + (3).to_bytes(2, "big") + wire[51:],
        "index past count": wire[:47] + (2).to_bytes(2, "big") + wire[49:],
        "unknown phase": wire[:46] + bytes([9]) + wire[47:],
        "non-canonical date": wire[:36] + b"2026-3-02 " + wire[46:],
        "bad magic": b"QSR2" + wire[4:],
    }
    for what, bad in variants.items():
        assert verifier.verify(bad).reason == "malformed", what
    # size first: an oversize wire is refused as such, whatever it holds
    assert verifier.verify(wire + bytes(MAX_WIRE_BYTES)).reason == "oversize"


def test_forged_tampered_and_foreign_chunks_are_refused(net, tmp_path):
    verifier = ChunkVerifier(net.context.manifest)
    wire = _seal(net, "site-b", "masked", b"masked vector")[0]
    assert verifier.verify(wire[:-64] + bytes(64)).reason == "bad_signature"  # unsigned
    flipped = bytearray(wire)
    flipped[HEADER_SIZE] ^= 1  # ciphertext changed after signing
    assert verifier.verify(bytes(flipped)).reason == "bad_signature"
    # a well-formed chunk signed by a key the manifest does not list
    outsider = create_site("outsider", tmp_path / "outsider")
    ref = _ref(net)
    foreign = seal(b"x", ref=ref, keys=RoundKeys.derive(ref, net.context.secret), phase="masked",
                   key_id=outsider.key_id, sign=outsider.private_key.sign)[0]
    assert verifier.verify(foreign).reason == "unknown_key"
    revoked = dataclasses.replace(net.context.manifest, revoked_key_ids=frozenset({net.sites["site-b"].key_id}))
    assert ChunkVerifier(revoked).verify(wire).reason == "revoked_key"


def test_the_gate_holds_the_phase_windows(net):
    cases = [
        ("advertise", SCHEDULE.starts(OPENS) - 1, "early"),  # the round is not open yet
        ("advertise", _at("advertise", -1), "ok"),
        ("advertise", _at("advertise", 0), "late"),
        ("masked", _at("advertise", 10), "ok"),  # a contribution may come before its own window
        ("masked", _at("masked", -1), "ok"),
        ("masked", _at("masked", 1), "late"),
        ("reveal", _at("masked", 1), "early"),  # masked closed but the signed roster may still change
        ("reveal", _at("consistency", -1), "early"),
        ("reveal", _at("consistency", 0), "ok"),
        ("reveal", _at("reveal", 0), "late"),
    ]
    for phase, at, expected in cases:
        gate, _ = _gate(net, at)
        wire = _seal(net, "site-c", phase, b"m")[0]
        assert gate(wire).reason == expected, (phase, at - SCHEDULE.starts(OPENS))


def test_exactly_one_phase_is_due_at_any_time():
    starts = SCHEDULE.starts(OPENS)
    assert SCHEDULE.phase_at(OPENS, starts - 1) is None
    assert [SCHEDULE.phase_at(OPENS, starts + d * DAY + 60) for d in range(8)] == [
        "advertise", "shares", "masked", "masked", "consistency", "reveal", "reveal", "unmask"]
    for phase in ("advertise", "shares", "masked", "consistency", "reveal"):
        # the due phase is the one a node takes as new, and the phase before it can already be read
        at = SCHEDULE.closes(OPENS, phase) - 1
        assert SCHEDULE.phase_at(OPENS, at) == phase and SCHEDULE.refusal(phase, OPENS, at) is None


def test_a_second_message_for_a_phase_is_equivocation_and_the_first_outlives_its_window(net):
    gate, _ = _gate(net, _at("masked", -60))
    first = _seal(net, "site-d", "masked", os.urandom(2 * PIECE))
    assert gate(first[0]).ok
    other = _seal(net, "site-d", "masked", os.urandom(2 * PIECE))
    assert [gate(w).reason for w in other] == ["equivocation", "equivocation"]
    # the window closes; the rest of the message accepted in time still replicates, nothing new does
    gate.clock.t = _at("masked", 3600)
    assert gate(first[1]).ok
    assert gate(_seal(net, "site-e", "masked", b"late")[0]).reason == "late"
    # a message for another phase of the same site is a different message, not equivocation
    assert gate(_seal(net, "site-d", "consistency", b"sig")[0]).ok


def test_the_gate_passes_other_wires_to_the_packet_verifier(net):
    calls = []

    class Packets(_Static):
        def __call__(self, wire):
            calls.append(wire)
            return "packet verdict"

    gate = RoundGate(Packets(net.context.manifest), PacketStore(":memory:").replay_view())
    assert gate(b"not a chunk") == "packet verdict" and calls == [b"not a chunk"]


def test_a_reader_excludes_equivocators_other_rounds_and_incomplete_messages(net):
    ref = _ref(net)
    keys = RoundKeys.derive(ref, net.context.secret)
    good = _seal(net, "site-a", "shares", b"a" * 500)
    two = _seal(net, "site-b", "shares", b"b1") + _seal(net, "site-b", "shares", b"b2")  # seen on two replicas
    partial = _seal(net, "site-c", "shares", b"c" * 1000)[:2]
    elsewhere = _seal(net, "site-d", "shares", b"d", ref=_ref(net, opens="2026-03-09"))  # another round's chunk
    read = reassemble(good + two + partial + elsewhere, ref=ref, keys=keys, phase="shares", verifier=ChunkVerifier(net.context.manifest))
    assert read.messages == {"site-a": b"a" * 500}
    assert (read.equivocated, read.incomplete, read.rejected) == (["site-b"], ["site-c"], {"other_round": 1})


def test_a_member_that_signs_garbage_under_a_valid_digest_is_excluded(net):
    ref = _ref(net)
    keys = RoundKeys.derive(ref, net.context.secret)
    site = net.sites["site-e"]
    wire = _seal(net, "site-e", "masked", b"honest")[0]
    body = bytearray(wire[:-64])
    body[HEADER_SIZE] ^= 1  # the site itself re-signs a chunk whose ciphertext does not decrypt
    resigned = bytes(body) + site.private_key.sign(b"qis-fhir/secagg/chunk/v1\n" + bytes(body))
    read = reassemble([resigned], ref=ref, keys=keys, phase="masked", verifier=ChunkVerifier(net.context.manifest))
    assert read.messages == {} and read.invalid == ["site-e"]


def test_without_the_network_secret_a_payload_does_not_open(net):
    """What a DHT node holds (the manifest, the chunks) opens nothing: the plaintext is in no wire,
    and keys derived from anything a node knows fail authentication."""
    ref = _ref(net)
    message = b"cell 17: 4 patients, 2 responders " * 20
    wires = _seal(net, "site-a", "masked", message)
    assert not any(message[i : i + 16] in w for w in wires for i in range(0, len(message) - 16, 16))
    manifest_bytes = net.context.manifest.to_json()
    verifier = ChunkVerifier(net.context.manifest)
    for guess in (b"", manifest_bytes, ref.label(), bytes(32)):
        read = reassemble(wires, ref=ref, keys=dataclasses.replace(RoundKeys.derive(ref, guess), tag=RoundKeys.derive(ref, net.context.secret).tag),
                          phase="masked", verifier=verifier)
        assert read.messages == {} and read.invalid == ["site-a"]
    # what a node does see: who (key id), when (opens), which phase, sizes
    header = decode_chunk(wires[0])
    assert (header.key_id, header.opens, header.phase, header.count, header.length) == (
        net.sites["site-a"].key_id, OPENS, "masked", len(wires), len(message))
