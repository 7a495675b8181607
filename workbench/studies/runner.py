"""Running a study: every planned (config, seed) not yet recorded, by an executor: ``local`` (``jobs``
single-thread workers of this process, optionally one ``shard`` of several machines sharing a results folder) or
``submitit`` (each run a job of a cluster scheduler, or of submitit's local cluster: ``cluster``).  SIGINT / SIGTERM
stop it cleanly: running runs save a checkpoint at their current step, nothing new starts, and one line says how to
continue.

Imports: this package's ``spec``, ``run``, ``records`` and ``cluster``; ``workbench.train.provenance`` (the clean-commit rule) and
``workbench.train.interrupt`` (stop requests).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .records import read_record
from .run import base_accuracy, live_run, run_one
from .spec import METRICS, ROOT, StudyError, arm_spec, load_study, plan, result_path, run_folder


EXECUTORS = ("local", "submitit")


def _check_can_run(study: dict, path, device: str, here: bool = True) -> None:
    if study["protocol"] == "upcycle" and not (ROOT / study["base"]).exists():
        raise StudyError(f"{path}: the dense base {study['base']} does not exist; train it first "
                         f"(experiments/upcycle/train_base.sh for the cpu profile, experiments/gpu/train_base.sh "
                         f"for the gpu profile)")
    if study["profile"] == "gpu" and device == "auto" and here:
        import torch

        if not torch.cuda.is_available():
            raise StudyError(f"{path} is a gpu-profile study and this machine has no CUDA GPU; run it on one, "
                             f"or pass --device cpu to run it here anyway (slowly)")


def _worker_start() -> None:
    """A worker process: SIGTERM asks its run to save and stop (the parent passes every SIGINT / SIGTERM it gets on
    as SIGTERM); the terminal's Ctrl-C, which reaches the whole process group, is left to the parent."""
    from ..train.interrupt import hold_for_process

    hold_for_process(signals=(signal.SIGTERM,), ignore=(signal.SIGINT,))


def _forward(signum: int) -> None:
    """Pass a stop request on to the worker processes (as SIGTERM: their Ctrl-C is ignored)."""
    import multiprocessing as mp

    for child in mp.active_children():
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _worker(args) -> tuple[str, int, float, float]:
    from ..train.interrupt import Interrupted, requested

    path, config, seed, device, results, allow_dirty, tensorboard = args
    if requested():  # asked to stop before this run began
        raise Interrupted(f"{config} seed {seed} was not started", requested())
    t0 = time.time()
    study = load_study(path)
    record = run_one(study, config, seed, device, results=results, threads=1, allow_dirty=allow_dirty,
                     tensorboard=tensorboard)
    return config, seed, record[study["metric"]], time.time() - t0


def _command(path, only, seeds, device, jobs, shard, allow_dirty, results=None) -> str:
    """The ``study run`` command line that continues this one."""
    parts = ["python -m workbench study run", str(path)]
    parts += ["--results", str(results)] if results else []
    parts += ["--only", *only] if only else []
    parts += ["--seeds", *map(str, seeds)] if seeds else []
    parts += ["--device", device] if device != "auto" else []
    parts += ["--jobs", str(jobs)] if jobs > 1 else []
    parts += ["--shard", f"{shard[0]}/{shard[1]}"] if shard else []
    parts += ["--allow-dirty"] if allow_dirty else []
    return " ".join(parts)


def run_study(path, only=None, seeds=None, device: str = "auto", results: Path | None = None,
              jobs: int | None = None,
              shard: tuple[int, int] | None = None, allow_dirty: bool = False, executor: str = "local",
              cluster: str = "slurm", launcher: dict | None = None, wait: bool | None = None,
              tensorboard: bool = True) -> list[dict]:
    """Run every (config, seed) not yet recorded; ``jobs`` single-thread workers in parallel on this machine,
    ``shard`` a disjoint slice for one of several machines.  ``executor='submitit'``: each run a job of ``cluster``
    (slurm or local; ``launcher``: the flags over the study's ``launcher:`` block; ``jobs``: at most that many at
    once; ``wait``: wait for them, the default for local), see ``workbench.studies.cluster``.  ``tensorboard``:
    event files under ``<results>/<study>/tensorboard/``.  Returns the new records' (config, seed, acc).

    SIGINT / SIGTERM (to this process; it passes them on to its workers) stop the study cleanly: no new run starts,
    each running run saves a checkpoint at its current step, and :class:`~workbench.train.interrupt.Interrupted`
    says how many runs are recorded and the command that continues (a run resumes from its checkpoint); a second
    signal stops at once."""
    from ..train.interrupt import Interrupted, StoppedAtOnce, requested, signal_name, stop_requests

    study = load_study(path)
    if executor not in EXECUTORS:
        raise StudyError(f"--executor {executor} is not one of {EXECUTORS}")
    if jobs is not None and jobs < 1:
        raise StudyError(f"--jobs {jobs} is invalid: use 1 or more workers")
    if executor == "local" and (launcher and any(v not in (None, {}, []) for v in launcher.values())
                                or wait is not None):
        raise StudyError("the launcher flags (--partition, --time, --gpus, ...) and --wait are for --executor "
                         "submitit; leave them out for local workers")
    jobs = jobs if jobs is not None or executor == "submitit" else 1
    _check_can_run(study, path, device, here=executor == "local" or cluster == "local")
    todo = plan(study, only, seeds, shard)
    pending = [(c, s) for c, s in todo if not result_path(study, c, s, results).exists()]
    for c, s in todo:
        done_path = result_path(study, c, s, results)
        if done_path.exists():
            recorded = read_record(done_path).get("arm_spec")
            if recorded is not None and recorded != json.loads(json.dumps(arm_spec(study, c))):
                raise StudyError(f"{done_path} was recorded with a different definition of arm {c!r} than the study "
                                 f"file now gives; rename the arm or move the old records away")
    how = f"{jobs} worker{'s' if jobs > 1 else ''}" if executor == "local" else f"submitit, {cluster} cluster"
    print(f"{study['name']}: {len(todo) - len(pending)} of {len(todo)} runs recorded, {len(pending)} to run "
          f"({how})", flush=True)
    busy = {}
    for c, s in pending:
        marker = live_run(run_folder(study, c, s, results))
        if marker is not None and marker["alive"]:
            busy[c, s] = marker["pid"]
    if busy:
        print("left alone, being trained by another process of this machine: " + "; ".join(
            f"{c} seed {s} (pid {pid})" for (c, s), pid in busy.items()), flush=True)
        pending = [run for run in pending if run not in busy]
    extra = sorted(set(seeds or ()) - set(study["seeds"]))
    if extra:
        print(f"note: seeds {extra} are not among {path}'s seeds {study['seeds']}: summary and claims leave their "
              "records out until the file lists them", flush=True)
    if not pending:
        return []
    from ..train.provenance import git_commit

    if git_commit().endswith("+dirty") and not allow_dirty:
        raise StudyError("the working tree has uncommitted changes: a study record must come from a clean commit; "
                         "commit first (or pass --allow-dirty for a throw-away run)")
    if study["protocol"] == "upcycle":
        base_accuracy(study, results)  # measured once, before workers race to cache it
    if executor == "submitit":
        from .cluster import submit_runs

        return submit_runs(study, path, pending, device=device, results=results, allow_dirty=allow_dirty,
                           tensorboard=tensorboard, cluster=cluster, launcher=launcher, jobs=jobs, wait=wait)
    tasks = [(str(path), c, s, device, results, allow_dirty, tensorboard) for c, s in pending]
    done, stopped = [], None
    command = _command(path, only, seeds, device, jobs, shard, allow_dirty, results)

    def report(config, seed, acc, seconds):
        done.append({"config": config, "seed": seed, "test_acc": acc})
        print(f"[{len(done)}/{len(pending)}] {config} seed {seed}: {METRICS[study['metric']]} {acc:.4f} "
              f"({seconds:.0f}s)", flush=True)

    try:
        with stop_requests(forward=_forward if jobs > 1 else None):
            if jobs <= 1:
                for task in tasks:
                    if requested():
                        break
                    try:
                        report(*_worker(task))
                    except StoppedAtOnce:
                        raise
                    except Interrupted:
                        break
            else:
                stopped = _run_pool(tasks, jobs, report)
            stopped = requested() or stopped
    except StoppedAtOnce as err:
        raise StoppedAtOnce(f"study {study['name']}: stopped at once by a second {signal_name(err.signum)}; "
                            f"{len(done)} new runs recorded, the running ones keep their last checkpoints: continue "
                            f"with: {command}", err.signum) from None
    if stopped and len(done) < len(pending):
        raise Interrupted(f"study {study['name']}: interrupted by {signal_name(stopped)}; {len(done)} of "
                          f"{len(pending)} runs recorded, the running ones saved checkpoints and resume from them: "
                          f"continue with: {command}", stopped)
    return done


def _run_pool(tasks, jobs: int, report) -> int | None:
    """The tasks on ``jobs`` spawned single-thread workers, at most ``jobs`` submitted at a time (so that nothing
    queued starts after a stop request); the signal of a run that stopped on one, else None."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from ..train.interrupt import Interrupted, StoppedAtOnce, requested

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_start)
    queue, running, stopped, at_once = list(tasks), set(), None, False
    try:
        while queue or running:
            while queue and len(running) < jobs and not requested() and not stopped:
                running.add(pool.submit(_worker, queue.pop(0)))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    report(*future.result())
                except StoppedAtOnce:
                    at_once = True
                    raise
                except Interrupted as err:
                    stopped = stopped or err.signum
    except StoppedAtOnce:
        at_once = True
        raise
    finally:
        pool.shutdown(wait=not at_once, cancel_futures=True)  # joined here, not at interpreter exit
    return stopped
