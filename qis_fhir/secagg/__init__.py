"""Secure aggregation over the DHT: small cells pooled across sites without any site's counts disclosed."""

from qis_fhir.secagg.round import PHASES, Board, RoundRef

__all__ = ["PHASES", "Board", "RoundRef"]
