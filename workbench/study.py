"""Studies: every config x seed of a YAML study, trained under one of two protocols, recorded with provenance, and
judged by claims written into the study file before it runs.

    python -m workbench study run experiments/studies/scratch/placement.yaml [--jobs 2] [--shard 0/4]
    python -m workbench study summary experiments/studies/scratch/placement.yaml
    python -m workbench study claims experiments/studies/scratch/placement.yaml

Protocols:

* ``scratch``: every config is trained from random initialisation with the same budget (``model`` names the
  architecture).  No initialisation confound: the "sweet spot" protocol.
* ``upcycle`` (the paper's): every config starts from the dense ``base`` (experts = copies of its FFNs) and is
  fine-tuned with the same schedule; the dense control continues the base with that identical schedule.  Every arm
  must start *function-preserving* (renormalised gates, a zero-initialised or split shared expert): its step-0
  test accuracy is measured and must equal the base's, or the run stops before training.  An ablation arm that
  is meant to start elsewhere (e.g. ``shared_init: copy``) says ``clean_start: false``; its step-0 accuracy is
  recorded all the same.

A study file::

    name: scratch-placement
    protocol: scratch                  # or upcycle (then base: <dense checkpoint folder>)
    model: vimoe_micro_patch7_28
    train: {dataset: fashion-mnist, val_size: 10000, epochs: 3, batch_size: 128, lr: 2.0e-3}
    seeds: [0, 1, 2, 3, 4]
    control: dense                     # every config is compared with it, paired by seed
    references: [scratch-routing]      # other studies whose configs claims may name as "study/config"
    common: {num_experts: 8}           # MoE switches shared by every config
    configs:
      dense: {moe_layers: none}
      last-2: {moe_layers: last-2}
    claims:                            # decided before the runs; see workbench.stats.verdict
      - id: late-moe-helps
        says: MoE in the last two blocks beats the dense model
        treatment: last-2
        expect: greater

Seeds pair configs: with one seed every config sees the same training subset and data order.  Records:
``<results>/<name>/<config>__seed<k>.json`` with the config, seed, commit (a clean tree is required unless
``--allow-dirty``), device, thread count, wall time, final validation and test accuracy, every test prediction
(for McNemar tests), parameters, activated MACs and what the ``analysis`` block asks for.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from pathlib import Path

import pandas as pd
import yaml

from .checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs" / "studies"
STUDY_KEYS = {"name", "description", "protocol", "profile", "model", "base", "base_min_test_acc", "train", "seeds",
              "control", "references", "common", "configs", "analysis", "claims", "metric"}
METRICS = {"test_acc": "test accuracy", "test_miou": "test mIoU", "test_pixel_acc": "test pixel accuracy"}
PROTOCOLS = ("scratch", "upcycle")
PROFILES = ("cpu", "gpu")  # cpu: micro/tiny ViMoE on one CPU thread per run; gpu: ViT-S width/depth, full data
ANALYSIS_KEYS = {"routing", "prune_fraction", "prune_min_layers", "random_routers", "max_images", "random_subsets",
                 "regions"}
CLAIM_KINDS = ("paired", "spread", "excess", "depth_trend", "pruning")
CLAIM_KEYS = {"id", "says", "paper", "kind", "treatment", "control", "expect", "margin", "blocks", "compare",
              "source"}  # source: 'routing' (class routing, default) or 'regions' (segmentation) for excess/depth


class StudyError(ValueError):
    """A study file, or a request about one, that cannot be carried out; the message names the fix."""


# -- study files ------------------------------------------------------------------------------------------------
def load_study(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        study = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise StudyError(f"{path} is not a study file (not valid YAML: {str(err).splitlines()[0]}); study files are "
                         f"in experiments/studies/") from None
    if not isinstance(study, dict):
        raise StudyError(f"{path} is not a study file (a YAML mapping with name, protocol, configs, ...)")
    unknown = set(study) - STUDY_KEYS
    if unknown:
        raise StudyError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(STUDY_KEYS)}")
    for key in ("name", "configs"):
        if key not in study:
            raise StudyError(f"{path}: '{key}' is required")
    study.setdefault("protocol", "upcycle" if "base" in study else "scratch")
    if study["protocol"] not in PROTOCOLS:
        raise StudyError(f"{path}: protocol={study['protocol']!r} is not one of {PROTOCOLS}")
    if study["protocol"] == "upcycle" and "base" not in study:
        raise StudyError(f"{path}: an upcycle study needs 'base' (the dense checkpoint folder every arm starts from)")
    if study["protocol"] == "scratch" and "model" not in study:
        raise StudyError(f"{path}: a scratch study needs 'model' (the timm name every arm is built from)")
    study.setdefault("seeds", [0, 1, 2, 3, 4])
    study.setdefault("common", {})
    study.setdefault("train", {})
    study.setdefault("profile", "cpu")
    study.setdefault("control", "dense")
    study.setdefault("references", [])
    study.setdefault("claims", [])
    study.setdefault("metric", "test_acc")
    study["_path"] = str(path)
    if study["metric"] not in METRICS:
        raise StudyError(f"{path}: metric={study['metric']!r} is not one of {sorted(METRICS)} (segmentation studies "
                         f"use test_miou)")
    if study["profile"] not in PROFILES:
        raise StudyError(f"{path}: profile={study['profile']!r} is not one of {PROFILES}")
    analysis = study.setdefault("analysis", {})
    unknown = set(analysis) - ANALYSIS_KEYS
    if unknown:
        raise StudyError(f"{path}: unknown analysis keys {sorted(unknown)}; allowed: {sorted(ANALYSIS_KEYS)}")
    fraction = analysis.get("prune_fraction", 0)
    if not 0 <= fraction < 1:
        raise StudyError(f"{path}: analysis.prune_fraction={fraction} must be in [0, 1)")
    if study.get("control") == "step0":
        raise StudyError(f"{path}: the study's control must be a config; 'step0' is for a claim's control")
    for claim in study["claims"]:
        _check_claim(path, study, claim)
    return study


def _check_claim(path, study: dict, claim: dict) -> None:
    from .stats import DIRECTIONS

    where = f"{path}: claim {claim.get('id', '?')!r}"
    unknown = set(claim) - CLAIM_KEYS
    if unknown:
        raise StudyError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(CLAIM_KEYS)}")
    for key in ("id", "says", "treatment", "expect"):
        if key not in claim:
            raise StudyError(f"{where}: '{key}' is required")
    claim.setdefault("kind", "paired")
    if claim["kind"] not in CLAIM_KINDS:
        raise StudyError(f"{where}: kind={claim['kind']!r} is not one of {CLAIM_KINDS}")
    if claim["expect"] not in DIRECTIONS:
        raise StudyError(f"{where}: expect={claim['expect']!r} is not one of {DIRECTIONS}")
    if claim.get("source", "routing") not in ("routing", "regions"):
        raise StudyError(f"{where}: source={claim['source']!r} is not 'routing' or 'regions'")
    if claim.get("control") == "step0":  # the treatment's own step-0 accuracy: upcycled arms start at the base
        if study["protocol"] != "upcycle" or claim["kind"] != "paired":
            raise StudyError(f"{where}: control 'step0' (an arm against its own start) is for paired claims of "
                             f"upcycle studies")
    control = claim.get("control")  # none: the study's control
    names = [claim["treatment"]] + ([control] if control not in (None, "step0") else [])
    for name in names:
        other, _, config = name.rpartition("/")
        if other and other not in study["references"]:
            raise StudyError(f"{where}: {name!r} names study {other!r}; list it under 'references'")
        if not other and config not in study["configs"]:
            raise StudyError(f"{where}: {config!r} is not a config of this study ({list(study['configs'])})")


def _as_study(study_or_path) -> dict:
    """A loaded study as it is, or the study file at a path, loaded."""
    return study_or_path if isinstance(study_or_path, dict) else load_study(study_or_path)


def result_path(study: dict, config: str, seed: int, results: Path | None = None) -> Path:
    return Path(results or RESULTS) / study["name"] / f"{config}__seed{seed}.json"


def plan(study: dict, only=None, seeds=None, shard: tuple[int, int] | None = None) -> list[tuple[str, int]]:
    """The (config, seed) runs, seed-major; ``shard=(i, n)`` keeps every n-th run from the i-th, so n machines
    sharing one results folder run disjoint slices."""
    names = list(study["configs"])
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise StudyError(f"--only {missing}: not in this study (configs: {names})")
        names = [n for n in names if n in only]
    todo = [(name, seed) for seed in (seeds or study["seeds"]) for name in names]
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise StudyError(f"--shard {i}/{n} is invalid: use i/N with 0 <= i < N")
        todo = todo[i::n]
    return todo


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise StudyError(f"--shard {text!r} is invalid: use i/N, e.g. 0/4 for the first of four machines") from None
    return i, n


# -- one run ----------------------------------------------------------------------------------------------------
def arm_model_kwargs(study: dict, config: str) -> tuple[dict, dict]:
    """(model keyword arguments, upcycling keyword arguments) of one arm, as its runs build it: the study's
    ``common`` overlaid with the config; a dense arm drops the MoE switches, which mean nothing to it."""
    from .vimoe import split_moe_kwargs

    kwargs = {**study["common"], **study["configs"][config]}
    kwargs.pop("clean_start", None)
    init_kwargs = {"shared_init": kwargs.pop("shared_init")} if "shared_init" in kwargs else {}
    if study["protocol"] == "scratch":
        init_kwargs = {}
    moe, other = split_moe_kwargs(kwargs)
    if other.get("moe_layers", "none") == "none":
        kwargs = {"moe_layers": "none", **other}
    return kwargs, init_kwargs


def _train_config(study: dict, config: str, seed: int, out: Path, device: str, quiet: bool):
    from .train import TrainConfig

    kwargs, init_kwargs = arm_model_kwargs(study, config)
    values = {"quiet": quiet, "device": device, **study["train"], **init_kwargs, "seed": seed,
              "model_kwargs": kwargs, "output": str(out)}
    if study["protocol"] == "upcycle":
        values["init_from"] = str(ROOT / study["base"])  # step 0 is measured by check_clean_start, not the trainer
    else:
        values["model"] = study["model"]
    return TrainConfig.from_dict(values)


def base_fingerprint(base: str | Path) -> str:
    """SHA-256 of a dense base's weights file: records name the exact base they started from."""
    import hashlib

    path = ROOT / base / "model.safetensors"
    if not path.is_file():
        raise StudyError(f"the dense base {base} has no model.safetensors: train and ship it first "
                         f"(experiments/upcycle/train_base.sh)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_accuracy(study: dict, results: Path | None = None) -> dict:
    """The dense base's test (and validation) accuracy and weights fingerprint, measured once per study and cached
    beside its records.  A base whose weights changed since (a re-trained, re-shipped base) is refused, so one
    study never mixes bases; so is a base below the study's ``base_min_test_acc``."""
    from .checkpoint import load_model
    from .data import build_splits
    from .train import evaluate

    path = Path(results or RESULTS) / study["name"] / "_base.json"
    if path.is_file():
        out = json.loads(path.read_text())
        if "sha256" in out and out["sha256"] != base_fingerprint(study["base"]):
            raise StudyError(f"{study['name']}: the dense base {study['base']} is not the one its records started "
                             f"from (weights fingerprint changed): restore that base, or give the study a new name "
                             f"for the new base")
    else:
        train = study["train"]
        model, _ = load_model(ROOT / study["base"])
        _, val, test = build_splits(train.get("dataset", "fashion-mnist"), val_size=train.get("val_size", 0),
                                    root=train.get("data_root"), model=model, augment=False,
                                    test_subset=train.get("test_subset"))
        out = {"base": study["base"], "sha256": base_fingerprint(study["base"]),
               "test_acc": round(evaluate(model, test)["acc"], 6)}
        if val is not None:
            out["val_acc"] = round(evaluate(model, val)["acc"], 6)
    least = study.get("base_min_test_acc")
    if least is not None and out["test_acc"] < least:
        raise StudyError(f"{study['name']}: the dense base {study['base']} has test accuracy {out['test_acc']}, "
                         f"below the study's base_min_test_acc {least}: train the base longer (or larger) first")
    if not path.is_file():
        atomic_write_text(path, json.dumps(out) + "\n")
    return out


def arm_spec(study: dict, config: str) -> dict:
    """Everything in the study file that determines one arm's runs: recorded with each run, and compared before a
    recorded run is skipped, so an edited study file cannot silently mix arms."""
    return {"protocol": study["protocol"], "model": study.get("model"), "base": study.get("base"),
            "train": study["train"], "common": study["common"], "config": study["configs"][config],
            "analysis": study.get("analysis", {})}


def check_clean_start(study: dict, config: str, cfg, results: Path | None = None, device=None) -> dict:
    """Upcycle protocol: build the arm exactly as training will, measure its step-0 test accuracy, and refuse to
    train an arm that does not start where the dense base is.  On a GPU (``device``) both are evaluated there in
    fp32, and the step-0 accuracy is compared with the base's measured on that device (``base_test_acc_device``),
    since the cached base accuracy is the CPU's."""
    import torch

    from .checkpoint import load_model
    from .data import build_splits
    from .train import build_training_model, evaluate

    device = torch.device(device or "cpu")
    base = base_accuracy(study, results)
    model, _ = build_training_model(cfg)
    model.to(device)
    _, _, test = build_splits(cfg.dataset, val_size=cfg.val_size, root=cfg.data_root, model=model, augment=False,
                              test_subset=cfg.test_subset)
    step0 = round(evaluate(model, test)["acc"], 6)
    dense, _ = load_model(ROOT / study["base"])
    dense.to(device)
    reference = base["test_acc"] if device.type == "cpu" else round(evaluate(dense, test)["acc"], 6)
    x = next(iter(test.batches(500, shuffle=False)))[0].to(device)
    model.eval()
    with torch.no_grad():
        gap = float((model(x) - dense.eval()(x)).abs().max())
    clean = step0 == reference and gap <= 1e-3
    declared = study["configs"][config].get("clean_start", study["common"].get("clean_start", True))
    if not clean and declared:
        raise StudyError(f"{study['name']}/{config}: at step 0 the arm differs from the dense base (test accuracy "
                         f"{step0} vs {reference}, max logit difference {gap:.2g}): it does not start "
                         f"function-preserving. Use renormalize: true (gates summing to 1) and shared_init zero or "
                         f"split for a shared expert, or mark an intended ablation clean_start: false")
    return {"step0_test_acc": step0, "base_test_acc": base["test_acc"], "step0_max_logit_diff": gap,
            "clean_start": clean, **({"base_test_acc_device": reference} if device.type != "cpu" else {}),
            **({"base_sha256": base["sha256"]} if "sha256" in base else {})}


def run_one(study: dict, config: str, seed: int, device: str = "auto", quiet: bool = True,
            results: Path | None = None, threads: int | None = 1, allow_dirty: bool = False) -> dict:
    """Train one config with one seed under the study's protocol and record the result (atomically)."""
    import torch

    from .checkpoint import load_model
    from .data import build_splits
    from .flops import profile
    from .provenance import git_commit, provenance
    from .train import Dist, resolve_device, train

    commit = git_commit()
    if commit.endswith("+dirty") and not allow_dirty:
        raise StudyError("the working tree has uncommitted changes: a study record must come from a clean commit; "
                         "commit first (or pass --allow-dirty for a throw-away run)")
    if threads:
        torch.set_num_threads(threads)
    out = (Path(results).parent / "runs" if results else RUNS) / study["name"] / config / f"seed{seed}"
    cfg = _train_config(study, config, seed, out, device, quiet)
    started = time.time()
    resume = (out / "checkpoint.pt").exists()
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
    seg = getattr(model, "task", None) == "segmentation"
    if seg:
        from .segdata import build_seg_splits

        _, val, test = build_seg_splits(cfg.dataset, val_size=cfg.val_size, root=cfg.data_root, model=model,
                                        augment=False, test_subset=cfg.test_subset, **cfg.data_options)
        scores = {k: last.get(k) for k in ("test_miou", "val_miou", "test_pixel_acc", "test_iou")}
        analysis = analyse_regions(model, study.get("analysis", {}), seed, val)
    else:
        _, val, test = build_splits(cfg.dataset, val_size=cfg.val_size, root=cfg.data_root, model=model,
                                    augment=False, test_subset=cfg.test_subset)
        scores = {"test_predictions": _predict(model, test)}
        analysis = analyse_run(model, cfg, study.get("analysis", {}), seed, val, test)
    record = {"study": study["name"], "protocol": study["protocol"], "config": config, "seed": seed,
              "arm_spec": arm_spec(study, config),
              "model_config": model_cfg,
              "train_config": {**{k: v for k, v in cfg.__dict__.items() if k not in ("quiet", "output")},
                               "init_from": study.get("base")},  # repo-relative, not this machine's path
              "test_acc": last["test_acc"], "test_loss": last["test_loss"], "test_n": last["test_n"],
              "val_acc": last.get("val_acc"), "train_acc": last["train_acc"], **start,
              "params": prof.params, "active_params": prof.active_params, "gmacs": prof.macs / 1e9,
              "moe_test": last["moe_test"], "history": history, **scores, **analysis,
              "provenance": provenance(device if device != "auto" else None, threads=torch.get_num_threads(),
                                       wall_time_s=round(time.time() - started, 1),
                                       train_wall_time_s=last["wall_time"])}
    if record["provenance"]["commit"] != commit:
        raise StudyError("the commit changed while the run trained; record again from one clean commit")
    atomic_write_text(result_path(study, config, seed, results), json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the record holds what matters; weights of every variant would bloat
    return record


def _predict(model, data) -> str:
    """Every test prediction as one string of class indices (10 classes: one digit each)."""
    import torch

    preds = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, _ in data.batches(500, shuffle=False):
            preds.append(model(x.to(device)).argmax(-1).cpu())
    preds = torch.cat(preds).tolist()
    return "".join(map(str, preds)) if max(preds, default=0) < 10 else ",".join(map(str, preds))


# -- analyses ---------------------------------------------------------------------------------------------------
def expert_spread(model) -> dict[str, float]:
    """Per MoE block: how far the routed experts have moved apart, as the mean over experts of
    ||W_e - mean_e W|| / ||mean_e W|| over both weight matrices (biases and any shared expert left out).
    Upcycled experts start as copies (0); a value
    near 0 after fine-tuning means the experts still compute nearly one function, whatever the router does."""
    import torch

    from .moe import moe_modules

    out = {}
    for block, layer in moe_modules(model).items():
        if not isinstance(block, int):
            continue
        with torch.no_grad():
            w = torch.cat([layer.w1.flatten(1), layer.w2.flatten(1)], 1).float()
            mean = w.mean(0, keepdim=True)
            out[str(block)] = round(float((w - mean).norm(dim=1).mean() / mean.norm()), 6)
    return out


def router_at_init(model, cfg, data, max_images: int | None = 2000, inputs: dict | None = None) -> dict[str, dict]:
    """Upcycled runs: per MoE block, how far the router moved from its upcycling init (``router_shift``,
    ||W - W0|| / ||W0||) and the class NMI of the init router's first choices on the trained model's router
    inputs (``init_nmi``), beside the trained router's on the same inputs (``trained_nmi``).  The init is rebuilt
    exactly as the trainer built it (same seed, same base).  ``inputs``: the trained model's :func:`router_inputs`
    on ``data`` when already captured."""
    import torch

    from .moe import moe_modules
    from .specialisation import _table, nmi, router_inputs
    from .train import _seed_everything, build_training_model

    if not cfg.init_from:
        return {}
    with torch.random.fork_rng(devices=[]):
        _seed_everything(cfg.seed)
        init, _ = build_training_model(cfg)
    start = moe_modules(init)
    classes = getattr(model, "num_classes", None) or data.num_classes
    out = {}
    inputs = inputs if inputs is not None else router_inputs(model, data, max_images=max_images)
    for block, inp in inputs.items():
        w0 = start[block].router.weight.detach().float().cpu()
        E = inp.num_experts or inp.weight.shape[0]
        out[str(block)] = {
            "router_shift": round(float((inp.weight - w0).norm() / w0.norm()), 6),
            "init_nmi": round(nmi(_table(inp.labels, inp.first_choice(w0), classes, E)), 6),
            "trained_nmi": round(nmi(_table(inp.labels, inp.first_choice(inp.weight), classes, E)), 6)}
    return out


def analyse_run(model, cfg, analysis: dict, seed: int, val, test) -> dict:
    """What a study's ``analysis`` block asks of a trained run, before its weights are deleted.  Everything that
    *chooses* (which layers are specialised, which to densify) is measured on the validation split; test
    accuracy is only reported.

    * ``routing: true``: per MoE layer, the specialisation report (random-router test with ``random_routers``
      draws, default 100, on the first ``max_images`` validation images; label-permutation null beside it) and
      the class x expert / position x expert count tables.
    * ``prune_fraction: f`` (runs with at least ``prune_min_layers`` MoE layers, default 4): densify
      k = round(f x layers) layers: *every* k-subset is densified and scored on validation and test, so the
      specialisation metric's choice (the k least specialised on validation) can be ranked among all subsets and
      against ``random_subsets`` (default 20) seeded random draws.
    """
    from .moe import moe_modules

    blocks = sorted(k for k in moe_modules(model) if isinstance(k, int))
    if not blocks or not (analysis.get("routing") or analysis.get("prune_fraction")):
        return {}
    if val is None:
        raise StudyError("the analysis block needs a validation split: set train.val_size (e.g. 10000)")
    from .routing import collect_routing
    from .specialisation import router_inputs, specialisation_report

    stats = collect_routing(model, val, progress=False)
    max_images = analysis.get("max_images", 2000)
    inputs = router_inputs(model, val, max_images=max_images)  # one capture, used twice
    report, _ = specialisation_report(model, val, draws=int(analysis.get("random_routers", 100)),
                                      max_images=max_images, seed=seed, stats=stats, inputs=inputs)
    out = {"expert_spread": expert_spread(model)}
    if analysis.get("routing") and cfg.init_from:
        out["router_init"] = router_at_init(model, cfg, val, max_images, inputs=inputs)
    if analysis.get("routing"):
        tables = {b: {"class_expert": s.class_expert.round().int().tolist(),
                      "position_expert": s.position_expert.round().int().tolist()
                      if s.position_expert is not None else None} for b, s in stats.layers.items()}
        out["routing"] = {str(int(r["block"])): {**{k: (round(v, 6) if isinstance(v, float) else v)
                                                   for k, v in r.items() if k != "block"}, **tables[int(r["block"])]}
                          for r in report.to_dict("records")}
    k = round(analysis.get("prune_fraction", 0) * len(blocks))
    if k and len(blocks) >= analysis.get("prune_min_layers", 4):
        out["pruning"] = prune_subsets(model, stats, report, val, test, k, seed,
                                       int(analysis.get("random_subsets", 20)))
    return out


def analyse_regions(model, analysis: dict, seed: int, val) -> dict:
    """Segmentation runs, ``regions: true``: per MoE layer, routing against ground-truth regions on the first
    ``max_images`` validation images (:func:`workbench.regions.region_report`, ``random_routers`` draws)."""
    from .moe import moe_modules

    if not analysis.get("regions") or not moe_modules(model):
        return {}
    if val is None:
        raise StudyError("the regions analysis needs a validation split: set train.val_size (e.g. 2000)")
    from .regions import region_report

    table = region_report(model, val, max_images=analysis.get("max_images", 1000),
                          draws=int(analysis.get("random_routers", 50)), seed=seed)
    return {"regions": {str(int(r["block"])): {k: (round(v, 6) if isinstance(v, float) else v)
                                               for k, v in r.items() if k != "block"}
                        for r in table.to_dict("records")}}


def load_regions(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """The recorded routing-vs-regions analyses: one row per (config, seed, MoE block)."""
    rows = [{"config": r["config"], "seed": r["seed"], "block": int(b), **layer}
            for r in _records(study_or_path, results) if "regions" in r and (not configs or r["config"] in configs)
            for b, layer in r["regions"].items()]
    if not rows:
        return pd.DataFrame(columns=["config", "seed", "block"])
    return pd.DataFrame(rows).sort_values(["config", "seed", "block"]).reset_index(drop=True)


def prune_subsets(model, stats, report, val, test, count: int, seed: int, random_draws: int = 20) -> dict:
    """Densify every ``count``-subset of the MoE layers (usage-weighted merge, no fine-tuning after); score each on
    validation and test.  The metric's choice is the ``count`` least specialised layers on validation."""
    from .densify import densify
    from .flops import profile
    from .specialisation import layers_to_densify
    from .train import evaluate

    blocks = sorted(stats.layers)
    full = profile(model)
    rows = [{"blocks": [], "val_acc": evaluate(model, val)["acc"], "test_acc": evaluate(model, test)["acc"],
             "params": full.params, "gmacs": round(full.macs / 1e9, 6)}]
    for subset in itertools.combinations(blocks, count):
        m = densify(model, list(subset), "merge", stats=stats)
        p = profile(m)
        rows.append({"blocks": list(subset), "val_acc": evaluate(m, val)["acc"], "test_acc": evaluate(m, test)["acc"],
                     "params": p.params, "gmacs": round(p.macs / 1e9, 6)})
    least = layers_to_densify(report, count=count)
    most = sorted(report.sort_values("excess", ascending=False)["block"].tolist()[:count])
    rng = random.Random(seed)
    subsets = [r["blocks"] for r in rows[1:]]
    draws = [subsets[rng.randrange(len(subsets))] for _ in range(random_draws)]
    return {"count": count, "subsets": rows, "least_specialised": least, "most_specialised": most,
            "random_draws": draws}


# -- running a study --------------------------------------------------------------------------------------------
def _check_can_run(study: dict, path, device: str) -> None:
    if study["protocol"] == "upcycle" and not (ROOT / study["base"]).exists():
        raise StudyError(f"{path}: the dense base {study['base']} does not exist; train it first "
                         f"(experiments/upcycle/train_base.sh for the cpu profile, experiments/gpu/train_base.sh "
                         f"for the gpu profile)")
    if study["profile"] == "gpu" and device == "auto":
        import torch

        if not torch.cuda.is_available():
            raise StudyError(f"{path} is a gpu-profile study and this machine has no CUDA GPU; run it on one, "
                             f"or pass --device cpu to run it here anyway (slowly)")


def _worker(args) -> tuple[str, int, float, float]:
    path, config, seed, device, results, allow_dirty = args
    t0 = time.time()
    study = load_study(path)
    record = run_one(study, config, seed, device, results=results, threads=1, allow_dirty=allow_dirty)
    return config, seed, record[study["metric"]], time.time() - t0


def run_study(path, only=None, seeds=None, device: str = "auto", results: Path | None = None, jobs: int = 1,
              shard: tuple[int, int] | None = None, allow_dirty: bool = False) -> list[dict]:
    """Run every (config, seed) not yet recorded; ``jobs`` single-thread workers in parallel on this machine,
    ``shard`` a disjoint slice for one of several machines.  Returns the new records' (config, seed, acc)."""
    study = load_study(path)
    if jobs < 1:
        raise StudyError(f"--jobs {jobs} is invalid: use 1 or more workers")
    _check_can_run(study, path, device)
    todo = plan(study, only, seeds, shard)
    pending = [(c, s) for c, s in todo if not result_path(study, c, s, results).exists()]
    for c, s in todo:
        done_path = result_path(study, c, s, results)
        if done_path.exists():
            recorded = json.loads(done_path.read_text()).get("arm_spec")
            if recorded is not None and recorded != json.loads(json.dumps(arm_spec(study, c))):
                raise StudyError(f"{done_path} was recorded with a different definition of arm {c!r} than the study "
                                 f"file now gives; rename the arm or move the old records away")
    print(f"{study['name']}: {len(todo) - len(pending)} of {len(todo)} runs recorded, {len(pending)} to run "
          f"({jobs} worker{'s' if jobs > 1 else ''})", flush=True)
    if not pending:
        return []
    from .provenance import git_commit

    if git_commit().endswith("+dirty") and not allow_dirty:
        raise StudyError("the working tree has uncommitted changes: a study record must come from a clean commit; "
                         "commit first (or pass --allow-dirty for a throw-away run)")
    if study["protocol"] == "upcycle":
        base_accuracy(study, results)  # measured once, before workers race to cache it
    tasks = [(str(path), c, s, device, results, allow_dirty) for c, s in pending]
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


# -- reading records --------------------------------------------------------------------------------------------
def _records(study_or_path, results: Path | None = None):
    study = _as_study(study_or_path)
    for path in sorted((Path(results or RESULTS) / study["name"]).glob("*__seed*.json")):
        yield json.loads(path.read_text())


def load_record(study_or_path, config: str, seed: int, results: Path | None = None) -> dict:
    study = _as_study(study_or_path)
    path = result_path(study, config, seed, results)
    if not path.is_file():
        raise StudyError(f"{config} seed {seed} is not recorded in study {study['name']} ({path})")
    return json.loads(path.read_text())


def load_results(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """One row per recorded run; ``score`` is the study's metric (test accuracy, or test mIoU for segmentation)."""
    metric = _as_study(study_or_path)["metric"]
    cols = ["config", "seed", "score", "test_acc", "val_acc", "step0_test_acc", "params", "active_params", "gmacs",
            "wall_time_s", "threads", "device", "commit"]
    rows = [{"config": r["config"], "seed": r["seed"], "score": r[metric], "test_acc": r["test_acc"],
             "val_acc": r.get("val_acc"),
             "step0_test_acc": r.get("step0_test_acc"), "params": r["params"], "active_params": r["active_params"],
             "gmacs": r["gmacs"], "wall_time_s": r["provenance"]["wall_time_s"],
             "threads": r["provenance"].get("threads"), "device": r["provenance"]["device"],
             "commit": r["provenance"]["commit"]} for r in _records(study_or_path, results)]
    return pd.DataFrame(rows, columns=cols)


def load_routing(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """The recorded routing analyses: one row per (config, seed, MoE block) with the specialisation metrics, the
    random-router test and the label-permutation null (runs recorded without ``analysis.routing`` are absent)."""
    rows = []
    for r in _records(study_or_path, results):
        if "routing" not in r or (configs and r["config"] not in configs):
            continue
        for block, layer in r["routing"].items():
            rows.append({"config": r["config"], "seed": r["seed"], "block": int(block),
                         **{k: v for k, v in layer.items() if k not in ("class_expert", "position_expert")}})
    if not rows:
        return pd.DataFrame(columns=["config", "seed", "block"])
    return pd.DataFrame(rows).sort_values(["config", "seed", "block"]).reset_index(drop=True)


def routing_tables(study_or_path, config: str, seed: int, kind: str = "class_expert",
                   results: Path | None = None) -> dict[int, list]:
    """One recorded run's count tables per MoE block: ``class_expert`` or ``position_expert``."""
    record = load_record(study_or_path, config, seed, results)
    if "routing" not in record:
        raise StudyError(f"{config} seed {seed} has no routing analysis: it was recorded without analysis.routing")
    return {int(b): layer[kind] for b, layer in record["routing"].items() if layer[kind] is not None}


def load_pruning(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """Per (config, seed): the unpruned model, the metric's choice (least specialised on validation), the most
    specialised, the mean over every subset and over the random draws, the best and worst subset on test (in
    hindsight), and where the metric's choice ranks among all subsets by validation accuracy (1 = best)."""
    rows = []
    for r in _records(study_or_path, results):
        if "pruning" not in r or (configs and r["config"] not in configs):
            continue
        p = r["pruning"]
        full, subsets = p["subsets"][0], p["subsets"][1:]
        by_blocks = {tuple(s["blocks"]): s for s in subsets}
        least, most = by_blocks[tuple(p["least_specialised"])], by_blocks[tuple(p["most_specialised"])]
        ranked = sorted(subsets, key=lambda s: -s["val_acc"])
        rank = 1 + sum(s["val_acc"] > least["val_acc"] for s in subsets)
        draws = [by_blocks[tuple(b)] for b in p["random_draws"]]
        rows.append({"config": r["config"], "seed": r["seed"], "count": p["count"], "subsets": len(subsets),
                     "full_test": full["test_acc"], "full_val": full["val_acc"],
                     "least_blocks": p["least_specialised"], "least_test": least["test_acc"],
                     "least_val": least["val_acc"], "least_rank": rank,
                     "most_test": most["test_acc"], "best_val_blocks": ranked[0]["blocks"],
                     "best_val_test": ranked[0]["test_acc"],
                     "all_mean_test": sum(s["test_acc"] for s in subsets) / len(subsets),
                     "best_test": max(s["test_acc"] for s in subsets),
                     "worst_test": min(s["test_acc"] for s in subsets),
                     "random_mean_test": sum(s["test_acc"] for s in draws) / max(1, len(draws)),
                     "full_params": full["params"], "pruned_params": least["params"],
                     "full_gmacs": full["gmacs"], "pruned_gmacs": least["gmacs"]})
    return pd.DataFrame(rows)


def config_values(study: dict, name: str, results: Path | None = None, metric: str = "score") -> pd.Series:
    """One config's metric (default: its study's ``metric``) by seed; ``name`` may be ``other-study/config`` for a
    study named in references."""
    source, config = _source(study, name)
    df = load_results(source, results)
    df = df[df["config"] == config]
    return df.set_index("seed")[metric].sort_index()


def _source(study: dict, name: str) -> tuple[dict, str]:
    """(study, config) for a config name that may be ``other-study/config``."""
    other, _, config = name.rpartition("/")
    return (_referenced(study, other) if other else study), config


def _referenced(study: dict, name: str) -> dict:
    folder = Path(study.get("_path", ROOT / "experiments" / "studies" / "x.yaml")).parent
    for path in sorted(folder.glob("*.yaml")):
        other = load_study(path)
        if other["name"] == name:
            return other
    raise StudyError(f"study {name!r} (named in references of {study['name']}) has no file in {folder}")


def summary(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Per config (in the study's order): seeds, mean and seed SD of test accuracy, params and GMACs beside."""
    study = _as_study(study_or_path)
    df = load_results(study, results)
    if df.empty:
        return pd.DataFrame(columns=["config", "n", "acc_mean", "acc_std", "params_M", "gmacs"])
    g = df.groupby("config")
    table = pd.DataFrame({"n": g["seed"].count(), "acc_mean": g["score"].mean(),
                          "acc_std": g["score"].std(ddof=1).fillna(0.0),
                          "params_M": g["params"].first() / 1e6, "gmacs": g["gmacs"].first()})
    order = [c for c in study["configs"] if c in table.index]
    return table.loc[order].reset_index()


def contrasts(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Every config against the study's control, paired by seed: delta of test accuracy in points with its 95%
    t-interval, two-sided p and Holm-adjusted p across the configs; params and GMACs beside."""
    from .stats import holm, paired

    study = _as_study(study_or_path)
    control = study["control"]
    base = config_values(study, control, results)
    if base.empty:
        raise StudyError(f"the control {control!r} of {study['name']} has no records yet: run the study first")
    s = summary(study, results).set_index("config")
    rows = []
    for config in study["configs"]:
        if config == control or config not in s.index:
            continue
        values = config_values(study, config, results)
        seeds = sorted(set(values.index) & set(base.index))
        d = paired(values[seeds] * 100, base[seeds] * 100)
        rows.append({"config": config, "n": d.n, "delta": d.mean, "low": d.low, "high": d.high, "p": d.p,
                     "params_M": s.loc[config, "params_M"], "gmacs": s.loc[config, "gmacs"]})
    table = pd.DataFrame(rows, columns=["config", "n", "delta", "low", "high", "p", "params_M", "gmacs"])
    table.insert(6, "p_holm", holm(table["p"]))
    return table


def evaluate_claims(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Each pre-registered claim: its estimate with a 95% interval, p (Holm-adjusted across the study's
    directional claims that have one; an 'equal' claim is decided by its interval and margin alone), and the
    verdict from :func:`workbench.stats.verdict`."""
    from .stats import bootstrap_sd_difference, holm, paired, pitman_morgan, slope_interval, verdict

    study = _as_study(study_or_path)
    rows = []
    for claim in study["claims"]:
        kind, expect, margin = claim["kind"], claim["expect"], float(claim.get("margin", 0.0))
        row = {"id": claim["id"], "says": claim["says"], "kind": kind, "expect": expect, "margin": margin}
        if kind in ("paired", "spread"):
            control = claim.get("control", study["control"])
            a = config_values(study, claim["treatment"], results)
            b = (config_values(study, claim["treatment"], results, metric="step0_test_acc") if control == "step0"
                 else config_values(study, control, results))
            seeds = sorted(set(a.index) & set(b.index))
            row["contrast"] = f"{claim['treatment']} vs {control}"
            if kind == "paired":
                d = paired(a[seeds] * 100, b[seeds] * 100)
                row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
            else:
                # the interval: a paired bootstrap of the SD difference; the test: Pitman-Morgan (Holm family)
                est, low, high = bootstrap_sd_difference(a[seeds] * 100, b[seeds] * 100)
                row.update(n=len(seeds), estimate=est, low=low, high=high,
                           p=pitman_morgan(a[seeds] * 100, b[seeds] * 100))
        elif kind in ("excess", "depth_trend"):
            source, config = _source(study, claim["treatment"])
            regions = claim.get("source", "routing") == "regions"
            routing = (load_regions if regions else load_routing)(source, [config], results)
            if claim.get("blocks") is not None:
                routing = routing[routing["block"].isin(claim["blocks"])]
            row["contrast"] = f"{claim['treatment']}: {'NMI over random routers' if kind == 'excess' else 'slope of NMI excess over random routers per block'}"
            if kind == "excess":
                per_seed = routing.groupby("seed")["excess"].mean()
                d = paired(per_seed.values, [0.0] * len(per_seed))
            else:
                d = slope_interval({s: (g["block"].values, g["excess"].values) for s, g in routing.groupby("seed")})
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        else:  # pruning
            source, config = _source(study, claim["treatment"])
            pr = load_pruning(source, [config], results)
            compare = claim.get("compare", "all_mean")
            column = {"all_mean": "all_mean_test", "random": "random_mean_test", "unpruned": "full_test",
                      "most": "most_test"}[compare]
            row["contrast"] = f"{claim['treatment']}: densify least specialised vs {compare.replace('_', ' ')}"
            d = paired(pr["least_test"] * 100, pr[column] * 100)
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["id", "says", "kind", "contrast", "n", "estimate", "low", "high", "p",
                                        "expect", "margin"])
    # the Holm family: the directional claims; an 'equal' claim is decided by its interval against the margin
    directional = table["expect"].isin(["greater", "less"])
    table["p_holm"] = float("nan")
    table.loc[directional, "p_holm"] = holm(table.loc[directional, "p"])
    table["verdict"] = [verdict(r.low, r.high, r.p_holm, r.expect, r.margin) for r in table.itertuples()]
    # which side of zero (or of the margin) the point estimate falls on, whatever the interval: an inconclusive
    # verdict with the estimate on the other side is not the same as one on the paper's side
    table["side"] = [_side(r.estimate, r.expect, r.margin) for r in table.itertuples()]
    # seeds that would make the interval +/- 0.5 points at the observed spread (accuracy claims)
    table["seeds_needed"] = [seeds_for_half_width((r.high - r.low) / 2, int(r.n))
                              if r.kind in ("paired", "pruning") and r.high == r.high else None
                              for r in table.itertuples()]
    return table


def seeds_for_half_width(half_width: float, n: int, target: float = 0.5, limit: int = 10_000) -> int | None:
    """The smallest number of seeds whose 95% t-interval is at most +/- ``target`` at the spread that gave
    ``half_width`` with ``n`` seeds (SD = half_width * sqrt(n) / t(n-1)); the t quantile is the new n's, not the
    observed one's.  A point estimate of the spread: with few seeds the SD itself is uncertain."""
    from scipy import stats as sps

    if n < 2 or half_width != half_width:
        return None
    sd = half_width * math.sqrt(n) / sps.t.ppf(0.975, n - 1)
    for m in range(2, limit + 1):
        if sps.t.ppf(0.975, m - 1) * sd / math.sqrt(m) <= target:
            return m
    return None


def _side(estimate: float, expect: str, margin: float) -> str:
    if estimate != estimate:
        return "-"
    claimed = {"greater": estimate > 0, "less": estimate < 0, "equal": abs(estimate) <= margin,
               "no_less": estimate > -margin, "no_greater": estimate < margin}[expect]
    return "claimed side" if claimed else "other side"


def format_claims(table: pd.DataFrame, units: dict | None = None) -> str:
    """One line per claim: estimate [95% CI], p (Holm), verdict."""
    lines = []
    for r in table.itertuples():
        p = f", p_holm {r.p_holm:.3g}" if r.p_holm == r.p_holm else ""
        unit = " pts" if r.kind in ("paired", "pruning", "spread") else ""
        need = getattr(r, "seeds_needed", None)
        extra = f"; estimate on the {r.side}" + (f"; ~{int(need)} seeds for +/-0.5" if need == need and need else "")
        lines.append(f"{r.id}: {r.contrast}: {r.estimate:+.3f}{unit} [{r.low:+.3f}, {r.high:+.3f}] (n={r.n}{p}) "
                     f"expect {r.expect}{f' (margin {r.margin:g})' if r.margin else ''} -> {r.verdict}{extra}")
    return "\n".join(lines)


def format_summary(table: pd.DataFrame, metric: str = "test_acc") -> str:
    name = {"test_acc": "acc", "test_miou": "mIoU", "test_pixel_acc": "pix acc"}[metric]
    lines = [f"{'config':<16} {'n':>2} {name + ' mean':>9} {name + ' std':>8} {'params M':>9} {'GMACs':>7}"]
    for r in table.itertuples():
        lines.append(f"{r.config:<16} {r.n:>2} {r.acc_mean:>9.4f} {r.acc_std:>8.4f} {r.params_M:>9.3f} {r.gmacs:>7.4f}")
    return "\n".join(lines)


def format_contrasts(table: pd.DataFrame) -> str:
    lines = [f"{'config':<16} {'n':>2} {'delta pts':>9} {'95% CI':>17} {'p_holm':>8} {'params M':>9} {'GMACs':>7}"]
    for r in table.itertuples():
        lines.append(f"{r.config:<16} {r.n:>2} {r.delta:>+9.3f} [{r.low:+7.3f},{r.high:+7.3f}] {r.p_holm:>8.3g} "
                     f"{r.params_M:>9.3f} {r.gmacs:>7.4f}")
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------------------------------
def register_cli(sub) -> None:
    p = sub.add_parser("study", help="run a study (configs x seeds, resumable), print its summary or its claims")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="train every (config, seed) not yet recorded")
    r.add_argument("study", help="study YAML file")
    r.add_argument("--only", nargs="+", help="config names to run (default: all)")
    r.add_argument("--seeds", nargs="+", type=int, help="seeds to run (default: the study's)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    r.add_argument("--jobs", type=int, default=1, help="parallel single-thread workers on this machine (default 1)")
    r.add_argument("--shard", help="i/N: run only the i-th of N disjoint slices (N machines, one results folder)")
    r.add_argument("--allow-dirty", action="store_true",
                   help="record from a tree with uncommitted changes (throw-away runs only)")
    r.set_defaults(func=lambda a: (run_study(a.study, a.only, a.seeds, a.device, jobs=a.jobs,
                                             shard=parse_shard(a.shard), allow_dirty=a.allow_dirty), 0)[1])
    s = ssub.add_parser("summary", help="per config: mean, seed SD, params, GMACs; then deltas vs the control")
    s.add_argument("study")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_summary)
    c = ssub.add_parser("claims", help="each pre-registered claim: estimate, 95%% CI, Holm p, verdict")
    c.add_argument("study")
    c.set_defaults(func=_cmd_claims)


def _cmd_claims(args) -> int:
    study = load_study(args.study)
    if not study["claims"]:
        print(f"{study['name']} states no claims")
        return 0
    if load_results(study).empty:
        print(f"{study['name']}: no runs recorded yet, so no verdicts: python -m workbench study run {args.study}")
        return 0
    print(format_claims(evaluate_claims(study)))
    return 0


def _cmd_summary(args) -> int:
    table = summary(args.study)
    if table.empty and not args.json:
        print(f"no runs recorded yet: python -m workbench study run {args.study}")
        return 0
    if args.json:
        print(table.to_json(orient="records", indent=1))
        return 0
    metric = load_study(args.study)["metric"]
    print(format_summary(table, metric))
    try:
        print(f"\npaired by seed against the control (delta in {METRICS[metric].removeprefix('test ')} points):")
        print(format_contrasts(contrasts(args.study)))
    except StudyError as e:
        print(f"\n(no contrasts: {e})")
    return 0
