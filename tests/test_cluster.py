"""Studies as cluster jobs through submitit (``study run --executor submitit``), on submitit's local cluster: the
records, a job killed mid-run and resubmitted, a failing job reported with its log, ``study status``; the SLURM
side (sbatch script, sacct states, what is resubmitted) without a cluster."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.studies import cluster
from workbench.studies.cluster import RunJob, launcher_settings, make_executor
from workbench.studies.jobstate import format_status, run_states
from workbench.studies.runner import run_study
from workbench.studies.spec import StudyError, arm_spec, load_study, plan, run_folder
from workbench.studies.run import run_one

TRAIN = {"dataset": "synthetic", "train_subset": 96, "val_size": 64, "test_subset": 48, "epochs": 1,
         "batch_size": 32}
MICRO = {"embed_dim": 32, "num_heads": 2}


def _write(tmp_path, study):
    path = tmp_path / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _study(tmp_path, name="tiny", **over):
    return _write(tmp_path, {"name": name, "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN,
                             "seeds": [0, 1], "common": {"num_experts": 2, **MICRO},
                             "configs": {"dense": {"moe_layers": "none"}, "last-1": {"moe_layers": "last-1"}},
                             **over})


VOLATILE = {"date", "wall_time_s", "train_wall_time_s", "resumed", "executor", "job_id"}


def _comparable(record: dict) -> dict:
    """A record without what differs between two runs of the same (config, seed): times, and which executor ran it."""
    out = json.loads(json.dumps(record))
    out["provenance"] = {k: v for k, v in out["provenance"].items() if k not in VOLATILE}
    out["history"] = [{k: v for k, v in row.items() if k not in ("wall_time", "img_per_s")} for row in out["history"]]
    if (out.get("model_config") or {}).get("metrics"):  # the last row again, as the saved model carries it
        out["model_config"]["metrics"] = {k: v for k, v in out["model_config"]["metrics"].items()
                                          if k not in ("wall_time", "img_per_s")}
    return out


def test_submitit_local_cluster_records_a_study_as_local_workers_do(tmp_path, capsys):
    path = _study(tmp_path)
    results = tmp_path / "cluster" / "results"
    done = run_study(path, results=results, executor="submitit", cluster="local", jobs=2, allow_dirty=True)
    assert sorted((d["config"], d["seed"]) for d in done) == sorted(plan(load_study(path)))
    out = capsys.readouterr().out
    assert "0 of 4 runs recorded, 4 to run (submitit, local cluster)" in out and "[4/4]" in out
    local = tmp_path / "local" / "results"
    run_study(path, results=local, jobs=1, allow_dirty=True, tensorboard=False)
    for config, seed in plan(load_study(path)):
        name = f"{config}__seed{seed}.json"
        a, b = json.loads((results / "tiny" / name).read_text()), json.loads((local / "tiny" / name).read_text())
        assert list(a) == list(b) and list(a["provenance"]) == list(b["provenance"])  # the same kind of record
        assert _comparable(a) == _comparable(b)  # and the same numbers, predictions, analyses
        assert a["provenance"]["executor"] == "submitit-local" and a["provenance"]["job_id"].isdigit()
        assert b["provenance"]["executor"] == "local" and b["provenance"]["job_id"] is None
        assert a["provenance"]["host"] == b["provenance"]["host"] and a["provenance"]["threads"] == 1
        assert "tensorboard" not in a["train_config"] and "tensorboard_dir" not in a["train_config"]
    # re-running submits nothing; status shows every run recorded, with its job
    assert run_study(path, results=results, executor="submitit", cluster="local", allow_dirty=True) == []
    assert "4 of 4 runs recorded, 0 to run" in capsys.readouterr().out
    assert main(["study", "status", str(path), "--results", str(results)]) == 0
    status = capsys.readouterr().out
    assert "tiny: 4 runs: 4 recorded" in status and status.count(" recorded ") == 4
    # TensorBoard: each run's events, and one --logdir <results> showing the whole study (records are not events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    acc = EventAccumulator(str(results / "tiny" / "tensorboard" / "last-1" / "seed1"))
    acc.Reload()
    record = json.loads((results / "tiny" / "last-1__seed1.json").read_text())
    [event] = acc.Scalars("accuracy/test")
    assert event.step == 1 and event.value == pytest.approx(record["test_acc"], abs=1e-6)
    assert {"loss/train", "lr", "throughput/img_per_s", "load_cv/block3/train", "drop_rate/block3/test"} <= \
        set(acc.Tags()["scalars"])
    runs = EventMultiplexer().AddRunsFromDirectory(str(results)).Reload().Runs()
    assert sorted(runs) == sorted(f"tiny/tensorboard/{c}/seed{s}" for c, s in plan(load_study(path)))
    # the local runs wrote none (tensorboard=False); study tensorboard writes them from the records
    assert not (local / "tiny" / "tensorboard").exists()
    assert main(["study", "tensorboard", str(path), "--results", str(local)]) == 0
    assert "event files of 4 recorded runs" in capsys.readouterr().out
    assert len(EventMultiplexer().AddRunsFromDirectory(str(local)).Reload().Runs()) == 4


def test_a_killed_job_resumes_from_its_checkpoint_when_resubmitted(tmp_path, capsys):
    train = {**TRAIN, "train_subset": 4800, "epochs": 2, "save_every": 10}  # 150 steps an epoch: time to kill it
    path = _study(tmp_path, name="long", train=train, seeds=[0], configs={"last-1": {"moe_layers": "last-1"}})
    study = load_study(path)
    results = tmp_path / "results"
    folder = run_folder(study, "last-1", 0, results)
    errors = []

    def submit():
        try:
            run_study(path, results=results, executor="submitit", cluster="local", allow_dirty=True)
        except StudyError as err:
            errors.append(str(err))

    thread = threading.Thread(target=submit)
    thread.start()
    started = cluster.jobs_folder(study, results) / "last-1__seed0.started.json"
    deadline = time.time() + 300
    while time.time() < deadline and not ((folder / "checkpoint.pt").exists() and started.exists()):
        time.sleep(0.02)
    [row] = run_states(study, plan(study), results)
    assert row["state"] == "running" and row["detail"].startswith("on ")  # and its host
    os.kill(json.loads(started.read_text())["pid"], signal.SIGKILL)  # as a scheduler ends a job: no warning
    thread.join(300)
    assert errors and "1 of 1 jobs failed (last-1 seed 0)" in errors[0] and "study status" in errors[0]
    assert not (results / "long" / "last-1__seed0.json").exists(), "the job finished before it could be killed"
    assert "FAILED" in capsys.readouterr().out
    [row] = run_states(study, plan(study), results)
    assert row["state"] == "failed" and "ended without a result" in row["detail"]
    assert "resumes from it" in row["detail"]  # its checkpoint is there
    killed = row["job_id"]
    # resubmitted: only the missing run, resumed from its checkpoint, recorded as an uninterrupted run is
    [done] = run_study(path, results=results, executor="submitit", cluster="local", allow_dirty=True)
    assert "resumed" in capsys.readouterr().out
    record = json.loads((results / "long" / "last-1__seed0.json").read_text())
    assert record["provenance"]["job_id"] != killed and done["test_acc"] == record["test_acc"]
    ledger = cluster.read_ledger(study, results)["last-1__seed0"]
    assert ledger["earlier"] == [killed]
    log = Path(ledger["folder"]) / f"{ledger['job_id']}_0_log.out"
    assert "resuming from" in log.read_text() and record["provenance"]["resumed"]
    reference = run_one(study, "last-1", 0, results=tmp_path / "ref", allow_dirty=True,
                        tensorboard=False)
    assert _comparable(record) == _comparable(reference)
    [row] = run_states(study, plan(study), results)
    assert row["state"] == "recorded"


def test_a_failing_job_is_reported_with_its_log(tmp_path, capsys):
    train = {**TRAIN, "dataset": "imagefolder", "data_root": str(tmp_path / "images")}  # not on this "node"
    path = _study(tmp_path, name="broken", train=train, seeds=[0], configs={"dense": {"moe_layers": "none"}})
    results = tmp_path / "results"
    with pytest.raises(StudyError, match=r"1 of 1 jobs failed \(dense seed 0\).*study status"):
        run_study(path, results=results, executor="submitit", cluster="local", allow_dirty=True)
    assert "FAILED (job " in capsys.readouterr().out
    assert main(["study", "status", str(path), "--results", str(results), "--lines", "5"]) == 0
    out = capsys.readouterr().out
    assert "broken: 1 runs: 1 failed" in out
    assert "DatasetNotFound: ImageFolder split not found" in out  # the reason, on the run's row
    assert "    log: " in out and out.count("    | ") == 5 and "pass --data-root" in out.split("log: ")[1]


def test_a_job_refuses_another_commit_or_a_changed_arm(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1")
    path = _study(tmp_path)
    study = load_study(path)
    monkeypatch.setattr("workbench.train.provenance.git_commit", lambda: "abc")

    def job(**kw):
        args = dict(device="cpu", results=str(tmp_path / "r"), allow_dirty=False, tensorboard=False, commit="abc",
                    arm=json.loads(json.dumps(arm_spec(study, "dense"))), executor="submitit-local")
        return RunJob(str(path), "dense", 0, **{**args, **kw})

    with pytest.raises(StudyError, match="runs the code of commit abc .* submitted from def"):
        job(commit="def")()
    with pytest.raises(StudyError, match="runs the code of commit abc .* submitted from abc\\+dirty"):
        job(commit="abc+dirty")()  # a dirty submission is only for --allow-dirty runs
    with pytest.raises(StudyError, match="arm 'dense' changed since this job was submitted"):
        job(arm={"config": {"moe_layers": "last-1"}})()
    delayed = job().checkpoint()  # the scheduler's warning: requeue the same job (it resumes from its checkpoint)
    assert delayed.function.config == "dense" and delayed.function.seed == 0


def test_slurm_jobs_carry_the_launcher_block_and_the_flags(tmp_path, monkeypatch):
    launcher = {"partition": "gpu", "time": "02:00:00", "gpus": 1, "cpus": 8, "mem_gb": 32,
                "slurm": {"account": "lab"}, "setup": ["module load cuda"]}
    study = load_study(_study(tmp_path, launcher=launcher))
    block = launcher_settings(study, {"gpus": 2, "slurm": {"qos": "high"}, "time": None}, "slurm")
    assert block["gpus"] == 2 and block["slurm"] == {"account": "lab", "qos": "high"}
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    with pytest.raises(StudyError, match="this machine has no SLURM .* or use --cluster local"):
        make_executor(study, "slurm", block, jobs=3, results=tmp_path / "results")
    bin_ = tmp_path / "bin"  # a login node: srun on PATH (never called here; the script is only written)
    bin_.mkdir()
    (bin_ / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_ / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    executor = make_executor(study, "slurm", block, jobs=3, results=tmp_path / "results")
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --job-name=study-tiny", "module load cuda", "export PYTHONPATH="):
        assert line in script, line
    assert f"cd {Path(__file__).resolve().parents[1]}" in script
    assert executor._executor.parameters["array_parallelism"] == 3
    with pytest.raises(StudyError, match="give each job's time limit, e.g. --time 02:00:00"):
        launcher_settings(load_study(_study(tmp_path, name="notime")), {}, "slurm")
    with pytest.raises(StudyError, match=r"launcher: unknown keys \['gpu'\].*other sbatch options go under slurm"):
        load_study(_study(tmp_path, name="typo", launcher={"gpu": 1}))
    with pytest.raises(StudyError, match="time='soon' is not a time limit"):
        load_study(_study(tmp_path, name="soon", launcher={"time": "soon"}))
    with pytest.raises(StudyError, match="gpu-profile study: give its jobs a GPU"):
        run_study(_study(tmp_path, name="gpu", profile="gpu", launcher={"time": 60}), results=tmp_path / "g",
                  executor="submitit", allow_dirty=True)
    with pytest.raises(StudyError, match="are for --executor submitit"):
        run_study(_study(tmp_path, name="plain"), results=tmp_path / "p", launcher={"gpus": 1}, allow_dirty=True)


def test_slurm_states_and_what_a_rerun_submits(tmp_path, monkeypatch, capsys):
    """sacct's states read as queued / running / failed; re-running submits the failed and the unsubmitted only."""
    import submitit
    from submitit.core.utils import JobPaths, cloudpickle_dump

    path = _study(tmp_path, seeds=[0, 1, 2], launcher={"time": 60})
    study = load_study(path)
    results = tmp_path / "results"
    folder = cluster.jobs_folder(study, results)
    folder.mkdir(parents=True)
    sacct = {"11": "PENDING", "12": "RUNNING", "13": "TIMEOUT", "14": "COMPLETED", "15": "CANCELLED by 42"}
    keys = ["dense__seed0", "last-1__seed0", "dense__seed1", "last-1__seed1", "dense__seed2"]
    ledger = {k: {"job_id": j, "cluster": "slurm", "folder": str(folder), "commit": "abc", "earlier": []}
              for k, j in zip(keys, sacct)}
    (folder / "ledger.json").write_text(json.dumps(ledger))
    JobPaths(folder, "13", 0).stderr.write_text("epoch 1\nslurmstepd: *** JOB 13 CANCELLED DUE TO TIME LIMIT ***\n")
    cloudpickle_dump(("error", "Traceback (most recent call last):\nValueError: lr=-1 is invalid"),
                     JobPaths(folder, "14", 0).result_pickle)
    monkeypatch.setattr(submitit.SlurmJob, "get_info", lambda self, mode="force": {"State": sacct[self.job_id]})
    rows = {(r["config"], r["seed"]): r for r in run_states(study, plan(study), results)}
    assert [rows[c, s]["state"] for c, s in [("dense", 0), ("last-1", 0), ("dense", 1), ("last-1", 1),
                                             ("dense", 2), ("last-1", 2)]] == \
        ["queued", "running", "failed", "failed", "failed", "not submitted"]
    assert "SLURM state TIMEOUT" in rows["dense", 1]["detail"] and "TIME LIMIT" in rows["dense", 1]["tail"][-1]
    assert rows["last-1", 1]["detail"] == "ValueError: lr=-1 is invalid"
    assert "SLURM state CANCELLED" in rows["dense", 2]["detail"]
    text = format_status(study, list(rows.values()))
    assert "6 runs: 1 queued, 1 running, 3 failed, 1 not submitted" in text and "| slurmstepd" in text
    assert text.splitlines()[-1] == "not submitted yet: last-1 (seed 2)"

    submitted = []

    class FakeJob:
        def __init__(self, n):
            self.job_id = str(100 + n)

    class FakeExecutor:
        def batch(self):
            import contextlib
            return contextlib.nullcontext()

        def submit(self, fn):
            submitted.append((fn.config, fn.seed, os.environ["PYTHONPATH"].split(os.pathsep)[0], os.getcwd()))
            return FakeJob(len(submitted))

    monkeypatch.setattr(cluster, "make_executor", lambda *a, **k: FakeExecutor())
    assert run_study(path, results=results, executor="submitit", cluster="slurm", allow_dirty=True) == []
    root = str(Path(__file__).resolve().parents[1])
    assert sorted(s[:2] for s in submitted) == [("dense", 1), ("dense", 2), ("last-1", 1), ("last-1", 2)]
    assert all(s[2] == root and s[3] == root for s in submitted)  # jobs import this checkout's workbench
    assert "2 already queued or running (left alone); submitting 4" in capsys.readouterr().out
    assert cluster.read_ledger(study, results)["dense__seed1"]["earlier"] == ["13"]


def test_local_workers_runs_show_as_running_or_stopped_and_are_never_trained_twice(tmp_path, capsys):
    """A run that a live ``study run`` process trains is ``running`` (epochs done and time left, no score), is left
    alone by another ``study run`` and refused by ``run_one``; once that process is gone, its checkpoint makes it
    ``stopped`` (the next run resumes it)."""
    import socket
    import subprocess
    import sys

    path = _study(tmp_path, seeds=[0], configs={"dense": {"moe_layers": "none"}})
    study = load_study(path)
    results = tmp_path / "results"
    folder = run_folder(study, "dense", 0, results)
    folder.mkdir(parents=True)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (folder / "running.json").write_text(json.dumps({"pid": worker.pid, "host": socket.gethostname(),
                                                         "started": time.time() - 90, "epochs": 4}))
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "wall_time": 60.0, "test_acc": 0.5}) + "\n")
        [row] = run_states(study, plan(study), results)
        assert row["state"] == "running"
        assert row["detail"] == f"pid {worker.pid} on {socket.gethostname()}: 1 of 4 epochs done, about 3 min of " \
                                "training left, then the analysis"
        assert "0.5" not in format_status(study, [row]) and "1 running" in format_status(study, [row])
        assert run_study(path, results=results, allow_dirty=True) == []
        assert f"left alone, being trained by another process of this machine: dense seed 0 (pid {worker.pid})" \
            in capsys.readouterr().out
        with pytest.raises(StudyError, match=f"already being trained by pid {worker.pid}.*kill -TERM {worker.pid}"):
            run_one(study, "dense", 0, results=results, allow_dirty=True, tensorboard=False)
        assert not (results / "tiny" / "dense__seed0.json").exists()
    finally:
        worker.kill()
        worker.wait()
    [row] = run_states(study, plan(study), results)
    assert row["state"] == "not submitted"  # the process is gone and left no checkpoint
    (folder / "checkpoint.pt").write_bytes(b"")
    [row] = run_states(study, plan(study), results)
    assert row["state"] == "stopped" and row["detail"] == "checkpoint after 1 epoch (+ steps): resumes from it"
    assert "1 stopped" in format_status(study, [row])
    (folder / "checkpoint.pt").unlink()
    record = run_one(study, "dense", 0, results=results, allow_dirty=True, tensorboard=False)
    assert record["seed"] == 0 and not folder.exists()  # its marker went with the run folder


def test_status_says_the_worker_hours_left_at_the_recorded_pace(tmp_path, capsys):
    from workbench.studies.jobstate import time_left

    rows = [{"config": c, "seed": s, "state": st} for c, s, st in
            [("dense", 0, "recorded"), ("moe", 0, "recorded"), ("dense", 1, "running"), ("moe", 1, "not submitted"),
             ("new", 1, "not submitted")]]
    costs = {"dense": [600.0], "moe": [3000.0, 4200.0]}  # medians 600 and 3,600 s; all three runs: 3,000 s
    assert time_left(rows, costs) == ("left: 3 runs, about 2.0 worker-hours at the pace of the 3 recorded (each "
                                      "config's median run; runs in progress counted whole)")
    path = _study(tmp_path, seeds=[0, 1], configs={"dense": {"moe_layers": "none"}})
    results = tmp_path / "results"
    run_one(load_study(path), "dense", 0, results=results, allow_dirty=True, tensorboard=False)
    assert main(["study", "status", str(path), "--results", str(results)]) == 0
    assert "\nleft: 1 run, about 0 worker-minutes at the pace of the 1 recorded" in capsys.readouterr().out
    assert time_left(rows[:1] + rows[2:3], {"dense": [1500.0]}).startswith("left: 1 run, about 25 worker-minutes")


def test_naming_the_default_results_folder_keeps_the_default_runs_folder(tmp_path):
    from workbench.studies.spec import RESULTS

    study = load_study(_study(tmp_path))
    assert run_folder(study, "dense", 0, RESULTS) == run_folder(study, "dense", 0)
    assert run_folder(study, "dense", 0, tmp_path / "r") == tmp_path / "runs" / "tiny" / "dense" / "seed0"
