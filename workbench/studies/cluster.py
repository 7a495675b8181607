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
  submitted (``jobstate``: the ledger, the scheduler and the run folders).

Files, beside the run folders (``<runs>/<study>/_jobs/``, never among the records): ``ledger.json`` (run -> its
latest job), submitit's pickles and logs (``<job id>_0_log.out`` / ``.err``) and ``<config>__seed<k>.started.json``
(where and when a job began).

Imports: this package's ``spec``, ``run`` and ``jobstate``; ``workbench.train.provenance``; submitit (inside
functions).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shlex
import shutil
import socket
import time
from pathlib import Path

from ..atomic import atomic_write_text
from .jobstate import ACTIVE, _key, _reason, _result, jobs_folder, read_ledger, run_states
from .run import process_start
from .spec import (METRICS, ROOT, StudyError, arm_spec, check_launcher, load_study, parse_minutes, result_path,
                   run_folder)

CLUSTERS = ("slurm", "local")
LOCAL_TIME_MIN = 7 * 24 * 60  # submitit's local jobs stop at a time limit (2 minutes unless told): none in effect


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _plain(value):
    return json.loads(json.dumps(value))


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
            ledger[key]["pid_start"] = process_start(int(job.job_id))
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
