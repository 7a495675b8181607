"""One run of a study: train one (config, seed) under the study's protocol, check an upcycled arm's clean start,
analyse the trained model, and write the record (atomically).

Imports: ``workbench.data``, ``workbench.models``, ``workbench.moe``, ``workbench.train``, ``workbench.analysis``
and this package's ``spec`` and ``analyse``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..atomic import atomic_write_text
from .analyse import analyse_regions, analyse_run, predict, predict_pixels, prune_experts
from .records import cached_base
from .spec import (RESULTS, ROOT, StudyError, arm_spec, arm_train_values, result_path, run_folder,
                   tensorboard_folder)


NOT_RECORDED = ("quiet", "output", "tensorboard", "tensorboard_dir")  # how a run is watched, not what it trains
RUNNING = "running.json"  # in a run folder while a process trains it: pid, host, start time, epochs


def process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), to tell it from a later process given the same id; None
    when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): alive or not, no more
        except PermissionError:  # someone else's process: it exists
            return "?"
        except (OSError, ValueError):
            return None
        return "?"
    return None if fields[0] in ("Z", "X") else fields[19]


def live_run(folder: Path) -> dict | None:
    """The process training the run in ``folder`` (its ``running.json``: pid, host, started, epochs), if that
    process is alive; None if no process is, or if it runs on another host (whose processes this one cannot see:
    its marker is returned with ``"alive": None``)."""
    try:
        marker = json.loads((Path(folder) / RUNNING).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("host") != socket.gethostname():
        return {**marker, "alive": None}
    if marker.get("pid") == os.getpid() or process_start(int(marker.get("pid", 0))) is None:
        return None
    return {**marker, "alive": True}


def run_progress(folder: Path, marker: dict) -> str:
    """One line on a run in progress, from its epoch log: epochs done of how many, and the training time left at
    its pace so far (no score: a study's interim values are not shown)."""
    epochs = int(marker.get("epochs") or 0)
    log = Path(folder) / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    where = f"pid {marker.get('pid')} on {marker.get('host')}"
    if not rows:
        minutes = (time.time() - float(marker.get("started", time.time()))) / 60
        return f"{where}: in epoch 1 of {epochs} ({minutes:.0f} min in)"
    done, spent = len(rows), float(rows[-1].get("wall_time") or 0.0)
    left = spent / done * max(epochs - done, 0) / 60
    return f"{where}: {done} of {epochs} epochs done, about {left:.0f} min of training left, then the analysis"


def train_config(study: dict, config: str, seed: int, out: Path, device: str, quiet: bool):
    from ..train.config import TrainConfig

    return TrainConfig.from_dict(arm_train_values(study, config, seed, out, device, quiet))


def base_fingerprint(base: str | Path) -> str:
    """SHA-256 of a dense base's weights file: records name the exact base they started from."""
    import hashlib

    path = ROOT / base / "model.safetensors"
    if not path.is_file():
        raise StudyError(f"the dense base {base} has no model.safetensors: train and ship it first "
                         f"(experiments/upcycle/train_base.sh)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_splits(dataset: str, model, *, val_size: int = 0, root=None, test_subset=None, data_options=None,
                seed: int = 0):
    """(train, validation, test) of ``dataset`` as a run evaluates them (no augmentation):
    :func:`workbench.data.splits.build_eval_splits`."""
    from ..data.splits import build_eval_splits

    return build_eval_splits(dataset, val_size=val_size, root=root, model=model, test_subset=test_subset,
                             data_options=data_options, seed=seed)


def base_accuracy(study: dict, results: Path | None = None) -> dict:
    """The dense base's test (and validation) accuracy and weights fingerprint, measured once per study and cached
    beside its records.  A base whose weights changed since (a re-trained, re-shipped base) is refused, so one
    study never mixes bases; so is a base below the study's ``base_min_test_acc``."""
    from ..train.checkpoint import load_model
    from ..train.metrics import evaluate

    out = cached_base(study, results)
    if out is not None:
        if "sha256" in out and out["sha256"] != base_fingerprint(study["base"]):
            raise StudyError(f"{study['name']}: the dense base {study['base']} is not the one its records started "
                             f"from (weights fingerprint changed): restore that base, or give the study a new name "
                             f"for the new base")
    else:
        train = study["train"]
        model, _ = load_model(ROOT / study["base"])
        _, val, test = eval_splits(train.get("dataset", "fashion-mnist"), model, val_size=train.get("val_size", 0),
                                   root=train.get("data_root"), test_subset=train.get("test_subset"),
                                   data_options=train.get("data_options"))
        scored = evaluate(model, test)
        out = {"base": study["base"], "sha256": base_fingerprint(study["base"]), "test_acc": round(scored["acc"], 6),
               **({"test_miou": round(scored["miou"], 6)} if "miou" in scored else {})}
        if val is not None:
            out["val_acc"] = round(evaluate(model, val)["acc"], 6)
    least = study.get("base_min_test_acc")
    if least is not None and out["test_acc"] < least:
        raise StudyError(f"{study['name']}: the dense base {study['base']} has test accuracy {out['test_acc']}, "
                         f"below the study's base_min_test_acc {least}: train the base longer (or larger) first")
    path = Path(results or RESULTS) / study["name"] / "_base.json"
    if not path.is_file():
        atomic_write_text(path, json.dumps(out) + "\n")
    return out


# A clean start predicts what the base predicts, up to fp32 rounding: logits within START_LOGIT_GAP of the base's
# and a test score within START_SCORE_GAP of it.  Upcycled experts are exact copies, but gates that sum to 1 only
# to rounding can flip a prediction whose two best classes tie to about 1e-5: among the millions of pixels a
# segmentation test set scores, one such pixel moves the score by 1.6e-7.  Ten thousand test images cannot differ
# by one image within the score gap.
START_LOGIT_GAP, START_SCORE_GAP = 1e-3, 1e-5


def starts_clean(step0: float, reference: float, gap: float) -> bool:
    """Whether a step-0 score and logit gap are the base's up to fp32 rounding (see ``START_SCORE_GAP``)."""
    return abs(step0 - reference) <= START_SCORE_GAP + 1e-12 and gap <= START_LOGIT_GAP


def check_clean_start(study: dict, config: str, cfg, results: Path | None = None, device=None) -> dict:
    """Upcycle protocol: build the arm exactly as training will, measure its step-0 test accuracy, and refuse to
    train an arm that does not start where the dense base is.  On a GPU (``device``) both are evaluated there in
    fp32, and the step-0 accuracy is compared with the base's measured on that device (``base_test_acc_device``),
    since the cached base accuracy is the CPU's."""
    import torch

    from ..train.checkpoint import load_model
    from ..train.metrics import evaluate
    from ..train.trainer import build_training_model

    device = torch.device(device or "cpu")
    base = base_accuracy(study, results)
    model, _ = build_training_model(cfg)
    model.to(device)
    _, _, test = eval_splits(cfg.dataset, model, val_size=cfg.val_size, root=cfg.data_root,
                             test_subset=cfg.test_subset, data_options=cfg.data_options)
    step0 = round(evaluate(model, test)["acc"], 6)
    dense, _ = load_model(ROOT / study["base"])
    dense.to(device)
    reference = base["test_acc"] if device.type == "cpu" else round(evaluate(dense, test)["acc"], 6)
    x = next(iter(test.batches(500, shuffle=False)))[0].to(device)
    model.eval()
    with torch.no_grad():
        gap = float((model(x) - dense.eval()(x)).abs().max())
    clean = starts_clean(step0, reference, gap)
    declared = study["configs"][config].get("clean_start", study["common"].get("clean_start", True))
    if not clean and declared:
        raise StudyError(f"{study['name']}/{config}: at step 0 the arm differs from the dense base (test accuracy "
                         f"{step0} vs {reference}, max logit difference {gap:.2g}): it does not start "
                         f"function-preserving. Use renormalize: true (gates summing to 1) and shared_init zero or "
                         f"split for a shared expert, or mark an intended ablation clean_start: false")
    return {"step0_test_acc": step0, "base_test_acc": base["test_acc"], "step0_max_logit_diff": gap,
            "clean_start": clean, **({"base_test_acc_device": reference} if device.type != "cpu" else {}),
            **({"base_sha256": base["sha256"]} if "sha256" in base else {})}


def _check_resumable(out: Path, cfg, study: dict, config: str) -> None:
    """A run in progress continues only under the arm definition it started with: a study file edited since (its
    budget, the arm's keywords) would otherwise finish a run half under each."""
    import dataclasses

    path = out / "train_config.json"
    try:
        started = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the checkpoint's own config decides (and is checked by the trainer)
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = [f"{k} {started.get(k)!r} -> {v!r}" for k, v in now.items()
               if k not in ("device", *NOT_RECORDED) and k in started and started[k] != v]
    if changed:
        raise StudyError(f"{study['name']}/{config}: the run in progress in {out} started under another definition of "
                         f"arm {config!r} ({', '.join(changed)}); restore the study file, or delete {out} to start "
                         "that run again as the file now says")


def run_one(study: dict, config: str, seed: int, device: str = "auto", quiet: bool = True,
            results: Path | None = None, threads: int | None = 1, allow_dirty: bool = False,
            tensorboard: bool = True, launch: dict | None = None) -> dict:
    """Train one config with one seed under the study's protocol and record the result (atomically).  A run folder
    holding a checkpoint (a run killed before) is resumed from it.  ``tensorboard``: event files under
    ``<results>/<study>/tensorboard/<config>/seed<k>``; ``launch``: what ran it, for the provenance (``executor``,
    ``job_id``; default: this process, ``local``)."""
    import torch

    from ..train.provenance import git_commit

    commit = git_commit()
    if commit.endswith("+dirty") and not allow_dirty:
        raise StudyError("the working tree has uncommitted changes: a study record must come from a clean commit; "
                         "commit first (or pass --allow-dirty for a throw-away run)")
    if threads:
        torch.set_num_threads(threads)
    out = run_folder(study, config, seed, results)
    cfg = train_config(study, config, seed, out, device, quiet)
    cfg.tensorboard = tensorboard
    cfg.tensorboard_dir = str(tensorboard_folder(study, config, seed, results)) if tensorboard else None
    started = time.time()
    other = live_run(out)
    if other is not None and other["alive"]:
        raise StudyError(f"{study['name']}/{config} seed {seed} is already being trained by pid {other['pid']} on "
                         f"{other['host']}; wait for it (python -m workbench study status) or stop it with "
                         f"kill -TERM {other['pid']} (it saves a checkpoint this run resumes from)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUNNING, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": started, "epochs": cfg.epochs}))
    try:
        return _train_and_record(study, config, seed, device, results, threads, launch, commit, out, cfg, started)
    finally:
        (out / RUNNING).unlink(missing_ok=True)


def _train_and_record(study, config, seed, device, results, threads, launch, commit, out, cfg, started) -> dict:
    import torch

    from ..analysis.flops import profile
    from ..train.checkpoint import load_model
    from ..train.distributed import Dist, resolve_device
    from ..train.provenance import provenance
    from ..train.trainer import train

    resume = (out / "checkpoint.pt").exists()
    if resume:
        _check_resumable(out, cfg, study, config)
    # the arm is rebuilt as training builds it (also on resume: the check is of the construction, not of weights)
    # checks and analyses run where the training ran (fp32; the random-router draws stay on the CPU)
    where = resolve_device(device, Dist())
    start = check_clean_start(study, config, cfg, results, where) if study["protocol"] == "upcycle" else {}
    history = train(cfg, resume=resume)["history"]
    model, model_cfg = load_model(out / "model")
    model.eval()
    batch_groups = any(getattr(m, "choice_group", "image") == "batch" for m in model.modules())
    prof = profile(model, batch=cfg.batch_size if batch_groups else 1)  # per-batch choice: at the training batch
    model.to(where)
    last = history[-1]
    # the seed picks a test_subset as training did, so that test_predictions are of the images the scores are of
    _, val, test = eval_splits(cfg.dataset, model, val_size=cfg.val_size, root=cfg.data_root,
                               test_subset=cfg.test_subset, data_options=cfg.data_options, seed=cfg.seed)
    if getattr(model, "task", None) == "segmentation":
        scores = {k: last.get(k) for k in ("test_miou", "val_miou", "test_pixel_acc", "test_iou")}
        if study["protocol"] == "upcycle":  # the predictions-moved check reads them
            scores["test_predictions"] = predict_pixels(model, test)
        analysis = analyse_regions(model, study.get("analysis", {}), seed, val, cfg)
        spec = study.get("analysis", {}).get("expert_pruning")
        from ..moe import moe_modules

        if spec and config in spec.get("configs", [config]) and moe_modules(model):
            if val is None:
                raise StudyError("analysis.expert_pruning chooses experts on a validation split: set train.val_size "
                                 "(e.g. 2000)")
            analysis["expert_pruning"] = prune_experts(model, model_cfg, spec, seed, val, test, cfg)
    else:
        scores = {"test_predictions": predict(model, test)}
        analysis = analyse_run(model, cfg, study.get("analysis", {}), seed, val, test, config=config,
                               model_config=model_cfg)
    record = {"study": study["name"], "protocol": study["protocol"], "config": config, "seed": seed,
              "arm_spec": arm_spec(study, config),
              "model_config": model_cfg,
              "train_config": {**{k: v for k, v in cfg.__dict__.items() if k not in NOT_RECORDED},
                               "init_from": study.get("base")},  # repo-relative, not this machine's path
              "test_acc": last["test_acc"], "test_loss": last["test_loss"], "test_n": last["test_n"],
              "val_acc": last.get("val_acc"), "train_acc": last["train_acc"], **start,
              "params": prof.params, "active_params": prof.active_params, "gmacs": prof.macs / 1e9,
              "moe_test": last["moe_test"], "history": history, **scores, **analysis,
              "provenance": provenance(device if device != "auto" else None, threads=torch.get_num_threads(),
                                       # wall_time_s: the attempt that finished the run (from its resume when
                                       # resumed); train_wall_time_s: training over every attempt
                                       wall_time_s=round(time.time() - started, 1), resumed=resume,
                                       train_wall_time_s=last["wall_time"],
                                       **{"executor": "local", "job_id": None, **(launch or {})},
                                       host=socket.gethostname())}
    if record["provenance"]["commit"] != commit:
        raise StudyError("the commit changed while the run trained; record again from one clean commit")
    atomic_write_text(result_path(study, config, seed, results), json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the record holds what matters; weights of every variant would bloat
    return record
