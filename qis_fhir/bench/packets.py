"""``qis-fhir bench --only packets``: sign and verify rates on one core, and packet sizes.

Rates are measured side by side with the raw Ed25519 operations on the same messages: signing with
``cryptography`` (what the signer uses), verification with libsodium via PyNaCl (what the verifier
uses) and, for comparison, with ``cryptography``'s OpenSSL backend, which verifies about half as fast
here. The ratios show what our encoding and checks cost on top of the cryptography
(absolute rates swing with the load of a shared machine; the ratio does not). Rates are per second of
this process's CPU time (``time.process_time``), i.e. per core, so time spent waiting for a core on a
busy machine is not counted against us. Targets:
sign >= 20,000/s and verify >= 10,000/s.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

SIGN_TARGET_PER_S = 20_000
VERIFY_TARGET_PER_S = 10_000


def _fields(rng: random.Random, n: int) -> list[dict]:
    """Realistic packet fields: v1-like codes, counts from 11 to a few thousand, 4-decimal stats."""
    measures = ["hba1c", "systolic_bp", "total_cholesterol"]
    out = []
    for i in range(n):
        patients = int(11 + rng.paretovariate(1.2) * 10) % 5000 + 11
        out.append(
            dict(
                fingerprint=f"{rng.getrandbits(256):064x}",
                treatment=f"TX_{rng.randint(1, 40):04d}",
                measure=measures[i % 3],
                period=rng.choice(["2023", "2024", "2024-Q3", "2024-11"]),
                patients=patients,
                responders=rng.randint(0, patients),
                mean_change=round(rng.uniform(-40, 10), 4) + 0.0,
                sd_change=round(rng.uniform(0.1, 25), 4),
                mapping_version="v1",
                seq=20240000 + rng.randint(101, 1231),
            )
        )
    return out


def _rate(fn, items, min_seconds: float = 0.3) -> float:
    """Operations per CPU second over ``items``, repeated until at least ``min_seconds`` of CPU time."""
    done, start = 0, time.process_time()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.process_time() - start
        if elapsed >= min_seconds:
            return done / elapsed


def run(options) -> dict:
    from qis_fhir.packets.codec import PacketSigner, encode_packet, signing_bytes
    from qis_fhir.packets.keys import create_site
    from qis_fhir.packets.manifest import add_site, create_network, load_manifest
    from qis_fhir.packets.replay import MemoryReplayState
    from qis_fhir.packets.verifier import Verifier

    rng = random.Random(getattr(options, "seed", 7))
    n = 5000
    with tempfile.TemporaryDirectory(prefix="qis-bench-packets-") as tmp:
        root = Path(tmp)
        create_network(root / "net", network_id="bench")
        site = create_site("bench-site-01", root / "site")
        add_site(root / "net", root / "site")
        manifest = load_manifest(root / "net")
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    fields = _fields(rng, n)

    packets = [signer.sign(**f) for f in fields]  # warm-up and the packets verified below
    wires = [encode_packet(p) for p in packets]
    messages = [signing_bytes(p) for p in packets]
    raw_key, raw_pub = site.private_key, site.private_key.public_key()
    sigs = [p.signature for p in packets]

    raw_sign = _rate(raw_key.sign, messages)
    sign = _rate(lambda f: signer.sign(**f), fields)  # fields -> checked, size-checked, signed packet
    raw_verify_openssl = _rate(lambda i: raw_pub.verify(sigs[i], messages[i]), range(n))
    from nacl.signing import VerifyKey

    nacl_key = VerifyKey(site.public_key)
    raw_verify = _rate(lambda i: nacl_key.verify(messages[i], sigs[i]), range(n))

    def verify_all(_):
        v = Verifier(manifest, MemoryReplayState())  # fresh replay state: every packet is new, as on first receipt
        for w in wires:
            if not v.verify(w).ok:
                raise AssertionError("bench packet rejected")

    verify = n * _rate(verify_all, [None])  # rounds of n packets per CPU second

    warm = Verifier(manifest, MemoryReplayState())
    for w in wires:
        warm.verify(w)
    verify_repeat = _rate(lambda w: warm.verify(w), wires)  # re-deliveries: signature cache hit, seen as duplicate

    sizes = sorted(len(w) for w in wires)
    return {
        "packets": n,
        "sign_per_s": round(sign),
        "verify_per_s": round(verify),
        "verify_repeat_per_s": round(verify_repeat),
        "raw_ed25519_sign_per_s": round(raw_sign),
        "raw_ed25519_verify_per_s": round(raw_verify),
        "raw_ed25519_verify_openssl_per_s": round(raw_verify_openssl),
        "sign_overhead_ratio": round(raw_sign / sign, 2),
        "verify_overhead_ratio": round(raw_verify / verify, 2),
        "sign_target_per_s": SIGN_TARGET_PER_S,
        "verify_target_per_s": VERIFY_TARGET_PER_S,
        "size_bytes_min": sizes[0],
        "size_bytes_median": int(statistics.median(sizes)),
        "size_bytes_p99": sizes[int(0.99 * (len(sizes) - 1))],
        "size_bytes_max": sizes[-1],
        "size_bytes_limit": 512,
    }
