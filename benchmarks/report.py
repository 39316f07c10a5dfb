"""Aggregation over repetitions, and the markdown report."""

from __future__ import annotations

import math
from typing import Any

from .harness import summarize
from .workloads import WORKLOADS, Metric, Workload

SYSTEM_LABELS = {"itask": "itask", "celery": "Celery", "dramatiq": "Dramatiq"}


def aggregate(workload: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's entry: every run, each metric's median and spread, the primary value."""
    ok = [r for r in runs if r.get("status") == "ok"]
    errors = [r.get("error", "?") for r in runs if r.get("status") != "ok"]
    entry: dict[str, Any] = {"status": "ok" if ok else "error", "runs": runs}
    if errors:
        entry["errors"] = errors
    keys: list[str] = []
    for run in ok:
        for key in run.get("metrics", {}):
            if key not in keys:
                keys.append(key)
    entry["metrics"] = {key: summarize([r["metrics"].get(key, math.nan) for r in ok])
                        for key in keys}
    primary = entry["metrics"].get(workload.primary.key)
    entry["value"] = primary["median"] if primary else None
    return entry


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(entry: dict[str, Any] | None, key: str) -> str:
    if entry is None:
        return "–"
    status = entry.get("status")
    if status == "n/a":
        return "n/a"
    if status == "skipped":
        return "skipped"
    summary = (entry.get("metrics") or {}).get(key)
    if status == "error" or not summary or summary.get("median") is None:
        return "error" if status == "error" else "–"
    text = fmt(summary["median"])
    if len(summary["values"]) > 1:
        text += f" ({fmt(summary['min'])}–{fmt(summary['max'])})"
    failed = len(entry.get("errors", ()))
    if failed:
        text += f" [{failed} failed]"
    return text


def median_of(entry: dict[str, Any] | None, key: str) -> float | None:
    if not entry or entry.get("status") != "ok":
        return None
    summary = (entry.get("metrics") or {}).get(key)
    return None if not summary else summary.get("median")


def ratio(metric: Metric, itask: float | None, celery: float | None) -> str:
    if not itask or not celery:
        return "–"
    value = itask / celery if metric.higher_is_better else celery / itask
    return f"{value:.2f}×"


def verdict(metric: Metric, systems: dict[str, Any]) -> tuple[str, str]:
    if metric.target is None:
        return "", ""
    it = median_of(systems.get("itask"), metric.key)
    if it is None:
        return metric.target.text, "–"
    ok = metric.target.check(it, median_of(systems.get("celery"), metric.key),
                             median_of(systems.get("dramatiq"), metric.key))
    return metric.target.text, {True: "met", False: "**missed**", None: "–"}[ok]


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"Run {meta['started']} on {meta['host']} ({meta['cpus']} CPUs, shared and "
             f"noisy); {meta['repeat']} repetition(s), "
             f"{'QUICK sizes' if meta['quick'] else 'full sizes'}. Each cell: median "
             "(min–max over repetitions). Ratio: oriented so > 1 means itask is better.",
             "", f"Versions: {meta['versions']}; commit {meta.get('commit', 'not recorded')}.",
             ""]
    load = meta.get("load")
    if load:
        lines[-1:-1] = ["", f"1-minute load average of the machine when repetitions began: "
                        f"median {load['median']:.1f}, range {load['min']:.1f}–{load['max']:.1f} "
                        "(2 cores; above 2 means other work competed for the CPU)."]
    for broker, workloads in results.items():
        lines += [f"### Broker: {broker}", "",
                  "| Workload | Metric | itask | Celery | Dramatiq | itask vs Celery "
                  "| Target (itask) | |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, data in workloads.items():
            workload = WORKLOADS[name]
            systems = data["systems"]
            for index, metric in enumerate(workload.metrics):
                target, met = verdict(metric, systems)
                first = f"`{name}`" if index == 0 else ""
                lines.append(
                    f"| {first} | {metric.label}{f' ({metric.unit})' if metric.unit else ''} "
                    f"| {cell(systems.get('itask'), metric.key)} "
                    f"| {cell(systems.get('celery'), metric.key)} "
                    f"| {cell(systems.get('dramatiq'), metric.key)} "
                    f"| {ratio(metric, median_of(systems.get('itask'), metric.key), median_of(systems.get('celery'), metric.key))} "  # noqa: E501
                    f"| {target} | {met} |")
        lines.append("")
        details = _details(workloads)
        if details:
            lines += [f"Other measurements ({broker}, medians):", "", *details, ""]
        problems = _problems(workloads)
        if problems:
            lines += [f"Errors ({broker}):", "", *problems, ""]
    return "\n".join(lines)


def _details(workloads: dict[str, Any]) -> list[str]:
    out = []
    for name, data in workloads.items():
        shown = {m.key for m in WORKLOADS[name].metrics}
        for system, entry in data["systems"].items():
            if entry.get("status") != "ok":
                continue
            extra = [f"{key}={fmt(s['median'])}" for key, s in entry["metrics"].items()
                     if key not in shown and s.get("median") is not None]
            if extra:
                out.append(f"- `{name}` {SYSTEM_LABELS.get(system, system)}: "
                           + ", ".join(extra))
    return out


def _problems(workloads: dict[str, Any]) -> list[str]:
    out = []
    for name, data in workloads.items():
        for system, entry in data["systems"].items():
            for error in entry.get("errors", ()):
                out.append(f"- `{name}` {system}: {error.splitlines()[0][:300]}")
    return out
