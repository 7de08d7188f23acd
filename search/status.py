"""`search status`: how a study is doing: trials by state, the best trial, throughput, and the
workers alive right now.

A worker is alive when its RUNNING trial has a fresh heartbeat in the storage's heartbeat table
(younger than the grace period); a worker between two trials is briefly not counted. Collecting
also fails (and requeues) trials of dead workers whose grace period has passed, as a worker does
before each trial, so a study whose workers all died does not show trials RUNNING forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from search.settings import Settings
from search.study import OBJECTIVE_NAME, load, open_storage, rdb_behind, redact, with_retries

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def collect(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Everything `render` shows, as plain JSON-ready values."""
    storage = open_storage(settings)  # with heartbeats: fail_stale_trials needs them
    study = load(storage, settings)
    with_retries(lambda: fail_stale_trials(study), "failing stale trials")
    trials = with_retries(lambda: trial_times(study), "reading trials")
    names = with_retries(lambda: study.metric_names, "reading the objective's name")
    now = now or datetime.now()
    report: dict[str, Any] = {
        "study": settings.study,
        "objective": names[0] if names else OBJECTIVE_NAME,  # named by the next worker
        "storage": redact(settings.storage),
        "at": now.isoformat(timespec="seconds"),
        "trials": len(trials),
        "states": {state.name: 0 for state in TrialState},
        "best": None,
        "throughput": throughput(trials, now),
        "workers": None,
    }
    for t in trials:
        report["states"][t.state.name] += 1
    if report["states"][TrialState.COMPLETE.name]:
        best = with_retries(lambda: study.best_trial, "reading the best trial")  # one query
        report["best"] = {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "worker": best.user_attrs.get("worker"),
        }
    if isinstance(storage, RDBStorage):
        report["workers"] = with_retries(
            lambda: live_workers(storage, study, settings.grace_period), "reading heartbeats"
        )
    return report


class TrialTimes(NamedTuple):
    """What status needs of a trial: its state and times."""

    state: TrialState
    datetime_start: datetime | None
    datetime_complete: datetime | None


def trial_times(study: optuna.Study) -> Sequence[TrialTimes | FrozenTrial]:
    """Every trial's state and times: one query of three columns on RDB storage. Whole trials
    (parameters with their distributions, attributes, every intermediate value) took 95% of
    `status` at 1,000 trials, seconds at 2,000 (benchmarks/big_study.py). Other storages (the
    gRPC proxy) give whole trials."""
    storage = rdb_behind(study._storage)
    if storage is None:
        return study.get_trials(deepcopy=False)
    table = models.TrialModel.__table__
    query = sa.select(table.c.state, table.c.datetime_start, table.c.datetime_complete).where(
        table.c.study_id == study._study_id
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [TrialTimes(state, _local(start), _local(end)) for state, start, end in rows]


# Optuna 5 stores trial times as naive UTC and shows them in naive local time (its TrialModel's
# datetime_start property); earlier versions stored local time.
_STORED_UTC = hasattr(models.TrialModel, "_datetime_start_utc")


def _local(stored: datetime | None) -> datetime | None:
    """A stored trial time as FrozenTrial shows it."""
    if stored is None or not _STORED_UTC:
        return stored
    return stored.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def throughput(
    trials: Sequence[TrialTimes | FrozenTrial], now: datetime
) -> dict[str, float | None]:
    """Finished trials per hour: over the last hour, and since the first trial started."""
    ends = [t.datetime_complete for t in trials if t.state in FINISHED and t.datetime_complete]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    last_hour = sum(end >= now - timedelta(hours=1) for end in ends)
    overall = None
    if ends and starts:
        hours = (max(ends) - min(starts)).total_seconds() / 3600
        overall = round(len(ends) / hours, 1) if hours > 0 else None
    return {"last_hour": float(last_hour), "overall": overall, "finished": float(len(ends))}


def live_workers(storage: RDBStorage, study: optuna.Study, grace_period: int) -> dict[str, Any]:
    """RUNNING trials with their heartbeat age, read from Optuna's heartbeat table in the
    database's own clock (the one heartbeats are written with)."""
    trial_t, beat_t = models.TrialModel, models.TrialHeartbeatModel
    query = (
        sa.select(trial_t.trial_id, trial_t.number, beat_t.heartbeat)
        .outerjoin(beat_t, beat_t.trial_id == trial_t.trial_id)
        .where(trial_t.study_id == study._study_id, trial_t.state == TrialState.RUNNING)
        .order_by(trial_t.number)
    )
    with storage.engine.connect() as conn:
        db_now = conn.execute(sa.select(sa.func.now())).scalar_one().replace(tzinfo=None)
        rows = conn.execute(query).all()
    running: list[dict[str, Any]] = []
    for trial_id, number, beat in rows:
        age = None if beat is None else (db_now - beat.replace(tzinfo=None)).total_seconds()
        attrs = storage.get_trial_user_attrs(trial_id)
        running.append(
            {
                "trial": number,
                "worker": attrs.get("worker"),
                "gpu": attrs.get("gpu"),
                "heartbeat_age_s": None if age is None else round(max(age, 0.0), 1),
                "alive": age is not None and age <= grace_period,
            }
        )
    return {
        "alive": sum(r["alive"] for r in running),
        "grace_period_s": grace_period,
        "running": running,
    }


def render(report: dict[str, Any]) -> str:
    """A few aligned lines for people; `--json` gives the same data to scripts."""
    states = report["states"]
    shown = [f"{n} {name.lower()}" for name, n in states.items() if n]
    lines = [
        f"study       {report['study']} on {report['storage']} at {report['at']}",
        f"trials      {report['trials']} in all: {', '.join(shown) or 'none yet'}",
    ]
    best = report["best"]
    if best is None:
        lines.append("best        no complete trial yet")
    else:
        params = ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items())
        lines.append(
            f"best        trial {best['trial']}: {best['value']:.4f} {report['objective']} "
            f"({params})"
        )
    rate = report["throughput"]
    overall = "-" if rate["overall"] is None else f"{rate['overall']:.1f}"
    lines.append(
        f"throughput  {rate['last_hour']:.0f} trials in the last hour, "
        f"{overall} per hour since the first trial"
    )
    workers = report["workers"]
    if workers is None:
        lines.append("workers     unknown (the storage keeps no heartbeats)")
        return "\n".join(lines)
    lines.append(
        f"workers     {workers['alive']} alive (heartbeat within {workers['grace_period_s']}s)"
    )
    rows = [
        [
            str(r["trial"]),
            str(r["worker"] or "?"),
            "-" if r["gpu"] is None else str(r["gpu"]),
            "-" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:.0f}s ago",
            "alive" if r["alive"] else "stale",
        ]
        for r in workers["running"]
    ]
    if rows:
        lines.append("")
        lines.extend(table(["trial", "worker", "gpu", "heartbeat", "state"], rows))
    return "\n".join(lines)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
