"""Study files: every config x seed of a YAML study, trained under one of two protocols, recorded with provenance, and
judged by claims written into the study file before it runs.

    python -m workbench study run experiments/studies/scratch/placement.yaml [--jobs 2] [--shard 0/4]
    python -m workbench study run experiments/studies/scratch/placement.yaml --executor submitit [--cluster local]
    python -m workbench study status experiments/studies/scratch/placement.yaml
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
    launcher: {partition: gpu, time: "02:00:00", gpus: 1, cpus: 8, mem_gb: 32}   # optional: cluster jobs

Seeds pair configs: with one seed every config sees the same training subset and data order.  Records:
``<results>/<name>/<config>__seed<k>.json`` with the config, seed, commit (a clean tree is required unless
``--allow-dirty``), device, thread count, wall time, final validation and test accuracy, every test prediction
(for McNemar tests), parameters, activated MACs and what the ``analysis`` block asks for.

This module reads and checks study files and plans their runs.  Imports: ``workbench.analysis.stats`` (the claim
directions) and, to build an arm's keywords, ``workbench.models``.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs" / "studies"
STUDY_KEYS = {"name", "description", "protocol", "profile", "model", "base", "base_min_test_acc", "train", "seeds",
              "control", "references", "common", "configs", "analysis", "claims", "metric", "checks", "launcher"}
METRICS = {"test_acc": "test accuracy", "test_miou": "test mIoU", "test_pixel_acc": "test pixel accuracy"}
PROTOCOLS = ("scratch", "upcycle")
PROFILES = ("cpu", "gpu")  # cpu: micro/tiny ViMoE on one CPU thread per run; gpu: ViT-S width/depth, full data
ANALYSIS_KEYS = {"routing", "cls_routing", "prune_fraction", "prune_min_layers", "random_routers", "max_images",
                 "random_subsets",
                 "regions"}
CLAIM_KINDS = ("paired", "spread", "excess", "depth_trend", "pruning", "range", "worst")
SET_KINDS = ("range", "worst")  # claims over a set of placements: treatment and control are lists of configs
# pre-registered checks that the arms learned what is compared (``checks:``); a study failing one is void
CHECK_METRICS = {"expert_spread": "median over MoE blocks of how far the experts moved apart",
                 "router_shift": "median over MoE blocks of ||W - W0|| / ||W0|| of the router",
                 "router_nmi_moved": "median over MoE blocks of |class NMI of the trained router - of its init|",
                 "prediction_change": "share of test predictions that differ from the same seed's control, over "
                                      "the control's own seed-to-seed share",
                 "late_gain": "validation accuracy gained (points) over the last third of the epochs"}
CHECK_KEYS = {"id", "says", "metric", "configs", "at_least", "at_most"}
# ``launcher:``: how a cluster runs each (config, seed) as a job (``study run --executor submitit``; flags override)
LAUNCHER_KEYS = {"partition": "SLURM partition", "time": "time limit per job: minutes, or as sbatch --time (HH:MM:SS, D-HH:MM)",
                 "gpus": "GPUs per job", "cpus": "CPUs per job", "mem_gb": "memory per job in GB",
                 "slurm": "other sbatch options, e.g. {account: lab, qos: normal, constraint: a100}",
                 "setup": "shell lines run before each job, e.g. [module load cuda, source .venv/bin/activate]"}
CLAIM_KEYS = {"id", "says", "paper", "kind", "treatment", "control", "expect", "margin", "blocks", "compare", "tokens",
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
    study.setdefault("checks", [])
    for check in study["checks"]:
        _check_check(path, study, check)
    if "launcher" in study:
        check_launcher(study["launcher"], f"{path}: launcher")
    ids = [c["id"] for c in study["claims"]] + [c["id"] for c in study["checks"]]
    if len(ids) != len(set(ids)):
        raise StudyError(f"{path}: claim and check ids must be unique; repeated: "
                         f"{sorted({i for i in ids if ids.count(i) > 1})}")
    return study


def parse_minutes(value, where: str) -> int:
    """A time limit as whole minutes (rounded up), read as SLURM reads ``--time``: minutes, MM:SS, HH:MM:SS,
    D-HH, D-HH:MM or D-HH:MM:SS."""
    text = str(value).strip()
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            minutes = float(value)
        else:
            days, dash, clock = text.partition("-")
            if not dash:
                days, clock = "0", text
            parts = [int(p) for p in clock.split(":")]
            if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
                raise ValueError
            if dash:  # D-H, D-H:M, D-H:M:S
                hours, mins, secs = (parts + [0, 0])[:3]
            else:  # M, M:S, H:M:S
                hours, mins, secs = parts if len(parts) == 3 else [0] + (parts + [0])[:2]
            minutes = int(days) * 1440 + hours * 60 + mins + secs / 60
    except ValueError:
        raise StudyError(f"{where}: time={value!r} is not a time limit; give minutes (e.g. 90) or HH:MM:SS "
                         f"(e.g. 01:30:00)") from None
    if minutes < 1:
        raise StudyError(f"{where}: time={value!r} is under a minute; give the time one run needs (e.g. 01:30:00)")
    return int(-(-minutes // 1))


def check_launcher(block, where: str) -> dict:
    """A ``launcher:`` block (or the flags that override it), checked: known keys, sensible values."""
    if not isinstance(block, dict):
        raise StudyError(f"{where} must be a mapping of {sorted(LAUNCHER_KEYS)}")
    unknown = set(block) - set(LAUNCHER_KEYS)
    if unknown:
        raise StudyError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(LAUNCHER_KEYS)} (other sbatch "
                         f"options go under slurm:)")
    for key, least, allowed in (("gpus", 0, "an integer >= 0"), ("cpus", 1, "an integer >= 1"),
                                ("mem_gb", 1e-3, "a number of GB > 0")):
        value = block.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < least
                                  or key != "mem_gb" and value != int(value)):
            raise StudyError(f"{where}: {key}={value!r} is invalid: use {allowed}")
    if block.get("time") is not None:
        parse_minutes(block["time"], where)
    if not isinstance(block.get("slurm", {}), dict):
        raise StudyError(f"{where}: slurm must be a mapping of sbatch options (e.g. {{account: lab, qos: normal}})")
    setup = block.get("setup", [])
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise StudyError(f"{where}: setup must be a list of shell lines (e.g. [module load cuda])")
    if "partition" in block and not isinstance(block["partition"], str):
        raise StudyError(f"{where}: partition={block['partition']!r} must be a partition name")
    return block


def _check_check(path, study: dict, check: dict) -> None:
    where = f"{path}: check {check.get('id', '?')!r}"
    if not isinstance(check, dict):
        raise StudyError(f"{path}: each check is a mapping (id, says, metric, at_least or at_most)")
    unknown = set(check) - CHECK_KEYS
    if unknown:
        raise StudyError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(CHECK_KEYS)}")
    for key in ("id", "says", "metric"):
        if key not in check:
            raise StudyError(f"{where}: '{key}' is required")
    if check["metric"] not in CHECK_METRICS:
        raise StudyError(f"{where}: metric={check['metric']!r} is not one of {sorted(CHECK_METRICS)}")
    if ("at_least" in check) == ("at_most" in check):
        raise StudyError(f"{where}: give exactly one of at_least / at_most (the threshold the metric must meet)")
    configs = check.setdefault("configs", [c for c in study["configs"] if c != study["control"]])
    missing = [c for c in configs if c not in study["configs"]]
    if missing:
        raise StudyError(f"{where}: configs {missing} are not configs of this study ({list(study['configs'])})")


def _check_claim(path, study: dict, claim: dict) -> None:
    from ..analysis.stats import DIRECTIONS

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
    if claim["kind"] in SET_KINDS:
        for key in ("treatment", "control"):
            if not isinstance(claim.get(key), list) or len(claim[key]) < 2:
                raise StudyError(f"{where}: a {claim['kind']} claim compares sets of configs: give treatment and "
                                 f"control as lists of at least two configs each (e.g. the placements with and "
                                 f"without a shared expert), in matching order")
        if len(claim["treatment"]) != len(claim["control"]):
            raise StudyError(f"{where}: treatment and control list the same placements: give lists of equal length")
        names = claim["treatment"] + claim["control"]
    else:
        control = claim.get("control")  # none: the study's control
        names = [claim["treatment"]] + ([control] if control not in (None, "step0") else [])
    if claim.get("tokens", "patch") not in ("patch", "cls"):
        raise StudyError(f"{where}: tokens={claim['tokens']!r} is not 'patch' or 'cls' (the CLS token's routing, "
                         f"recorded when analysis.cls_routing is true)")
    for name in names:
        other, _, config = name.rpartition("/")
        if other and other not in study["references"]:
            raise StudyError(f"{where}: {name!r} names study {other!r}; list it under 'references'")
        if not other and config not in study["configs"]:
            raise StudyError(f"{where}: {config!r} is not a config of this study ({list(study['configs'])})")


def as_study(study_or_path) -> dict:
    """A loaded study as it is, or the study file at a path, loaded."""
    return study_or_path if isinstance(study_or_path, dict) else load_study(study_or_path)


def result_path(study: dict, config: str, seed: int, results: Path | None = None) -> Path:
    return Path(results or RESULTS) / study["name"] / f"{config}__seed{seed}.json"


def runs_folder(study: dict, results: Path | None = None) -> Path:
    """Where a study's runs train (``experiments/runs/studies/<study>``, or ``<results>/../runs/<study>``)."""
    return (Path(results).parent / "runs" if results else RUNS) / study["name"]


def run_folder(study: dict, config: str, seed: int, results: Path | None = None) -> Path:
    """Where one run trains (its checkpoint, removed once the run is recorded)."""
    return runs_folder(study, results) / config / f"seed{seed}"


def tensorboard_folder(study: dict, config: str, seed: int, results: Path | None = None) -> Path:
    """One run's TensorBoard event files: ``<results>/<study>/tensorboard/<config>/seed<k>`` (not committed with
    the records: .gitignore; every point is also in the record's history)."""
    return Path(results or RESULTS) / study["name"] / "tensorboard" / config / f"seed{seed}"


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


def arm_model_kwargs(study: dict, config: str) -> tuple[dict, dict]:
    """(model keyword arguments, upcycling keyword arguments) of one arm, as its runs build it: the study's
    ``common`` overlaid with the config; a dense arm drops the MoE switches, which mean nothing to it."""
    from ..models.vimoe import split_moe_kwargs

    kwargs = {**study["common"], **study["configs"][config]}
    kwargs.pop("clean_start", None)
    init_kwargs = {"shared_init": kwargs.pop("shared_init")} if "shared_init" in kwargs else {}
    if study["protocol"] == "scratch":
        init_kwargs = {}
    moe, other = split_moe_kwargs(kwargs)
    if other.get("moe_layers", "none") == "none":
        kwargs = {"moe_layers": "none", **other}
    return kwargs, init_kwargs



def arm_spec(study: dict, config: str) -> dict:
    """Everything in the study file that determines one arm's runs: recorded with each run, and compared before a
    recorded run is skipped, so an edited study file cannot silently mix arms."""
    return {"protocol": study["protocol"], "model": study.get("model"), "base": study.get("base"),
            "train": study["train"], "common": study["common"], "config": study["configs"][config],
            "analysis": study.get("analysis", {})}


