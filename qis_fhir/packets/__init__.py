"""packets stage: packet model and canonical codec, signing, network manifest, verifier, builder.

Names are loaded lazily so the DHT node (which needs only the verifier) never imports pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Packet": "model",
    "PacketFormatError": "model",
    "MAX_WIRE_BYTES": "model",
    "encode_packet": "codec",
    "decode_packet": "codec",
    "sign_packet": "codec",
    "PacketSigner": "codec",
    "SiteIdentity": "keys",
    "create_site": "keys",
    "load_site": "keys",
    "NetworkManifest": "manifest",
    "NetworkContext": "manifest",
    "create_network": "manifest",
    "add_site": "manifest",
    "revoke": "manifest",
    "load_manifest": "manifest",
    "load_network": "manifest",
    "default_pin_path": "manifest",
    "ReplayState": "replay",
    "MemoryReplayState": "replay",
    "Verifier": "verifier",
    "Verdict": "verifier",
    "REASONS": "verifier",
    "PacketBuild": "build",
    "build_packets": "build",
    "write_packets": "build",
    "read_packets": "build",
    "write_disclosure_report": "build",
    "Release": "release",
    "open_release": "release",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qis_fhir.packets' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qis_fhir.packets.{module}"), name)
