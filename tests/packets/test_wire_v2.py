"""Wire version 2 (control cells: ``measured`` patients behind the mean and SD) beside version 1."""

from __future__ import annotations

import dataclasses
import hashlib

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qis_fhir.packets.codec import PacketSigner, decode_packet, encode_packet, signing_bytes, signing_bytes_from_wire
from qis_fhir.packets.model import PacketFormatError
from qis_fhir.packets.verifier import Verifier

#: a version-1 packet as the release before version 2 signed it (fixed key): its bytes must never change,
#: or every signature already in the network would stop matching what a re-run publishes
V1_GOLDEN_SHA256 = "7bf86db3ff6e38a38fb5c8296d16f257ae9766c76578f33677f5ac6a29bdd9c5"


def _golden_fields(**extra) -> dict:
    return dict(fingerprint="ab" * 32, treatment="TX_0001", measure="hba1c", period="2024", patients=25, responders=10,
                mean_change=-0.75, sd_change=1.125, mapping_version="v1", seq=20240105, **extra)


def test_a_version_1_packet_is_byte_identical_to_the_release_before_version_2():
    signer = PacketSigner(Ed25519PrivateKey.from_private_bytes(bytes(range(32))), "site-a", "0123456789abcdef" * 2)
    wire = encode_packet(signer.sign(**_golden_fields()))
    assert hashlib.sha256(wire).hexdigest() == V1_GOLDEN_SHA256
    assert orjson.loads(wire)["v"] == 1 and b'"nm"' not in wire
    assert decode_packet(wire).measured is None


def test_version_2_round_trips_exactly_and_carries_measured(net):
    p = net.packet(measure="bp_control", mapping_version="v2", patients=40, responders=12, mean_change=138.5,
                   sd_change=14.25, measured=31)
    wire = encode_packet(p)
    d = orjson.loads(wire)
    assert d["v"] == 2 and d["nm"] == 31 and d["n"] == 40 and d["r"] == 12
    assert set(d) == {"v", "fp", "tx", "m", "p", "n", "r", "mc", "sd", "mv", "s", "k", "q", "nm", "sig"}
    assert decode_packet(wire) == p
    assert encode_packet(decode_packet(wire)) == wire
    assert signing_bytes_from_wire(wire) == signing_bytes(p)


def test_measured_is_signed(net):
    p = net.packet(measured=20)
    assert signing_bytes(dataclasses.replace(p, measured=21)) != signing_bytes(p)
    assert signing_bytes(dataclasses.replace(p, measured=None)) != signing_bytes(p)  # not a v1 packet either


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w.replace(b'"nm":20,', b""),  # v2 without its count
        lambda w: w.replace(b'"v":2', b'"v":1'),  # v1 with a v2 field
        lambda w: w.replace(b'"v":2', b'"v":3'),  # a version nobody defined
        lambda w: w.replace(b'"v":2', b'"v":2.0'),
        lambda w: w.replace(b'"nm":20', b'"nm":20.0'),
        lambda w: w.replace(b'"nm":20', b'"nm":-1'),
        lambda w: w.replace(b'"nm":20', b'"nm":null'),
        lambda w: w.replace(b'"nm":20', b'"nm":true'),
        lambda w: w.replace(b'"nm":20', b'"nm":020'),
    ],
)
def test_version_2_decoding_is_as_strict_as_version_1(net, mutate):
    wire = net.wire(measured=20)
    bad = mutate(wire)
    assert bad != wire
    with pytest.raises(PacketFormatError):
        decode_packet(bad)


def test_a_v1_wire_with_the_v2_key_added_is_malformed(net):
    with pytest.raises(PacketFormatError):
        decode_packet(net.wire().replace(b'"mv"', b'"nm":20,"mv"'))


def test_the_verifier_accepts_v2_beside_v1(net):
    verifier = Verifier(net.manifest)
    v1 = verifier.verify(net.wire())
    v2 = verifier.verify(net.wire(measure="bp_control", measured=11))
    assert (v1.ok, v1.reason, v2.ok, v2.reason) == (True, "ok", True, "ok")
    assert v2.packet.measured == 11 and v1.packet.measured is None


@pytest.mark.parametrize(
    "fields",
    [
        dict(patients=25, measured=26),  # more patients with a reading than in the denominator
        dict(patients=25, measured=10),  # a mean of fewer than the minimum cell size (11)
        dict(patients=25, measured=1),  # one patient's own index value
        dict(patients=25, measured=0, mean_change=131.0, sd_change=0.0),  # a mean of nobody
        dict(patients=25, measured=0, mean_change=0.0, sd_change=2.0),
    ],
)
def test_a_mean_over_too_few_or_too_many_patients_is_out_of_range(net, fields):
    verdict = Verifier(net.manifest).verify(net.wire(**fields))
    assert (verdict.ok, verdict.reason) == (False, "out_of_range")


@pytest.mark.parametrize("measured", [0, 11, 25])
def test_a_withheld_mean_or_one_over_enough_patients_is_accepted(net, measured):
    stats = dict(mean_change=0.0, sd_change=0.0) if measured == 0 else {}
    verdict = Verifier(net.manifest).verify(net.wire(patients=25, measured=measured, **stats))
    assert verdict.ok, verdict.reason
