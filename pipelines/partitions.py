"""The daily partitions every asset shares: one partition per nightly export folder.

A partition key is the date an export covers (``YYYY-MM-DD``), which is also the name of its folder
under ``export_root``. The start date bounds what a backfill can ask for; ``QIS_TIMEZONE`` (an IANA
name, default UTC) sets where a day begins, read once when the code location loads.
"""

from __future__ import annotations

import os

from dagster import DailyPartitionsDefinition

PARTITIONS_START = "2024-01-01"

daily_exports = DailyPartitionsDefinition(
    start_date=PARTITIONS_START,
    timezone=os.environ.get("QIS_TIMEZONE") or "UTC",
)
