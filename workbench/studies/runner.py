"""Running a study: every planned (config, seed) not yet recorded, by an executor: ``local`` (``jobs``
single-thread workers of this process, optionally one ``shard`` of several machines sharing a results folder) or
``submitit`` (each run a job of a cluster scheduler, or of submitit's local cluster: ``cluster``).

Imports: this package's ``spec``, ``run`` and ``cluster``; ``workbench.train.provenance`` (the clean-commit rule).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .run import base_accuracy, run_one
from .spec import METRICS, ROOT, StudyError, arm_spec, load_study, plan, result_path


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


def _worker(args) -> tuple[str, int, float, float]:
    path, config, seed, device, results, allow_dirty, tensorboard = args
    t0 = time.time()
    study = load_study(path)
    record = run_one(study, config, seed, device, results=results, threads=1, allow_dirty=allow_dirty,
                     tensorboard=tensorboard)
    return config, seed, record[study["metric"]], time.time() - t0


def run_study(path, only=None, seeds=None, device: str = "auto", results: Path | None = None,
              jobs: int | None = None, shard: tuple[int, int] | None = None, allow_dirty: bool = False,
              executor: str = "local", cluster: str = "slurm", launcher: dict | None = None,
              wait: bool | None = None, tensorboard: bool = True) -> list[dict]:
    """Run every (config, seed) not yet recorded; ``jobs`` single-thread workers in parallel on this machine,
    ``shard`` a disjoint slice for one of several machines.  ``executor='submitit'``: each run a job of ``cluster``
    (slurm or local; ``launcher``: the flags over the study's ``launcher:`` block; ``jobs``: at most that many at
    once; ``wait``: wait for them, the default for local), see ``workbench.studies.cluster``.  ``tensorboard``:
    event files under ``<results>/<study>/tensorboard/``.  Returns the new records' (config, seed, acc)."""
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
            recorded = json.loads(done_path.read_text()).get("arm_spec")
            if recorded is not None and recorded != json.loads(json.dumps(arm_spec(study, c))):
                raise StudyError(f"{done_path} was recorded with a different definition of arm {c!r} than the study "
                                 f"file now gives; rename the arm or move the old records away")
    how = f"{jobs} worker{'s' if jobs > 1 else ''}" if executor == "local" else f"submitit, {cluster} cluster"
    print(f"{study['name']}: {len(todo) - len(pending)} of {len(todo)} runs recorded, {len(pending)} to run "
          f"({how})", flush=True)
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
    done = []
    if jobs <= 1:
        results_iter = map(_worker, tasks)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
        results_iter = (f.result() for f in as_completed([pool.submit(_worker, t) for t in tasks]))
    try:
        for i, (config, seed, acc, seconds) in enumerate(results_iter, 1):
            print(f"[{i}/{len(pending)}] {config} seed {seed}: {METRICS[study['metric']]} {acc:.4f} "
                  f"({seconds:.0f}s)", flush=True)
            done.append({"config": config, "seed": seed, "test_acc": acc})
    finally:
        if jobs > 1:
            pool.shutdown(cancel_futures=True)  # joined here, not at interpreter exit (which raised there)
    return done
