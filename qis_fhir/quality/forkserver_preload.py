"""Imported once by the quality workers' fork server (``workers.PRELOAD``), before it forks any worker.

It imports what a worker needs, then moves every object made so far into the garbage collector's
permanent generation (``gc.freeze``), so that the workers' collections never write to those objects'
pages and they stay shared with the server instead of being copied into every worker.
"""

import gc

import great_expectations  # noqa: F401
import pandas  # noqa: F401
import pyarrow.parquet  # noqa: F401

import qis_fhir.fhir.scan  # noqa: F401
import qis_fhir.quality.engine  # noqa: F401

gc.freeze()
