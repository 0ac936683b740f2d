"""Named exit codes and the error types a user can act on.

Every error a user can fix maps to one exit code here; the CLI turns a ``QisError`` into its code
and prints its message. Messages must never contain patient identifiers, names, exact dates or
resource content: say *which file and line*, never *what was on it*.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # unexpected error (a bug): traceback printed
    USAGE = 2  # bad command line (click uses 2 as well)
    INPUT_NOT_FOUND = 3  # export dir, packets file, manifest... does not exist or is empty
    MAPPING_INVALID = 4  # mapping YAML failed its schema
    QUALITY_FAILED = 5  # a great-expectations suite failed: nothing is published
    NOTHING_EXTRACTED = 6  # the export held no usable resources at all
    SECRET_INVALID = 7  # a secret or key file is unreadable, malformed or has unsafe permissions
    ALREADY_EXISTS = 8  # refusing to overwrite a key, secret or network directory
    MANIFEST_INVALID = 9  # network manifest signature bad, version rolled back, or malformed
    PACKETS_REJECTED = 10  # `verify` rejected at least one packet
    NO_PEERS = 11  # no DHT peer reachable
    PUBLISH_INCOMPLETE = 12  # some packets were confirmed by no replica
    RUN_INCOMPLETE = 13  # a run folder whose run.json says it did not complete (crashed, failed, being written)
    EVIDENCE_INVALID = 14  # an evidence table lacks what the report reads, or says what it cannot explain
    SECAGG_ABORTED = 15  # a secure-aggregation round could not complete safely: nothing was unmasked
    ROUND_REPEATED = 16  # this site already took part in (or released) that secure-aggregation round
    ROUND_WINDOW = 17  # a secure-aggregation round step outside its phase's window: try again when it is due
    NODE_CERTIFICATE_INVALID = 18  # a DHT node's certificate is missing, expired, revoked or beyond its site's bound


class QisError(Exception):
    """Base of every error a user can act on; carries its exit code."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(QisError):
    """Options that contradict each other (on the command line or in a Dagster resource)."""

    exit_code = ExitCode.USAGE


class InputNotFoundError(QisError):
    exit_code = ExitCode.INPUT_NOT_FOUND


class MappingError(QisError):
    exit_code = ExitCode.MAPPING_INVALID


class QualityError(QisError):
    exit_code = ExitCode.QUALITY_FAILED


class NothingExtractedError(QisError):
    exit_code = ExitCode.NOTHING_EXTRACTED


class SecretError(QisError):
    exit_code = ExitCode.SECRET_INVALID


class AlreadyExistsError(QisError):
    exit_code = ExitCode.ALREADY_EXISTS


class ManifestError(QisError):
    exit_code = ExitCode.MANIFEST_INVALID


class PacketsRejectedError(QisError):
    exit_code = ExitCode.PACKETS_REJECTED


class NoPeersError(QisError):
    exit_code = ExitCode.NO_PEERS


class PublishIncompleteError(QisError):
    exit_code = ExitCode.PUBLISH_INCOMPLETE


class RunIncompleteError(QisError):
    exit_code = ExitCode.RUN_INCOMPLETE


class EvidenceInvalidError(QisError):
    exit_code = ExitCode.EVIDENCE_INVALID


class SecAggAbortedError(QisError):
    """A secure-aggregation round stopped before anything could be unmasked: too few sites, views of
    the round that differ, or a message that does not verify. Nothing of this site's was revealed."""

    exit_code = ExitCode.SECAGG_ABORTED


class RoundRepeatedError(QisError):
    """A second contribution to (or release of) a round this site already took part in: refused, so
    a re-run can never publish changed figures under the same round."""

    exit_code = ExitCode.ROUND_REPEATED


class RoundWindowError(QisError):
    """A round step outside its phase's window: a message after the window closed (nodes refuse it),
    a reveal or a read before the window it waits for closed."""

    exit_code = ExitCode.ROUND_WINDOW


class NodeCertificateError(QisError):
    """A DHT node cannot join: its certificate is missing, expired, revoked or beyond its site's
    bound; its site re-issues it with ``qis-fhir node-cert``."""

    exit_code = ExitCode.NODE_CERTIFICATE_INVALID
