"""The outcome packet: one site's aggregate for one fingerprint x treatment x measure x period.

A packet carries counts and two rounded summary statistics, never a patient key, an exact date or
display text. Wire version 1 is a change cell (every one of ``patients`` has a change); version 2 adds
``measured``, the patients the mean and SD cover, for control cells, where some of the denominator
have no reading in the year. Field limits are enforced here (syntax) and in the verifier (ranges that depend on the
network manifest, such as the minimum cell size). See ``docs/packets.md``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: the QIS protocol's packet budget: a signed packet's wire encoding never exceeds this
MAX_WIRE_BYTES = 512
WIRE_VERSION = 1  # a change cell: the mean and SD cover every patient
WIRE_VERSION_MEASURED = 2  # a control cell: the mean and SD cover ``measured`` of the patients
WIRE_VERSIONS = (WIRE_VERSION, WIRE_VERSION_MEASURED)
SEQ_MAX = 2**53 - 1  # exact in every JSON reader (IEEE double)
COUNT_MAX = 10**9
STAT_ABS_MAX = 1e9
STAT_DECIMALS = 4  # mean and SD are rounded: enough for clinical units, no more precision to difference with

FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
TREATMENT_RE = re.compile(r"TX_[A-Z0-9_]{1,37}")
MEASURE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
PERIOD_RE = re.compile(r"(19|20)[0-9]{2}(-Q[1-4]|-(0[1-9]|1[0-2]))?")
MAPPING_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")
SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,47}")
KEY_ID_RE = re.compile(r"[0-9a-f]{32}")
SIGNATURE_BYTES = 64


class PacketFormatError(ValueError):
    """A packet (or packet fields) that is not well formed; the message names the field, never patient data."""


@dataclass(frozen=True, slots=True)
class Packet:
    fingerprint: str  # 64 hex: HMAC-SHA256 of the cohort under the network secret
    treatment: str  # TX_...
    measure: str  # outcome measure id
    period: str  # change: treatment start period ("2024", "2024-Q1", "2024-03"); control: measurement year
    patients: int  # change: patients with a change; control: the denominator
    responders: int  # change: responders; control: the numerator
    mean_change: float  # change: mean change; control: mean index value over the ``measured`` patients
    sd_change: float
    mapping_version: str
    site_id: str
    key_id: str  # 32 hex: id of the site's signing key (see keys.key_id_of)
    seq: int
    signature: bytes = b""
    measured: int | None = None  # control cells (wire v2): patients the mean and SD cover; None: all (v1)

    @property
    def wire_version(self) -> int:
        return WIRE_VERSION if self.measured is None else WIRE_VERSION_MEASURED

    @property
    def packet_id(self) -> str:
        """Stable id of the cell this packet reports: same across re-runs and across seq numbers.

        A consumer keeps the highest ``seq`` per ``(site_id, packet_id)``, so a re-run or a later
        nightly update of the same cell replaces rather than adds to it.
        """
        return packet_id_of(self.site_id, self.fingerprint, self.treatment, self.measure, self.period, self.mapping_version)

    @property
    def cell(self) -> tuple[str, str, str, str, str]:
        """The cell across sites (without the site): what the evidence stage pools over."""
        return (self.fingerprint, self.treatment, self.measure, self.period, self.mapping_version)


def packet_id_of(site_id: str, fingerprint: str, treatment: str, measure: str, period: str, mapping_version: str) -> str:
    text = "|".join((site_id, fingerprint, treatment, measure, period, mapping_version))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _check_str(name: str, value: object, pattern: re.Pattern[str]) -> None:
    if type(value) is not str or not pattern.fullmatch(value):
        raise PacketFormatError(f"field {name} is not well formed")


def _check_int(name: str, value: object, hi: int) -> None:
    if type(value) is not int or not 0 <= value <= hi:
        raise PacketFormatError(f"field {name} must be an integer in 0..{hi}")


def _check_float(name: str, value: object) -> None:
    if type(value) is not float or not (-STAT_ABS_MAX <= value <= STAT_ABS_MAX):  # NaN fails both comparisons
        raise PacketFormatError(f"field {name} must be a finite number")


def check_packet(p: Packet, *, signed: bool = True) -> None:
    """Raise ``PacketFormatError`` unless every field has the right type and syntax."""
    _check_str("fingerprint", p.fingerprint, FINGERPRINT_RE)
    _check_str("treatment", p.treatment, TREATMENT_RE)
    _check_str("measure", p.measure, MEASURE_RE)
    _check_str("period", p.period, PERIOD_RE)
    _check_int("patients", p.patients, COUNT_MAX)
    _check_int("responders", p.responders, COUNT_MAX)
    _check_float("mean_change", p.mean_change)
    _check_float("sd_change", p.sd_change)
    _check_str("mapping_version", p.mapping_version, MAPPING_VERSION_RE)
    _check_str("site_id", p.site_id, SITE_ID_RE)
    _check_str("key_id", p.key_id, KEY_ID_RE)
    _check_int("seq", p.seq, SEQ_MAX)
    if p.measured is not None:
        _check_int("measured", p.measured, COUNT_MAX)
    if signed and (type(p.signature) is not bytes or len(p.signature) != SIGNATURE_BYTES):
        raise PacketFormatError(f"signature must be {SIGNATURE_BYTES} bytes")
