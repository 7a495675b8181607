"""Where each run of a study stands: recorded, queued, running, stopped, failed or not submitted, read from the
records, the ledger of submitted jobs (``<runs>/<study>/_jobs/ledger.json``), the scheduler (``sacct``; local jobs:
their processes) and the run folders of ``study run``'s own workers (``running.json``, checkpoints); and how many
worker-hours the runs left need at the pace of those recorded.  ``study status`` prints it.

Imports: this package's ``spec`` and ``run``; submitit (inside functions).
"""
from __future__ import annotations

import json
import pickle
import statistics
from pathlib import Path

from .run import live_run, process_start, run_progress
from .spec import result_path, run_folder, runs_folder

ACTIVE = ("queued", "running")
# sacct states: waiting for resources, or holding them; anything else without a result is a job that ended early
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "READY",
                "UNKNOWN"}
SLURM_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}



def _key(config: str, seed: int) -> str:
    return f"{config}__seed{seed}"



def jobs_folder(study: dict, results: Path | None = None) -> Path:
    """The jobs' ledger, pickles and logs: ``<runs>/<study>/_jobs``."""
    return runs_folder(study, results) / "_jobs"


def read_ledger(study: dict, results: Path | None = None) -> dict:
    path = jobs_folder(study, results) / "ledger.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- where each run stands ----------------------------------------------------------------------------------------
def _scheduler_state(entry: dict, started: dict | None) -> tuple[str, str]:
    """('queued' | 'running' | 'ended', what the scheduler says) for a job with no result yet."""
    if entry["cluster"] == "local":
        alive = process_start(int(entry["job_id"]))
        if alive is None or alive != entry.get("pid_start", alive) and alive != "?":
            return "ended", "its process is gone"
        return ("running" if started and started.get("job_id") == entry["job_id"] else "queued"), ""
    try:
        import submitit

        info = submitit.SlurmJob(folder=entry["folder"], job_id=entry["job_id"]).get_info(mode="force")
        state = (info.get("State") or "UNKNOWN").split()[0]
    except Exception as err:  # no sacct here, or it failed: say so, and count the job as still queued
        return "queued", f"sacct gave no state ({type(err).__name__}); assumed queued"
    if state in SLURM_RUNNING:
        return "running", state
    if state in SLURM_QUEUED:
        return "queued", state
    return "ended", f"SLURM state {state}"


def _tail(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _result(paths) -> tuple[str, object] | None:
    if not paths.result_pickle.is_file():
        return None
    try:
        with open(paths.result_pickle, "rb") as f:
            return pickle.load(f)
    except Exception as err:  # noqa: BLE001 - a result that cannot be read is reported, not raised
        return "error", f"its result could not be read ({type(err).__name__}: {err})"


def _reason(trace) -> str:
    """The last line of a job's traceback, its exception named without its module."""
    lines = [line for line in str(trace).splitlines() if line.strip()]
    if not lines:
        return "failed"
    kind, sep, message = lines[-1].partition(": ")
    return f"{kind.rsplit('.', 1)[-1]}{sep}{message}" if " " not in kind else lines[-1]


def _job_state(entry: dict, started: dict | None, lines: int) -> dict:
    from submitit.core.utils import JobPaths

    paths = JobPaths(entry["folder"], job_id=entry["job_id"], task_id=0)
    log = paths.stderr if paths.stderr.is_file() and paths.stderr.stat().st_size else paths.stdout
    outcome = _result(paths)
    if outcome is not None and outcome[0] == "error":
        return {"state": "failed", "detail": _reason(outcome[1]), "log": str(log), "tail": _tail(log, lines)}
    if outcome is not None:
        return {"state": "failed", "detail": "the job finished but its record is missing (moved away?)",
                "log": str(paths.stdout), "tail": _tail(paths.stdout, lines)}
    state, said = _scheduler_state(entry, started)
    if state in ACTIVE:
        where = f" on {started['host']}" if state == "running" and started else ""
        return {"state": state, "detail": (said + where).strip(), "log": str(log), "tail": []}
    return {"state": "failed", "detail": f"ended without a result ({said}): killed, pre-empted or out of time",
            "log": str(log), "tail": _tail(log, lines)}


def _checkpoint_note(study: dict, config: str, seed: int, results) -> str:
    folder = run_folder(study, config, seed, results)
    if not (folder / "checkpoint.pt").exists():
        return ""
    metrics = folder / "metrics.jsonl"
    epochs = len([line for line in metrics.read_text().splitlines() if line.strip()]) if metrics.is_file() else 0
    return f"checkpoint after {epochs} epoch{'s' if epochs != 1 else ''} (+ steps): resumes from it"


def run_states(study: dict, todo, results: Path | None = None, lines: int = 12) -> list[dict]:
    """Each (config, seed) of ``todo``: state (recorded | queued | running | stopped | failed | not submitted), job
    id, detail, and for a failed job its log and the log's last ``lines`` lines.  Without a scheduler's job, a run
    that a live local process is training is ``running`` (epochs done, training time left); one that holds a
    checkpoint and no live process is ``stopped`` (the next ``study run`` resumes it)."""
    ledger = read_ledger(study, results)
    rows = []
    for config, seed in todo:
        key = _key(config, seed)
        entry = ledger.get(key)
        row = {"config": config, "seed": seed, "job_id": entry and entry["job_id"], "state": "not submitted",
               "detail": "", "log": None, "tail": []}
        if result_path(study, config, seed, results).exists():
            row["state"] = "recorded"
        elif entry is not None:
            started_path = jobs_folder(study, results) / f"{key}.started.json"
            started = json.loads(started_path.read_text()) if started_path.is_file() else None
            row.update(_job_state(entry, started, lines))
        else:
            folder = run_folder(study, config, seed, results)
            marker = live_run(folder)
            if marker is not None and marker["alive"]:  # a local worker (study run without a scheduler)
                row.update(state="running", detail=run_progress(folder, marker))
            elif marker is not None:
                row.update(state="running", detail=f"pid {marker.get('pid')} on {marker.get('host')} (another host: "
                                                   f"not checked)")
        if row["state"] in ("failed", "not submitted"):
            note = _checkpoint_note(study, config, seed, results)
            row["detail"] = "; ".join(filter(None, [row["detail"], note]))
            if note and row["state"] == "not submitted":
                row["state"] = "stopped"  # a local run stopped part-way: the next study run resumes it
        rows.append(row)
    return rows


def format_status(study: dict, rows: list[dict], costs: dict[str, list[float]] | None = None) -> str:
    """The status table; with ``costs`` (:func:`run_costs`) a last line on the worker-hours left."""
    counts = {s: sum(r["state"] == s for r in rows) for s in ("recorded", "queued", "running", "stopped", "failed",
                                                               "not submitted")}
    out = [f"{study['name']}: {len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    width = max([6] + [len(r["config"]) for r in rows])
    if any(r["state"] != "not submitted" for r in rows):
        out.append(f"{'config':<{width}}  {'seed':>4}  {'state':<13}  {'job':<12}  detail")
    waiting: dict[str, list[int]] = {}
    for r in rows:
        if r["state"] == "not submitted":  # one line per config below, not one per run
            waiting.setdefault(r["config"], []).append(r["seed"])
            continue
        out.append(f"{r['config']:<{width}}  {r['seed']:>4}  {r['state']:<13}  {r['job_id'] or '-':<12}  "
                   f"{r['detail']}".rstrip())
        if r["state"] == "failed" and r["log"]:
            out.append(f"    log: {r['log']}")
            out.extend(f"    | {line}" for line in r["tail"])
    if waiting:
        out.append("not submitted yet: " + "; ".join(f"{c} (seed{'s' if len(v) > 1 else ''} "
                                                     f"{', '.join(map(str, v))})" for c, v in waiting.items()))
    if costs:
        out.append(time_left(rows, costs))
    return "\n".join(out)


def run_costs(study: dict, results: Path | None = None) -> dict[str, list[float]]:
    """Seconds each recorded run cost, per config, from its provenance: the whole run's wall time where it ran in
    one attempt, its training time over every attempt where it was resumed (the analysis then not counted)."""
    from .records import iter_records

    costs: dict[str, list[float]] = {}
    for record in iter_records(study, results):
        prov = record.get("provenance") or {}
        seconds = prov.get("train_wall_time_s") if prov.get("resumed") else prov.get("wall_time_s")
        if seconds:
            costs.setdefault(record["config"], []).append(float(seconds))
    return costs


def time_left(rows: list[dict], costs: dict[str, list[float]]) -> str:
    """One line: the worker-hours the runs not yet recorded need at the pace of the recorded ones (the median of
    their config's runs; a config with none at the median of all)."""
    every = statistics.median([c for v in costs.values() for c in v])
    left = [r for r in rows if r["state"] != "recorded"]
    seconds = sum(statistics.median(costs[r["config"]]) if r["config"] in costs else every for r in left)
    n = sum(map(len, costs.values()))
    amount = f"{seconds / 3600:.1f} worker-hours" if seconds >= 3600 else f"{seconds / 60:.0f} worker-minutes"
    return (f"left: {len(left)} run{'s' if len(left) != 1 else ''}, about {amount} at the "
            f"pace of the {n} recorded (each config's median run; runs in progress counted whole)")
