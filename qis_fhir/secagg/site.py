"""A site's two rounds of one (measure, period) over the DHT, from its run folder: what
``qis-fhir secagg run --run RUN_DIR --measure M --period P`` does each night.

* **Input**: the run's outcome tables, cut into the round's cells by ``release.site_input`` (the cells
  this site publishes in the clear now, or released in a packet before, stay out of its masked sums).
* **Dates**: the presence round opens on ``values.round_opens`` (the first day the period can no longer
  change); the value round sums only the presence round's eligible cells, which are known once the
  presence round is unmasked, so it opens on that day (``round.value_opens``, through
  ``release.round_refs``), a round length (7 days) later. Every site derives both dates from the mapping, so every site names the same rounds.
* **Release**: once the value round is unmasked, its shown totals (``release.release_table``) go to
  the site's ``ReleaseLedger``, which the evidence stage reads; the ledger takes one release per
  (measure, period).

Each call does what is due now for both rounds (``steps.advance_step``) and returns their statuses.
``due_rounds`` says which (measure, period) pairs a night has to advance, from the mapping (the
rounds' dates) and the run's tables (the pairs this site has patients in); ``stages.secagg_step``
runs ``rounds_step`` for each.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from qis_fhir.secagg.round import DAY, PHASES, SCHEDULE, UNMASK, Schedule
from qis_fhir.secagg.steps import RESULT_FILE, STATE_FILE, RoundSetup, advance_step, stored_vector, unmask_step

#: a site directory's folder of its rounds between nights (``steps.round_folder`` per round; secrets 0600)
STATE_DIR = "secagg_state"
#: how long after the value round's last window a night still reads it: the DHT nodes keep a round's
#: messages a week after its last window (``dht.rounds.retention``), so a site that missed the unmasking
#: night still unmasks; later there is nothing left to read
READABLE_FOR = 7 * DAY


def due_rounds(run_dir: Path | str, setup: Any, now: float, schedule: Schedule = SCHEDULE) -> list[tuple[str, str]]:
    """The (measure, period) pairs of the run's tables whose rounds are under way at ``now``: the
    presence round has opened and the value round can still be read (``READABLE_FOR``)."""
    from qis_fhir.outcomes.events import read_outcome_tables
    from qis_fhir.packets.build import site_cells
    from qis_fhir.secagg.release import round_refs

    tables = read_outcome_tables(run_dir, setup.mapping)
    cells = site_cells(tables["outcome_events"], tables.get("control_units"), setup.mapping).reset_index()
    due = []
    for measure, period in sorted(set(zip(cells["measure"], cells["period"]))):
        presence, value = round_refs(setup.network.manifest.network_id, setup.mapping, measure, period, schedule)
        if schedule.starts(presence.opens) <= now < schedule.closes(value.opens, PHASES[-1]) + READABLE_FOR:
            due.append((measure, period))
    return due


def site_round_input(run_dir: Path | str, setup: Any, measure: str, period: str) -> Any:
    """This site's ``SiteInput`` for (measure, period) from a run folder (``setup``: ``stages.SiteSetup``)."""
    from qis_fhir.outcomes.events import read_outcome_tables
    from qis_fhir.packets.release import RELEASE_STATE, load_release_state
    from qis_fhir.secagg.release import released_cells, site_input

    tables = read_outcome_tables(run_dir, setup.mapping)
    state = load_release_state(setup.site.site_dir / RELEASE_STATE, setup.site)
    released = released_cells(list(state.values()), setup.network.secret, setup.mapping, measure, period)
    return site_input(tables["outcome_events"], tables.get("control_units"), setup.mapping, measure, period,
                      setup.network.manifest.min_cell_size, released)


def _unless_started(setup: RoundSetup, vector: Any) -> Any:
    """The input only for a round this site has not started: once started, the vector it kept is the
    contribution (a later run folder with late corrections does not change a round under way)."""
    return None if (setup.folder / STATE_FILE).exists() or (setup.folder / RESULT_FILE).exists() else vector


def _result(setup: RoundSetup) -> dict | None:
    path = setup.folder / RESULT_FILE
    return orjson.loads(path.read_bytes()) if path.exists() else None


def rounds_step(run_dir: Path | str, setup: Any, measure: str, period: str, *, state_dir: Path | str,
                bootstrap: tuple[tuple[str, int], ...], bind: Any = None, ksize: int = 20,
                clock: Callable[[], float] = time.time, schedule: Schedule = SCHEDULE) -> dict:
    """The steps due now in the presence round and then the value round of (measure, period)."""
    import numpy as np

    from qis_fhir.secagg.release import LEDGER_DIR, ReleaseLedger, eligible, release_table, round_refs, shown
    from qis_fhir.secagg.values import VALUE_FIELDS, decode_totals

    manifest = setup.network.manifest
    presence_ref, value_ref = round_refs(manifest.network_id, setup.mapping, measure, period, schedule)
    inputs = site_round_input(run_dir, setup, measure, period)
    common = {"site": setup.site, "network": setup.network, "state_dir": Path(state_dir), "bootstrap": tuple(bootstrap), "bind": bind, "ksize": ksize}
    presence = RoundSetup(presence_ref, **common)
    out = {"presence": advance_step(presence, _unless_started(presence, inputs.presence_vector()), cells=len(inputs.cells), clock=clock, schedule=schedule)}
    first = _result(presence)
    if first is None:
        return out
    idx = eligible(np.array(first["totals"], dtype=np.uint64), manifest.min_sites)
    value = RoundSetup(value_ref, required_contributors=frozenset(first["contributors"]), **common)
    mine = stored_vector(value.folder)  # this site's value input, read before the unmasking step deletes it
    if not len(idx):
        out["value"] = {"step": None, "eligible_cells": 0}
    elif setup.site.site_id in first["contributors"]:
        out["value"] = advance_step(value, _unless_started(value, inputs.value_vector(idx)), cells=len(idx) * len(VALUE_FIELDS), clock=clock, schedule=schedule)
    elif schedule.phase_at(value_ref.opens, clock()) == UNMASK and _result(value) is None:
        # not a presence contributor: this site takes no part in the value round, and still reads it
        out["value"] = unmask_step(dataclasses.replace(value, site=None), len(idx) * len(VALUE_FIELDS), clock=clock, schedule=schedule)
    second = _result(value)
    if second is not None and len(idx):
        decoded = decode_totals(np.array(second["totals"], dtype=np.uint64), len(idx))
        table = release_table(value_ref, inputs.cells, idx, decoded, manifest.min_cell_size, manifest.min_sites)
        contributed = None  # a site whose round input is gone counts every released cell as its own
        if setup.site.site_id not in second["contributors"]:
            contributed = np.zeros(len(table), dtype=bool)
        elif mine is not None:  # the rows of the release are the shown eligible cells, in order
            sites = mine.view(np.int64).reshape(len(idx), len(VALUE_FIELDS))[:, VALUE_FIELDS.index("sites")]
            contributed = (sites > 0)[shown(decoded, manifest.min_cell_size, manifest.min_sites)]
        ReleaseLedger(setup.site.site_dir / LEDGER_DIR).record(value_ref, table, contributed)
        out["released_cells"] = len(table)
    return out
