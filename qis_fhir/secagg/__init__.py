"""Secure aggregation over the DHT: small cells pooled across sites without any site's counts disclosed."""

from qis_fhir.secagg.local import LocalBoard, run_round
from qis_fhir.secagg.protocol import Roster, RoundJournal, RoundResult, SiteRound, threshold, unmask
from qis_fhir.secagg.round import PHASES, Board, RoundRef

__all__ = ["PHASES", "Board", "LocalBoard", "Roster", "RoundJournal", "RoundRef", "RoundResult", "SiteRound", "run_round",
           "threshold", "unmask"]
