"""A study's runs as jobs of a cluster scheduler, through submitit (the engine DeiT, DINO, DINOv2 and ConvNeXt
launch through): ``study run FILE --executor submitit [--cluster slurm|local]``.

Each planned (config, seed) not yet recorded becomes one job (under SLURM, one job array per submission) that
trains it with ``run.run_one`` and writes its record atomically into the results folder, the same record a local
run writes (its provenance names the executor, host and job id).  ``--cluster local`` runs the jobs as processes of
this machine (no scheduler; the tests), at most ``--jobs`` at a time.

* The clean-commit rule holds for every job: a job runs the commit it was submitted from, or refuses; and the arm as
  the study file defined it at submission, or refuses.
* Re-running the command submits only what is missing: runs recorded, queued or running are left alone; a job that
  failed or was killed (pre-emption, time limit, a lost node) is submitted again and resumes from its run folder's
  last checkpoint.  Under SLURM, a job warned of its end (submitit asks for ``USR2`` 90 s before the time limit) is
  requeued by submitit itself and resumes the same way.
* ``study status`` shows each run as recorded, queued, running, stopped, failed (with the tail of its log) or not
  submitted, from the records, the ledger of submitted jobs and the scheduler (``sacct``; local jobs: their
  processes); runs of ``study run``'s own workers from their run folders' ``running.json`` and checkpoints.

Files, beside the run folders (``<runs>/<study>/_jobs/``, never among the records): ``ledger.json`` (run -> its
latest job), submitit's pickles and logs (``<job id>_0_log.out`` / ``.err``) and ``<config>__seed<k>.started.json``
(where and when a job began).

Imports: this package's ``spec`` and ``run``; ``workbench.train.provenance``; submitit (inside functions).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pickle
import shlex
import shutil
import socket
import time
from pathlib import Path

from ..atomic import atomic_write_text
from .run import live_run, run_progress
from .spec import (METRICS, ROOT, StudyError, arm_spec, check_launcher, load_study, parse_minutes, result_path,
                   run_folder, runs_folder)

CLUSTERS = ("slurm", "local")
ACTIVE = ("queued", "running")
LOCAL_TIME_MIN = 7 * 24 * 60  # submitit's local jobs stop at a time limit (2 minutes unless told): none in effect
# sacct states: waiting for resources, or holding them; anything else without a result is a job that ended early
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "READY",
                "UNKNOWN"}
SLURM_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _key(config: str, seed: int) -> str:
    return f"{config}__seed{seed}"


def _plain(value):
    return json.loads(json.dumps(value))


def jobs_folder(study: dict, results: Path | None = None) -> Path:
    """The jobs' ledger, pickles and logs: ``<runs>/<study>/_jobs``."""
    return runs_folder(study, results) / "_jobs"


def read_ledger(study: dict, results: Path | None = None) -> dict:
    path = jobs_folder(study, results) / "ledger.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- what a job runs ----------------------------------------------------------------------------------------------
class RunJob:
    """The callable each job runs (pickled by submitit): one (config, seed) of a study, checked against what was
    submitted (commit, arm), then trained and recorded by ``run_one``."""

    def __init__(self, study_path: str, config: str, seed: int, *, device: str, results: str | None,
                 allow_dirty: bool, tensorboard: bool, commit: str, arm: dict, executor: str):
        self.study_path, self.config, self.seed = study_path, config, seed
        self.device, self.results, self.allow_dirty, self.tensorboard = device, results, allow_dirty, tensorboard
        self.commit, self.arm, self.executor = commit, arm, executor

    def __call__(self) -> dict:
        import submitit

        from ..train.provenance import git_commit
        from .run import run_one

        t0 = time.time()
        job_id = submitit.JobEnvironment().job_id
        commit = git_commit()
        if commit.removesuffix("+dirty") != self.commit.removesuffix("+dirty") or (
                commit != self.commit and not self.allow_dirty):
            raise StudyError(f"this job runs the code of commit {commit} (in {ROOT}) but was submitted from "
                             f"{self.commit}: a record must come from the commit its job was submitted from; check "
                             f"that commit out again, or submit again from this one")
        study = load_study(self.study_path)
        if self.config not in study["configs"] or _plain(arm_spec(study, self.config)) != self.arm:
            raise StudyError(f"{self.study_path}: arm {self.config!r} changed since this job was submitted; run "
                             f"python -m workbench study run {self.study_path} --executor submitit again")
        results = Path(self.results) if self.results else None
        checkpoint = run_folder(study, self.config, self.seed, results) / "checkpoint.pt"
        resumed = checkpoint.exists()
        atomic_write_text(jobs_folder(study, results) / f"{_key(self.config, self.seed)}.started.json",
                          json.dumps({"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(),
                                      "started": _now(), "resumed": resumed}) + "\n")
        print(f"{study['name']}/{self.config} seed {self.seed}: job {job_id} on {socket.gethostname()}, code {ROOT} "
              f"at {commit}" + (f"; resuming from {checkpoint}" if resumed else ""), flush=True)
        record = run_one(study, self.config, self.seed, self.device, results=results, threads=1,
                         allow_dirty=self.allow_dirty, tensorboard=self.tensorboard,
                         launch={"executor": self.executor, "job_id": job_id})
        value = record[study["metric"]]
        print(f"recorded {result_path(study, self.config, self.seed, results)}: {METRICS[study['metric']]} "
              f"{value:.4f}", flush=True)
        return {"config": self.config, "seed": self.seed, "value": value, "seconds": round(time.time() - t0, 1),
                "resumed": resumed}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit when the scheduler warns of the job's end (time limit, pre-emption): requeue this same
        job; it resumes from the run folder's last checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


# -- where each run stands ----------------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), to tell it from a later process given the same id; None
    when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): alive or not, no more
        except (OSError, ValueError):
            return None
        return "?"
    return None if fields[0] in ("Z", "X") else fields[19]


def _scheduler_state(entry: dict, started: dict | None) -> tuple[str, str]:
    """('queued' | 'running' | 'ended', what the scheduler says) for a job with no result yet."""
    if entry["cluster"] == "local":
        alive = _proc_start(int(entry["job_id"]))
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
    import statistics

    every = statistics.median([c for v in costs.values() for c in v])
    left = [r for r in rows if r["state"] != "recorded"]
    seconds = sum(statistics.median(costs[r["config"]]) if r["config"] in costs else every for r in left)
    n = sum(map(len, costs.values()))
    amount = f"{seconds / 3600:.1f} worker-hours" if seconds >= 3600 else f"{seconds / 60:.0f} worker-minutes"
    return (f"left: {len(left)} run{'s' if len(left) != 1 else ''}, about {amount} at the "
            f"pace of the {n} recorded (each config's median run; runs in progress counted whole)")


# -- submitting -----------------------------------------------------------------------------------------------------
def launcher_settings(study: dict, flags: dict | None, cluster: str) -> dict:
    """The study's ``launcher:`` block overridden by the flags given (``slurm`` options merged, ``setup`` lines
    appended), checked."""
    block = dict(study.get("launcher") or {})
    flags = {k: v for k, v in (flags or {}).items() if v not in (None, {}, [])}
    slurm = {**(block.get("slurm") or {}), **(flags.pop("slurm", None) or {})}
    setup = list(block.get("setup") or []) + list(flags.pop("setup", None) or [])
    block.update(flags)
    block.update({k: v for k, v in (("slurm", slurm), ("setup", setup)) if v})
    check_launcher(block, f"{study['_path']}: launcher (with the flags)")
    if cluster == "slurm" and block.get("time") is None:
        raise StudyError(f"{study['_path']}: give each job's time limit, e.g. --time 02:00:00 or launcher: "
                         f"{{time: \"02:00:00\"}} in the study file (a killed job resumes from its checkpoint)")
    return block


def submitit_parameters(study: dict, block: dict, cluster: str, jobs: int | None) -> dict:
    """AutoExecutor parameters of one run's job (the slurm_* ones are ignored by the local cluster)."""
    root = shlex.quote(str(ROOT))
    params = {"name": f"study-{study['name']}", "nodes": 1, "tasks_per_node": 1,
              "timeout_min": parse_minutes(block["time"], "launcher") if block.get("time") else LOCAL_TIME_MIN,
              "cpus_per_task": int(block.get("cpus", 1)), "gpus_per_node": int(block.get("gpus", 0)),
              "mem_gb": block.get("mem_gb"), "slurm_partition": block.get("partition"),
              "slurm_additional_parameters": block.get("slurm") or None,
              # the job imports the workbench of the checkout it was submitted from (then checks the commit)
              "slurm_setup": [f"cd {root}", f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}",
                              *block.get("setup", [])]}
    if jobs:
        params["slurm_array_parallelism"] = jobs
    return params


def make_executor(study: dict, cluster: str, block: dict, jobs: int | None, results: Path | None):
    import submitit

    if cluster not in CLUSTERS:
        raise StudyError(f"--cluster {cluster} is not one of {CLUSTERS}")
    if cluster == "slurm" and shutil.which("srun") is None:
        raise StudyError("--cluster slurm: this machine has no SLURM (srun is not on PATH); submit from the cluster's "
                         "login node, or use --cluster local to run the jobs here")
    folder = jobs_folder(study, results)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**submitit_parameters(study, block, cluster, jobs))
    return executor


@contextlib.contextmanager
def _from_checkout():
    """Jobs start in this checkout with it first on their path, so that they import its workbench."""
    cwd, path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), path]))
    try:
        yield
    finally:
        os.chdir(cwd)
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path


def _outcome(job, cluster: str) -> tuple[str, object]:
    from submitit.core.utils import JobPaths

    paths = JobPaths(job.paths.folder, job_id=job.job_id, task_id=0)
    deadline = time.time() + (2 if cluster == "local" else 60)  # a shared file system may show the result late
    while (found := _result(paths)) is None and time.time() < deadline:
        time.sleep(0.2)
    return found or ("killed", "ended without a result: killed, pre-empted or out of time")


def submit_runs(study: dict, path, pending: list, *, device: str, results: Path | None, allow_dirty: bool,
                tensorboard: bool, cluster: str, launcher: dict | None, jobs: int | None,
                wait: bool | None) -> list[dict]:
    """Submit every run of ``pending`` that has no job queued or running; under ``--cluster local`` (or ``wait``)
    wait for them and report each.  Returns the new records' (config, seed, score), as the local runner does."""
    from ..train.provenance import git_commit

    block = launcher_settings(study, launcher, cluster)
    if study["profile"] == "gpu" and not block.get("gpus") and device != "cpu":
        raise StudyError(f"{path} is a gpu-profile study: give its jobs a GPU (--gpus 1, or launcher: {{gpus: 1}}), "
                         f"or pass --device cpu to run them on CPUs anyway")
    wait = cluster == "local" if wait is None else wait
    if cluster == "local" and not wait:
        raise StudyError("--no-wait is for a scheduler: local jobs run while this command waits for them "
                         "(use --cluster slurm, or leave --no-wait out)")
    results = Path(results).resolve() if results else None
    states = {(r["config"], r["seed"]): r for r in run_states(study, pending, results)}
    waiting = [(c, s) for c, s in pending if states[(c, s)]["state"] in ACTIVE]
    todo = [(c, s) for c, s in pending if (c, s) not in waiting]
    folder = jobs_folder(study, results)
    print(f"{study['name']}: {len(waiting)} already queued or running (left alone); submitting {len(todo)} as "
          f"submitit {cluster} jobs (logs in {folder})", flush=True)
    if not todo:
        return []
    commit = git_commit()
    executor = make_executor(study, cluster, block, jobs, results)
    name = f"submitit-{cluster}"

    def job_of(config, seed):
        return RunJob(str(Path(path).resolve()), config, seed, device=device,
                      results=str(results) if results else None, allow_dirty=allow_dirty, tensorboard=tensorboard,
                      commit=commit, arm=_plain(arm_spec(study, config)), executor=name)

    ledger = read_ledger(study, results)

    def note(config, seed, job):
        key = _key(config, seed)
        earlier = ledger.get(key, {})
        ledger[key] = {"job_id": job.job_id, "cluster": cluster, "folder": str(folder), "submitted": _now(),
                       "commit": commit,
                       "earlier": earlier.get("earlier", []) + ([earlier["job_id"]] if earlier else [])}
        if cluster == "local":
            ledger[key]["pid_start"] = _proc_start(int(job.job_id))
        atomic_write_text(folder / "ledger.json", json.dumps(ledger, indent=1) + "\n")

    metric = METRICS[study["metric"]]
    done, failed, running = [], [], {}
    queue = list(todo)

    def submit(batch):
        with _from_checkout():
            if len(batch) == 1:
                submitted = [executor.submit(job_of(*batch[0]))]
            else:
                with executor.batch():  # one SLURM job array
                    submitted = [executor.submit(job_of(c, s)) for c, s in batch]
        for (c, s), job in zip(batch, submitted):
            note(c, s, job)
            running[(c, s)] = job
        return submitted

    if cluster != "local":
        submitted = submit(queue)
        queue = []
        print(f"submitted {len(submitted)} jobs ({', '.join(j.job_id for j in submitted[:3])}"
              f"{', ...' if len(submitted) > 3 else ''}); python -m workbench study status {path} shows them",
              flush=True)
        if not wait:
            return []
    limit = (jobs or 1) if cluster == "local" else len(todo)
    n = 0
    while queue or running:
        while queue and len(running) < limit:
            submit([queue.pop(0)])
        for (config, seed), job in list(running.items()):
            if not job.done():
                continue
            del running[(config, seed)]
            n += 1
            kind, value = _outcome(job, cluster)
            if kind == "success":
                print(f"[{n}/{len(todo)}] {config} seed {seed}: {metric} {value['value']:.4f} ({value['seconds']:.0f}s"
                      f"{', resumed' if value['resumed'] else ''}; job {job.job_id})", flush=True)
                done.append({"config": config, "seed": seed, "test_acc": value["value"]})
            else:
                reason = _reason(value)
                print(f"[{n}/{len(todo)}] {config} seed {seed}: FAILED (job {job.job_id}): {reason}", flush=True)
                failed.append(f"{config} seed {seed}")
        if queue or running:
            time.sleep(0.2 if cluster == "local" else 30)
    if failed:
        raise StudyError(f"{len(failed)} of {len(todo)} jobs failed ({', '.join(failed)}): python -m workbench study "
                         f"status {path} shows their logs; fix the cause and run this command again (it submits only "
                         f"what is missing; killed runs resume from their checkpoints)")
    return done
