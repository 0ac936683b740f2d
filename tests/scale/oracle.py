"""What a finished run folder says, as counts and digests a change of engine must leave unchanged.

``run_digest`` reads a run folder (``qis-fhir run`` with a site and network) and returns every count
a user sees (extract summary, quarantine, outcome summary, quality verdicts, disclosure report) and
content digests of the outcome events, control units and the packets' cells. ``recorded.json`` holds
these for the fixtures and a synthetic export, taken from the whole-table implementation before the
stages read Parquet in shards; ``python tests/scale/oracle.py record`` re-takes them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
RECORDED = HERE / "recorded.json"
REPO = HERE.parent.parent
FIXTURES = REPO / ".." / "shared" / "fixtures"
#: a fixed patient-key secret, so the keys (and the event ids derived from them) are the same every run
SECRET = bytes(range(32))
SYNTH = {"patients": 600, "seed": 13, "start_years": 3}
#: summary fields that depend on where and when a run happened, not on what it found
VOLATILE = {"seconds", "export_dir"}


def _frame_digest(df: pd.DataFrame) -> str:
    """sha256 of the rows in a canonical order (the sort below) and column order, values as text."""
    df = df.sort_values(list(df.columns[:1]), kind="stable").reset_index(drop=True)
    text = df.astype(str).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _quality(folder: Path, part: str) -> dict:
    report = json.loads((folder / "quality" / f"{part}.json").read_text())
    return {
        "success": report["success"],
        "tables": {
            name: {"rows": t["rows"], "results": [[r["source"], r["expectation"], r["columns"], r["success"], r["element_count"],
                                                     r["unexpected_count"], r["missing_count"], r["observed"]] for r in t["results"]]}
            for name, t in report["tables"].items()
        },
    }


def run_digest(folder: Path) -> dict:
    folder = Path(folder)
    summary = json.loads((folder / "extract" / "summary.json").read_text())
    quarantine = sorted((folder / "quarantine.ndjson").read_text().splitlines())
    out = {
        "extract": {k: v for k, v in summary.items() if k not in VOLATILE},
        "quarantine_sha256": hashlib.sha256("\n".join(quarantine).encode()).hexdigest(),
        "outcome_summary": json.loads((folder / "outcome_summary.json").read_text()),
        "outcome_events": _frame_digest(pd.read_parquet(folder / "outcome_events.parquet")),
        "quality": {part: _quality(folder, part) for part in ("extract", "outcome_events")},
    }
    if (folder / "control_units.parquet").exists():
        out["control_units"] = _frame_digest(pd.read_parquet(folder / "control_units.parquet"))
    if (folder / "disclosure_report.json").exists():
        out["disclosure"] = json.loads((folder / "disclosure_report.json").read_text())
        out["packets"] = sum(1 for line in (folder / "packets.ndjson").read_bytes().splitlines() if line.strip())
    return out


def exports(tmp: Path) -> dict[str, Path]:
    """The exports the oracle covers: the Synthea fixtures and a synthetic export (written into ``tmp``)."""
    from qis_fhir.synth import generate_export

    synth = tmp / "synth-export"
    if not synth.exists():
        generate_export(synth, truth_path=tmp / "synth.truth.json", max_lines_per_file=5_000, gzip=True, **SYNTH)
    return {"synthea-r4-105": FIXTURES / "synthea-r4-105", "synthea-bulk-10": FIXTURES / "synthea-bulk-10", "synth": synth}


def site(tmp: Path) -> tuple[Path, Path]:
    """A new site and network in ``tmp`` (fresh keys: the digests hold no signature; a new release
    state: what a run releases does not depend on the runs before it)."""
    from qis_fhir.packets import add_site, create_network, create_site
    from qis_fhir.packets.keys import SITE_SECRET

    root = tmp
    if not (root / "net").exists():
        create_network(root / "net", network_id="scale-oracle", min_cell_size=3)
        create_site("site-a", root / "site")
        add_site(root / "net", root / "site")
        secret = root / "site" / SITE_SECRET  # a fixed patient-key secret: the same keys every time
        secret.write_text(SECRET.hex() + "\n")
        secret.chmod(0o600)
    return root / "site", root / "net"


def run(export: Path, out: Path, mapping: str, tmp: Path, **extra) -> dict:
    from qis_fhir.pipeline import RunConfig, run_pipeline

    site_dir, net_dir = site(out.parent / f"{out.name}-site")
    run_pipeline(RunConfig(export_dir=export, out_dir=out, mapping_dir=REPO / "mappings" / mapping, site_dir=site_dir,
                           network_dir=net_dir, seq=20260101, **extra))
    return run_digest(out)


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        recorded = {}
        for name, export in exports(tmp).items():
            for mapping in ("v1", "v2"):
                recorded[f"{name}/{mapping}"] = run(export, tmp / f"run-{name}-{mapping}", mapping, tmp)
        RECORDED.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORDED}")
