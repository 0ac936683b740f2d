"""Run rules on a DataFrame with great-expectations (ephemeral, in-memory, imported lazily).

One ephemeral data context per process holds one pandas data source; each table gets a dataframe
asset with a whole-dataframe batch definition, and each (table, resolved rules) pair gets one
expectation suite and validation definition, built on first use and reused afterwards (building
them costs more than validating a small table). The DataFrame itself is passed at run time.

Why the lock: Dagster may run assets on threads, and GE's in-memory stores are not documented as
thread-safe.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import TYPE_CHECKING, Any

from qis_fhir.quality.report import ExpectationResult
from qis_fhir.quality.suites import Rule
from qis_fhir.quality.vocabulary import NOW_PARAMETER, VOCABULARY, build_expectation

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

_DATASOURCE = "qis_fhir"
_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_RULE_META = "qis_rule"
_lock = threading.RLock()
_context: Any = None
_validations: dict[str, Any] = {}  # suite name -> ValidationDefinition


def _quiet_ge_loggers() -> None:
    """GE modules set their own loggers to INFO on import (e.g. a line per ephemeral context naming a
    temporary directory); make them follow the application's log level like every other library."""
    import great_expectations.data_context.types.base  # noqa: F401  (the module that sets INFO)

    level = logging.getLogger().getEffectiveLevel()
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("great_expectations") and isinstance(logger, logging.Logger) and logger.level:
            logger.setLevel(level)


def get_context() -> Any:
    """The process's ephemeral GE context (created once: progress bars and analytics off)."""
    global _context
    with _lock:
        if _context is None:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            _quiet_ge_loggers()
            ctx = gx.get_context(mode="ephemeral")
            ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            try:
                ctx.enable_analytics(False)
            except Exception:  # noqa: BLE001 - analytics may be compiled out; then there is nothing to turn off
                log.debug("great_expectations has no analytics switch")
            ctx.data_sources.add_pandas(_DATASOURCE)
            _context = ctx
        return _context


def _derived_name(index: int) -> str:
    return f"__qis_expr_{index}"


def _validation_definition(table: str, fingerprint: str, rules: tuple[Rule, ...]) -> Any:
    name = f"{table}__{fingerprint}"
    with _lock:
        vd = _validations.get(name)
        if vd is not None:
            return vd
        import great_expectations as gx

        ctx = get_context()
        ds = ctx.data_sources.get(_DATASOURCE)
        asset = ds.add_dataframe_asset(name=name)
        batch = asset.add_batch_definition_whole_dataframe("whole")
        suite = gx.ExpectationSuite(name=name)
        for i, rule in enumerate(rules):
            column = _derived_name(i) if rule.name == "expression_between" else None
            exp = build_expectation(rule, column)
            exp.meta = {_RULE_META: i}
            suite.add_expectation(exp)
        suite = ctx.suites.add(suite)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        _validations[name] = vd
        return vd


def _raised(er: Any) -> str | None:
    """The exception class GE caught while evaluating ``er``, if any (never its message: it may quote data)."""
    info = er.exception_info or {}
    candidates = info.values() if info and all(isinstance(v, dict) for v in info.values()) else [info]
    for item in candidates:
        if isinstance(item, dict) and item.get("raised_exception"):
            message = item.get("exception_message") or ""
            tb = item.get("exception_traceback") or ""
            last = tb.strip().splitlines()[-1] if tb.strip() else message
            name = last.split(":", 1)[0].strip()
            # only a dotted class name is kept: anything else might be message text quoting data
            return name.rsplit(".", 1)[-1] if _CLASS_NAME.match(name) else "error"
    return None


def run_rules(table: str, fingerprint: str, rules: tuple[Rule, ...], df: pd.DataFrame) -> list[ExpectationResult]:
    """Validate ``df`` against ``rules``; one result per rule, in rule order."""
    import numpy as np
    import pandas as pd

    data = df
    derived: dict[str, Any] = {}
    eval_errors: dict[int, str] = {}
    for i, rule in enumerate(rules):
        if rule.name != "expression_between":
            continue
        missing = [c for c in rule.columns if c not in df.columns]
        if missing:
            derived[_derived_name(i)] = np.full(len(df), np.nan)
            eval_errors[i] = f"column missing: {', '.join(missing)}"
            continue
        try:
            derived[_derived_name(i)] = pd.to_numeric(df.eval(rule.args["expression"]), errors="raise")
        except Exception as exc:  # noqa: BLE001 - reported as a failed rule, by class name only
            derived[_derived_name(i)] = np.full(len(df), np.nan)
            eval_errors[i] = f"could not be evaluated ({type(exc).__name__})"
    if derived:
        data = df.assign(**derived)

    vd = _validation_definition(table, fingerprint, rules)
    now = pd.Timestamp.now(tz="UTC")
    with _lock:
        run = vd.run(
            batch_parameters={"dataframe": data},
            expectation_parameters={NOW_PARAMETER: now},
            result_format="BASIC",
        )

    by_rule: dict[int, Any] = {}
    for er in run.results:
        idx = (er.expectation_config.meta or {}).get(_RULE_META)
        if idx is not None:
            by_rule[int(idx)] = er

    out: list[ExpectationResult] = []
    for i, rule in enumerate(rules):
        kind = VOCABULARY[rule.name].kind
        er = by_rule.get(i)
        if i in eval_errors:
            out.append(ExpectationResult(rule, False, observed=eval_errors[i]))
            continue
        missing = [c for c in (*rule.columns, *(rule.where or {})) if c not in df.columns]
        if missing:
            out.append(ExpectationResult(rule, False, observed=f"column missing: {', '.join(missing)}"))
            continue
        if er is None:  # GE dropped it: treat as a failure rather than a silent pass
            out.append(ExpectationResult(rule, False, observed="not evaluated"))
            continue
        raised = _raised(er)
        if raised is not None:
            out.append(ExpectationResult(rule, False, observed=f"could not be evaluated ({raised})"))
            continue
        res = er.result or {}
        if kind == "schema":
            out.append(ExpectationResult(rule, bool(er.success), observed="present" if er.success else "column missing"))
        elif kind == "dtype":
            out.append(ExpectationResult(rule, bool(er.success), observed=f"dtype {res.get('observed_value')}"))
        elif kind == "table":
            out.append(ExpectationResult(rule, bool(er.success), observed=f"row count {res.get('observed_value')}"))
        else:
            pct = res.get("unexpected_percent")
            out.append(
                ExpectationResult(
                    rule,
                    bool(er.success),
                    element_count=_int(res.get("element_count")),
                    unexpected_count=_int(res.get("unexpected_count")),
                    unexpected_percent=float(pct) if pct is not None else None,
                    missing_count=_int(res.get("missing_count")),
                )
            )
    return out


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None
