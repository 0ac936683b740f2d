"""Bench section ``run``: the whole pipeline, extract to signed packets, on exports of growing size.

For each size (default 2, 5 and 20 million Observations; ``--sizes``) a synthetic export is written
with ``qis-fhir synth`` (gzipped parts of 100,000 lines, 100 Observations a patient, in a temporary
folder: ``TMPDIR`` decides the disk) and run once in a fresh child process with ``--workers``
processes (default 1). The child runs the stage steps in ``qis-fhir run``'s order (extract,
quality of the extract, outcomes, quality of the events, packets) and a thread samples the memory
of its whole process tree (itself and every worker) every 0.1 s with psutil. Per stage and in total:

- ``wall_s``; ``cpu_s``: user + system seconds of the child and of every process under it (``_cpu``);
- ``peak_pss_mib``: the largest sum over the tree of each process's proportional set size (a page
  shared by n processes counts 1/n in each: the memory the run takes), and ``peak_rss_mib``, the
  sum of resident sizes (counts shared pages once per process, so it overstates forked workers).

``us_per_observation`` (CPU and wall) compares the sizes; ``speedup`` is the wall time of ``workers=1``
over ``workers=2`` on the smallest size, the median of ``--repeats`` pairs run back to back in
alternating order (the machine's load drifts). Targets (docs/benchmarks.md): peak under 1 GiB at
20 million and at most 10 % above the 2-million figure, time per Observation within 20 % across the
sizes, at least 1.5x from one worker to two. Run by hand: a 20-million export takes ~1 GB of gzip and
tens of minutes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = (2_000_000, 5_000_000, 20_000_000)
OBS_PER_PATIENT = 100
SAMPLE_S = 0.1
TARGETS = {"peak_mib_at_largest": 1024, "peak_growth_over_smallest": 0.10, "per_observation_spread": 0.20, "speedup_2_workers": 1.5}


class TreeSampler:
    """Peak memory of this process and its descendants, sampled on a thread, per named phase."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._me = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        pss = rss = 0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += info.pss
            rss += info.rss
        peak = self.peaks.setdefault(self.phase, {"pss": 0, "rss": 0})
        peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def enter(self, phase: str) -> None:
        self._sample()  # the end of the phase before
        self.phase = phase
        self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _cpu() -> float:
    """CPU seconds of the whole tree: this process, its reaped children (a pool's joined workers), and
    every live descendant with the children it reaped (the stages' fork server and the
    workers it forked, which this process never reaps)."""
    import resource

    import psutil

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _child() -> None:
    """Run the stages on one export with a tree sampler; print per-stage figures (JSON)."""
    args = json.loads(sys.argv[1])
    sampler = TreeSampler()
    from qis_fhir import stages
    from qis_fhir.runfolder import EXTRACT, OUTCOMES, PACKETS, QUALITY, start_run

    root = Path(args["tmp"])
    setup = stages.open_site(mapping_dir=args["mapping"], site_dir=root / "site", network_dir=root / "net")
    steps = {}
    workers = args["workers"]
    out = root / f"run-{workers}"
    started_all, cpu_all = time.perf_counter(), _cpu()

    def timed(name, fn):
        sampler.enter(name)
        t, c = time.perf_counter(), _cpu()
        result = fn()
        steps[name] = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(_cpu() - c, 2)}
        return result

    with start_run(out, command="run", planned=[EXTRACT, OUTCOMES, QUALITY, PACKETS]) as run:
        summary = timed("extract", lambda: stages.extract_step(run, args["export"], setup, validate="sample", sample_rate=0.002,
                                                               workers=workers))
        with stages.worker_server():  # as run_pipeline holds it
            timed("quality_extract", lambda: stages.quality_step(run, setup.mapping, "extract", workers=workers).raise_for_failure())
            timed("outcomes", lambda: stages.outcomes_step(run, setup.mapping, workers=workers))
            timed("quality_events", lambda: stages.quality_step(run, setup.mapping, "outcome_events", workers=workers).raise_for_failure())
        built = timed("packets", lambda: stages.packets_step(run, setup, 20260101))
    sampler.stop()
    for name, peak in sampler.peaks.items():
        if name in steps:
            steps[name].update(peak_pss_mib=round(peak["pss"] / 2**20), peak_rss_mib=round(peak["rss"] / 2**20))
    total = {"wall_s": round(time.perf_counter() - started_all, 2), "cpu_s": round(_cpu() - cpu_all, 2),
             "peak_pss_mib": max(s["peak_pss_mib"] for s in steps.values()),
             "peak_rss_mib": max(s["peak_rss_mib"] for s in steps.values())}
    print(json.dumps({"stages": steps, "total": total, "observations_read": summary.by_type.get("Observation", {}).get("read", 0),
                      "packets": len(built.packets)}))


def _run_child(args: dict) -> dict:
    """One run in a fresh child; its figures, also echoed to stderr as they come (a long bench that is
    interrupted keeps what it measured)."""
    proc = subprocess.run([sys.executable, "-c", "from qis_fhir.bench.run import _child; _child()", json.dumps(args)],
                          capture_output=True, text=True, timeout=4 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"run bench child failed: {proc.stderr[-2000:]}")
    line = proc.stdout.strip().splitlines()[-1]
    print(f"bench run: workers {args['workers']}, load {os.getloadavg()[0]:.1f}: {line}", file=sys.stderr, flush=True)
    return json.loads(line)


def _network(tmp: Path) -> None:
    from qis_fhir.packets import add_site, create_network, create_site

    create_network(tmp / "net", network_id="bench-run")
    create_site("bench-site", tmp / "site")
    add_site(tmp / "net", tmp / "site")


def measure(sizes: tuple[int, ...], workers: int = 1, repeats: int = 3, seed: int = 7, mapping: str | None = None) -> dict:
    import shutil

    from qis_fhir.synth import generate_export

    out: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "workers": workers, "sizes": {}}
    for size in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="qis-bench-run-"))
        try:
            export = tmp / "export"
            t = time.perf_counter()
            generate_export(export, patients=max(1, size // OBS_PER_PATIENT), seed=seed, observations=size, gzip=True,
                            truth_path=tmp / "truth.json")
            synth_s = time.perf_counter() - t
            _network(tmp)
            args = {"export": str(export), "tmp": str(tmp), "mapping": mapping}
            result = _run_child({**args, "workers": workers})
            result["synth_s"] = round(synth_s, 1)
            same = [result]  # the runs of this size with the bench's workers: the speed-up pairs add theirs
            if size == sizes[0] and repeats:
                pairs = []
                for r in range(repeats):  # 1 and 2 workers back to back, in alternating order
                    order = (1, 2) if r % 2 == 0 else (2, 1)
                    runs = {w: _run_child({**args, "workers": w}) for w in order}
                    same += [runs[workers]] if workers in runs else []
                    pairs.append(round(runs[1]["total"]["wall_s"] / runs[2]["total"]["wall_s"], 3))
                out["speedup"] = {"size": size, "pairs": pairs, "median": statistics.median(pairs)}
            else:  # as many one-worker runs as the pairs give the first size: one run's CPU varied by a fifth
                same += [_run_child({**args, "workers": workers}) for _ in range(max(0, repeats - 1))]
            result["load_average_after"] = os.getloadavg()
            _per_observation(result, same)
            out["sizes"][str(size)] = result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    peaks = {s: r["peak_pss_mib_max"] for s, r in out["sizes"].items()}
    per_obs = [r["us_per_observation"]["cpu"] for r in out["sizes"].values()]
    first, last = peaks[str(sizes[0])], peaks[str(sizes[-1])]
    out["figures"] = {"peak_pss_mib": peaks, "peak_growth_over_smallest": round(last / first - 1, 3),
                      "cpu_per_observation_spread": round(max(per_obs) / min(per_obs) - 1, 3)}
    out["targets"] = TARGETS
    return out


def _per_observation(result: dict, same: list[dict]) -> None:
    """A size's time per Observation (median over its runs: on a shared machine one run's CPU time
    varied by a fifth) and its largest peak; the stage figures stay the first run's."""
    n = result["observations_read"]
    result["runs"] = len(same)
    result["us_per_observation"] = {k: round(statistics.median(r["total"][f"{k}_s"] for r in same) / n * 1e6, 2) for k in ("cpu", "wall")}
    result["peak_pss_mib_max"] = max(r["total"]["peak_pss_mib"] for r in same)


def run(options) -> dict:
    sizes = options.sizes or ((options.observations,) if options.observations else DEFAULT_SIZES)
    return measure(tuple(sizes), workers=options.workers or 1, repeats=options.repeats, seed=options.seed)
