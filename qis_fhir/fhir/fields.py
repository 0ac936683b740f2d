"""Strict field extraction: one FHIR resource (a parsed JSON object) -> row tuples for its table.

Each handler reads only the fields its table needs, checks each value's JSON type and form, and
either returns the rows (tuples in ``schema.TABLES`` column order) or raises ``Reject`` with a reason.
Written for speed (closures over local names, no per-row dicts, a date cache, the patient key
memoised by ``Pseudonymizer``), though the common Observation line never gets here: ``fastpath.py``
takes it, and hands anything it is not sure of to ``observation`` below.

Observation rules (docs/extract.md):
- the Observation's own ``valueQuantity`` gives one row; a malformed one rejects the resource;
- each component with a ``valueQuantity`` gives one row, with the Observation's code as ``panel_code``;
  a malformed component is dropped and counted by reason, unless no numeric value remains at all,
  in which case the resource is rejected with that component's reason;
- an Observation without any numeric value (``valueCodeableConcept``, ``valueString``...) is accepted
  and gives no row (the caller counts it as ``accepted_without_rows``).
"""

from __future__ import annotations

from collections.abc import Callable

from qis_fhir.fhir import reasons as R
from qis_fhir.fhir.dates import DateOutOfRange, instant_us
from qis_fhir.fhir.dates import _cache as _date_cache
from qis_fhir.fhir.reasons import Reject
from qis_fhir.fhir.systems import ICD10CM, LOINC, RXNORM, SNOMED
from qis_fhir.fhir.systems import UCUM as UCUM_SYSTEM
from qis_fhir.fhir.units import allowed_units

CONDITION_SYSTEMS = frozenset({SNOMED, ICD10CM})
GENDERS = frozenset({"female", "male", "other", "unknown"})
MAX_ID_CHARS = 64  # FHIR id: 1..64 characters

Handler = Callable[[dict, "dict[str, str] | None", int], list]


def _reference_parts(ref: str, urns: dict[str, str] | None, field: str) -> list[str]:
    """A reference's path segments, a bundle's ``urn:uuid:`` resolved and ``/_history/n`` dropped."""
    if ref.startswith("urn:"):
        target = urns.get(ref) if urns else None
        if target is None:
            raise Reject(R.INVALID_REFERENCE, f"{field} is a urn reference the bundle does not resolve")
        ref = target
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return parts


def resolve_reference(ref: str, want: str, urns: dict[str, str] | None, field: str) -> str:
    """``Type/id`` for a literal reference to a ``want`` resource; ``urn:uuid:`` looked up in ``urns``.

    Accepts relative (``Patient/1``), versioned (``Patient/1/_history/2``) and absolute
    (``https://server/fhir/Patient/1``) references.
    """
    parts = _reference_parts(ref, urns, field)
    if len(parts) >= 2 and parts[-2] == want and parts[-1] and len(parts[-1]) <= MAX_ID_CHARS:
        return want + "/" + parts[-1]
    raise Reject(R.INVALID_REFERENCE, f"{field} is not a reference to a {want}")


def reference_type(ref: str, urns: dict[str, str] | None, field: str) -> tuple[str, str]:
    """(type, "Type/id") of any literal reference; raises for unresolved urns and malformed ones."""
    parts = _reference_parts(ref, urns, field)
    if len(parts) >= 2 and parts[-2] and parts[-1]:
        return parts[-2], parts[-2] + "/" + parts[-1]
    raise Reject(R.INVALID_REFERENCE, f"{field} is not a literal reference")


def usable_codings(cc: object, field: str) -> list[tuple[str, str]]:
    """(system, code) of every coding of a CodeableConcept with both; raises when there is none."""
    if type(cc) is not dict:
        if cc is None:
            raise Reject(R.MISSING_CODE, f"{field} is missing")
        raise Reject(R.INVALID_FIELD, f"{field} is not a CodeableConcept")
    codings = cc.get("coding")
    if type(codings) is not list or not codings:
        raise Reject(R.MISSING_CODE, f"{field} has no coding")
    usable = []
    for c in codings:
        if type(c) is dict:
            s = c.get("system")
            k = c.get("code")
            if type(s) is str and type(k) is str and s and k:
                usable.append((s, k))
    if not usable:
        raise Reject(R.MISSING_CODE, f"{field} has no coding with both a system and a code")
    return usable


def pick_coding(cc: object, preferred: str, field: str) -> tuple[str, str]:
    """(system, code) of the ``preferred``-system coding, else the first coding with both."""
    usable = usable_codings(cc, field)
    for sk in usable:
        if sk[0] == preferred:
            return sk
    return usable[0]


def condition_codings(cc: object) -> list[tuple[str, str]]:
    """Every SNOMED CT / ICD-10-CM coding, else the first usable coding (docs/architecture.md)."""
    usable = usable_codings(cc, "code")
    chosen = [sk for sk in dict.fromkeys(usable) if sk[0] in CONDITION_SYSTEMS]
    return chosen or usable[:1]


def make_handlers(
    patient_key: Callable[[str], str],
    own_key_for: Callable[[str], Callable[[str], str]],
    dropped: list[str],
) -> dict[str, Handler]:
    """Handlers by resource type. ``patient_key`` is memoised (references repeat); a resource's own
    key, seen once, comes uncached from ``own_key_for(type)(id)`` (``OwnKeys.for_type``).

    Reasons of components dropped from an otherwise usable Observation are appended to ``dropped``;
    the caller counts them once the resource is finally accepted (model validation may still reject
    it) and clears the list after every resource. ``line`` is where the resource was read (line or
    Bundle entry number); observation rows carry it as provenance (the sink adds the file).
    """
    units = allowed_units()
    pending = dropped
    medications: dict[str, tuple[str, str]] = {}  # "Medication/<id>" -> (system, code)
    condition_key = own_key_for("Condition")
    request_key = own_key_for("MedicationRequest")
    date_get = _date_cache.get
    max_plain_ref = len("Patient/") + MAX_ID_CHARS  # the longest plain ``Patient/<id>``

    def when(text: object, field: str) -> int:
        if type(text) is not str:
            raise Reject(R.UNPARSEABLE_DATE, f"{field} is not a string")
        value = date_get(text)
        if value is None:
            try:
                value = instant_us(text)
            except DateOutOfRange as out:
                raise Reject(R.DATE_OUT_OF_RANGE, f"{field} {out}") from None
            except (ValueError, OverflowError):
                raise Reject(R.UNPARSEABLE_DATE, f"{field} is not a FHIR date or dateTime") from None
        return value

    def period_start(obj: dict, name: str) -> object:
        period = obj.get(name)
        if period is None:
            return None
        if type(period) is not dict:
            raise Reject(R.INVALID_FIELD, f"{name} is not a Period")
        return period.get("start")

    def first_date(obj: dict, direct: str, period: str, fallback: str | None, field: str) -> int | None:
        """``direct``, else ``period``.start, else ``fallback`` as a timestamp; None when all are absent."""
        text = obj.get(direct)
        if text is None:
            text = period_start(obj, period)
            if text is None:
                if fallback is None:
                    return None
                text = obj.get(fallback)
                if text is None:
                    return None
        return when(text, field)

    def resource_id(obj: dict) -> str:
        rid = obj.get("id")
        if type(rid) is not str or not rid:
            raise Reject(R.MISSING_ID, "id is missing or empty")
        if len(rid) > MAX_ID_CHARS or "/" in rid:
            raise Reject(R.INVALID_FIELD, "id is not a FHIR id")
        return rid

    def subject_key(obj: dict, urns: dict[str, str] | None) -> str:
        subj = obj.get("subject")
        if subj is None:
            raise Reject(R.MISSING_SUBJECT, "subject is missing")
        if type(subj) is not dict:
            raise Reject(R.INVALID_FIELD, "subject is not a Reference")
        ref = subj.get("reference")
        if type(ref) is not str:
            raise Reject(R.MISSING_SUBJECT, "subject has no literal reference")
        if not (ref.startswith("Patient/") and len(ref) > 8 and ref.find("/", 8) < 0 and len(ref) <= max_plain_ref):
            ref = resolve_reference(ref, "Patient", urns, "subject")
        return patient_key(ref)

    def status_of(obj: dict) -> str:
        status = obj.get("status")
        if type(status) is not str or not status:
            raise Reject(R.INVALID_FIELD, "status is missing or not a string")
        return status

    def quantity(vq: object, field: str) -> tuple[float, str]:
        if type(vq) is not dict:
            raise Reject(R.INVALID_VALUE, f"{field} is not a Quantity")
        v = vq.get("value")
        tv = type(v)
        if tv is not float:
            if tv is int:
                v = float(v)
            elif v is None:
                raise Reject(R.MISSING_VALUE, f"{field}.value is missing")
            else:
                raise Reject(R.INVALID_VALUE, f"{field}.value is not a number")
        if "comparator" in vq:
            raise Reject(R.INVALID_VALUE, f"{field} has a comparator (a censored value)")
        code = vq.get("code")
        unit = code if code is not None and vq.get("system") == UCUM_SYSTEM else vq.get("unit")
        if type(unit) is not str:
            if unit is None:
                raise Reject(R.MISSING_UNIT, f"{field} has no unit")
            raise Reject(R.INVALID_FIELD, f"{field} unit is not a string")
        if unit not in units:
            raise Reject(R.UNKNOWN_UNIT, f"{field} unit is not in the UCUM allow-list")
        return v, unit

    def observation(o: dict, urns: dict[str, str] | None, line: int) -> list:
        resource_id(o)
        pk = subject_key(o, urns)
        system, code = pick_coding(o.get("code"), LOINC, "code")
        status = status_of(o)
        ts = first_date(o, "effectiveDateTime", "effectivePeriod", "issued", "effective")
        if ts is None:
            raise Reject(R.MISSING_DATE, "no effectiveDateTime, effectivePeriod.start or issued")
        rows = []
        vq = o.get("valueQuantity")
        if vq is not None:
            value, unit = quantity(vq, "valueQuantity")
            rows.append((pk, system, code, None, value, unit, ts, status, line))
        comps = o.get("component")
        if comps is not None:
            if type(comps) is not list:
                raise Reject(R.INVALID_FIELD, "component is not a list")
            dropped = None
            for comp in comps:
                try:
                    if type(comp) is not dict:
                        raise Reject(R.INVALID_FIELD, "component is not an object")
                    cvq = comp.get("valueQuantity")
                    if cvq is None:
                        continue  # a coded or text component: not a numeric value
                    csys, ccode = pick_coding(comp.get("code"), LOINC, "component.code")
                    cvalue, cunit = quantity(cvq, "component.valueQuantity")
                except Reject as rej:
                    if dropped is None:
                        dropped = []
                        # the strings, not the exception: its traceback holds this frame, a reference
                        # cycle that keeps the parsed line (and, through f_back, the caller's buffers)
                        # alive while extract_export runs with the collector paused
                        first_reason, first_detail = rej.reason, rej.detail
                    dropped.append(rej.reason)
                    continue
                rows.append((pk, csys, ccode, code, cvalue, cunit, ts, status, line))
            if dropped is not None:
                if not rows:
                    raise Reject(first_reason, "no numeric value left: " + first_detail)
                pending.extend(dropped)
        return rows


    def condition(o: dict, urns: dict[str, str] | None, line: int) -> list:
        rid = resource_id(o)
        pk = subject_key(o, urns)
        codes = condition_codings(o.get("code"))
        onset_ts = first_date(o, "onsetDateTime", "onsetPeriod", "recordedDate", "onset")
        if onset_ts is None:
            raise Reject(R.MISSING_DATE, "no onsetDateTime, onsetPeriod.start or recordedDate")
        abatement_ts = first_date(o, "abatementDateTime", "abatementPeriod", None, "abatement")
        clinical = None
        cs = o.get("clinicalStatus")
        if cs is not None:
            if type(cs) is not dict or type(cs.get("coding", [])) is not list:
                raise Reject(R.INVALID_FIELD, "clinicalStatus is not a CodeableConcept")
            for c in cs.get("coding", ()):
                if type(c) is dict and type(c.get("code")) is str:
                    clinical = c["code"]
                    break
        ckey = condition_key(rid)
        return [(ckey, pk, s, k, onset_ts, abatement_ts, clinical) for s, k in codes]

    def medication_request(o: dict, urns: dict[str, str] | None, line: int) -> list:
        rid = resource_id(o)
        pk = subject_key(o, urns)
        mcc = o.get("medicationCodeableConcept")
        if mcc is None and "medicationReference" in o:
            system, code = referenced_medication(o, urns)
        else:
            system, code = pick_coding(mcc, RXNORM, "medicationCodeableConcept")
        authored = o.get("authoredOn")
        if authored is None:
            raise Reject(R.MISSING_DATE, "authoredOn is missing")
        authored_ts = when(authored, "authoredOn")
        status = status_of(o)
        intent = o.get("intent")
        if intent is not None and type(intent) is not str:
            raise Reject(R.INVALID_FIELD, "intent is not a string")
        reason_keys: list[str] = []
        refs = o.get("reasonReference")
        if refs is not None:
            if type(refs) is not list:
                raise Reject(R.INVALID_FIELD, "reasonReference is not a list")
            for ref_obj in refs:
                if type(ref_obj) is not dict:
                    raise Reject(R.INVALID_FIELD, "reasonReference is not a Reference")
                ref = ref_obj.get("reference")
                if ref is None:
                    continue  # a logical (identifier-only) reference: nothing to join on
                if type(ref) is not str:
                    raise Reject(R.INVALID_FIELD, "reasonReference.reference is not a string")
                rtype, typed = reference_type(ref, urns, "reasonReference")
                if rtype == "Condition":
                    k = patient_key(typed)  # memoised: a Condition is referenced by many requests
                    if k not in reason_keys:
                        reason_keys.append(k)
        reason_codes: list[str] = []
        rcs = o.get("reasonCode")
        if rcs is not None:
            if type(rcs) is not list:
                raise Reject(R.INVALID_FIELD, "reasonCode is not a list")
            for cc in rcs:
                if type(cc) is not dict or type(cc.get("coding", [])) is not list:
                    raise Reject(R.INVALID_FIELD, "reasonCode is not a CodeableConcept")
                for c in cc.get("coding", ()):
                    if type(c) is dict:
                        s, k = c.get("system"), c.get("code")
                        if type(s) is str and type(k) is str and s and k:
                            reason_codes.append(s + "|" + k)
        rkey = request_key(rid)
        return [(rkey, pk, system, code, authored_ts, status, intent, reason_keys, reason_codes)]

    def referenced_medication(o: dict, urns: dict[str, str] | None) -> tuple[str, str]:
        """The code of the Medication a request names by ``medicationReference``: a contained one
        (``#id``), or one read earlier from the export (``Medication.ndjson`` sorts before
        ``MedicationRequest.ndjson``; in a Bundle, Medication entries are read first)."""
        ref_obj = o.get("medicationReference")
        ref = ref_obj.get("reference") if type(ref_obj) is dict else None
        if type(ref) is not str or not ref:
            raise Reject(R.MISSING_CODE, "medicationReference has no literal reference")
        if ref.startswith("#"):
            contained = o.get("contained")
            if type(contained) is list:
                for res in contained:
                    if type(res) is dict and res.get("resourceType") == "Medication" and res.get("id") == ref[1:]:
                        return pick_coding(res.get("code"), RXNORM, "contained Medication.code")
            raise Reject(R.MISSING_CODE, "medicationReference names a contained Medication that is absent")
        rtype, typed = reference_type(ref, urns, "medicationReference")
        found = medications.get(typed) if rtype == "Medication" else None
        if found is None:
            raise Reject(R.MISSING_CODE, "medicationReference names a Medication not (yet) read from the export")
        return found

    def medication(o: dict, urns: dict[str, str] | None, line: int) -> list:
        """No table of its own: remembers the Medication's code for requests that reference it."""
        rid = resource_id(o)
        medications["Medication/" + rid] = pick_coding(o.get("code"), RXNORM, "code")
        return []

    def encounter(o: dict, urns: dict[str, str] | None, line: int) -> list:
        """A visit: who, when, what kind (``class``), and its status; nothing else is read (no type,
        reason, location or participant: a denominator needs only that a visit took place)."""
        resource_id(o)
        pk = subject_key(o, urns)
        status = status_of(o)
        cls = o.get("class")
        if cls is None:
            raise Reject(R.MISSING_CODE, "class is missing")
        if type(cls) is not dict:
            raise Reject(R.INVALID_FIELD, "class is not a Coding")
        cls_code = cls.get("code")
        if type(cls_code) is not str or not cls_code:
            raise Reject(R.MISSING_CODE, "class has no code")
        period = o.get("period")
        if period is None:
            raise Reject(R.MISSING_DATE, "period is missing")
        if type(period) is not dict:
            raise Reject(R.INVALID_FIELD, "period is not a Period")
        start = period.get("start")
        if start is None:
            raise Reject(R.MISSING_DATE, "period.start is missing")
        start_ts = when(start, "period.start")
        end = period.get("end")
        end_ts = None if end is None else when(end, "period.end")
        if end_ts is not None and end_ts < start_ts:
            raise Reject(R.INVALID_FIELD, "period.end is before period.start")
        return [(pk, start_ts, end_ts, cls_code, status)]

    def patient(o: dict, urns: dict[str, str] | None, line: int) -> list:
        rid = resource_id(o)
        gender = o.get("gender")
        if gender is None:
            gender = "unknown"
        elif type(gender) is not str or gender not in GENDERS:
            raise Reject(R.INVALID_FIELD, "gender is not a FHIR administrative gender code")
        birth = o.get("birthDate")
        birth_ts = None if birth is None else when(birth, "birthDate")
        deceased = o.get("deceasedDateTime")
        deceased_ts = None if deceased is None else when(deceased, "deceasedDateTime")
        return [(patient_key("Patient/" + rid), gender, birth_ts, deceased_ts)]

    return {
        "Observation": observation,
        "Condition": condition,
        "MedicationRequest": medication_request,
        "Patient": patient,
        "Medication": medication,
        "Encounter": encounter,
    }
