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

This module reads study files and checks all of them before anything runs (keys, seeds, control, references, each
arm's train config and model, built on the meta device) and plans their runs.  Imports: ``workbench.analysis.stats``
(the claim directions), ``workbench.models`` and ``workbench.train`` (an arm's keywords, config and model).

Long because every rule a study file must meet (its keys, arms, claims, checks, launcher, references) is checked
here, in one place, before any run and by every command that reads the file.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import StudyError
from .launcher import LAUNCHER_KEYS, check_launcher, parse_minutes  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs" / "studies"
STUDY_KEYS = {"name", "description", "protocol", "profile", "model", "base", "base_min_test_acc", "train", "seeds",
              "control", "references", "common", "configs", "analysis", "claims", "metric", "checks", "launcher"}
METRICS = {"test_acc": "test accuracy", "test_miou": "test mIoU", "test_pixel_acc": "test pixel accuracy"}
PROTOCOLS = ("scratch", "upcycle")
PROFILES = ("cpu", "gpu")  # cpu: micro/tiny ViMoE on one CPU thread per run; gpu: ViT-S width/depth, full data
ANALYSIS_KEYS = {"routing", "cls_routing", "prune_fraction", "expert_pruning", "prune_min_layers", "random_routers",
                 "max_images", "random_subsets", "regions", "densify_finetune"}
CLAIM_KINDS = ("paired", "spread", "excess", "depth_trend", "pruning", "range", "worst", "guided", "refit",
               "experts")
SET_KINDS = ("range", "worst")  # claims over a set of placements: treatment and control are lists of configs
# pre-registered checks that the arms learned what is compared (``checks:``); a study failing one is void
CHECK_METRICS = {"expert_spread": "median over MoE blocks of how far the experts moved apart",
                 "router_shift": "median over MoE blocks of ||W - W0|| / ||W0|| of the router",
                 "router_nmi_moved": "median over MoE blocks of |class NMI of the trained router - of its init|",
                 "prediction_change": "share of test predictions that differ from the same seed's control, over "
                                      "the control's own seed-to-seed share",
                 "late_gain": "validation accuracy gained (points) over the last third of the epochs",
                 "specialised_blocks": "MoE blocks whose patch-token routing beats random routers (Holm)",
                 "specialised_blocks_cls": "MoE blocks whose CLS-token routing beats random routers (Holm)",
                 "specialised_blocks_regions": "MoE blocks whose routing of patches by their majority class beats "
                                               "random routers (Holm; segmentation, analysis.regions)",
                 "specialised_blocks_regions_balanced": "the same under the balanced test (every router and random "
                                                        "draw given equal expert loads)"}
# what an excess / depth_trend claim reads (``metric:``): the trained router's NMI minus the random routers'
EXCESS_METRICS = ("excess", "bal_excess", "position_excess")
CHECK_KEYS = {"id", "says", "metric", "configs", "at_least", "at_most"}
CLAIM_KEYS = {"id", "says", "paper", "kind", "treatment", "control", "expect", "margin", "blocks", "compare", "tokens",
              "source", "guide", "rank_by", "keep", "metric"}  # guided claims: the all-MoE run whose validation routing picks the
# placement, and the routing metric that ranks its blocks (bal_excess, the default, or excess)  # source: 'routing' (class routing, default) or 'regions' (segmentation) for excess/depth


# -- study files ------------------------------------------------------------------------------------------------
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML was built with it
_PARSED: dict = {}


def read_yaml(path: Path):
    """A YAML file's contents (a fresh copy), parsed once per version of the file (path, size, modification time) in
    a process: a notebook's tables read the same study files hundreds of times."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        _PARSED[key] = yaml.load(path.read_text(), Loader=_LOADER)
    return copy.deepcopy(_PARSED[key])


def load_study(path) -> dict:
    path = Path(path)
    if not path.is_file():
        same = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments" / "studies").glob(f"*/{path.name}"))
        where = (f"did you mean {' or '.join(same)}?" if same else
                 "study files are under experiments/studies/<protocol>/ (scratch, upcycle, regime, pilots, ...)")
        raise StudyError(f"study file {path} does not exist ({where})")
    try:
        study = read_yaml(path) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise StudyError(f"{path} is not a study file (not valid YAML: {str(err).splitlines()[0]}); study files are "
                         f"in experiments/studies/") from None
    if not isinstance(study, dict):
        raise StudyError(f"{path} is not a study file (a YAML mapping with name, protocol, configs, ...)")
    unknown = sorted(set(study) - STUDY_KEYS)
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, STUDY_KEYS, n=1)) else repr(k)
                 for k in unknown]
        raise StudyError(f"{path}: unknown keys {', '.join(hints)}; allowed: {sorted(STUDY_KEYS)}")
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
    implicit_control = "control" not in study
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
    _check_shape(path, study)
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
    if not implicit_control or any(c["kind"] in ("paired", "spread") and "control" not in c for c in study["claims"]):
        _check_control(path, study)  # a control left at its default matters once a claim compares with it
    _check_references(path, study)
    check_arms(study)
    if "expert_pruning" in analysis:
        _check_expert_pruning(path, study)
    if "densify_finetune" in analysis:
        from .refit import check_refit

        kwargs = {c: arm_model_kwargs(study, c)[0] for c in study["configs"]}
        arms = {c: k.get("shared_expert", "none") != "none" for c, k in kwargs.items()
                if k.get("moe_layers", "none") != "none"}
        problem = check_refit(analysis["densify_finetune"], arms, analysis, study["protocol"])
        if problem:
            raise StudyError(f"{path}: {problem}")
    return study


def _check_expert_pruning(path, study: dict) -> None:
    from .analyse import check_expert_pruning

    arms = {}
    for config in study["configs"]:
        kwargs, _ = arm_model_kwargs(study, config)
        if kwargs.get("moe_layers", "none") != "none":
            arms[config] = (int(kwargs.get("num_experts", 8)), int(kwargs.get("top_k", 1)))
    problem = check_expert_pruning(study["analysis"]["expert_pruning"], arms)
    if problem:
        raise StudyError(f"{path}: {problem}")


def _check_shape(path, study: dict) -> None:
    """The parts every later step reads: configs (a mapping of arm name -> keywords), common, train (TrainConfig
    fields the study does not set itself), seeds (distinct integers >= 0) and the control (an arm of this study, or
    ``study/config`` of a referenced one)."""
    import dataclasses

    from ..train.config import TrainConfig

    for key in ("configs", "common", "train", "analysis"):
        if not isinstance(study[key], dict) or (key == "configs" and not study[key]):
            raise StudyError(f"{path}: '{key}' must be a mapping" + (" of arm name -> model keywords, e.g. configs: "
                             "{dense: {moe_layers: none}}" if key == "configs" else ""))
    for name, arm in study["configs"].items():
        if arm is None:
            study["configs"][name] = {}
        elif not isinstance(arm, dict):
            raise StudyError(f"{path}: arm {name!r} must be a mapping of model keywords (e.g. {{moe_layers: "
                             f"last-2}}), not {arm!r}")
    known = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in TRAIN_SET_BY_STUDY]
    for key in study["train"]:
        if key in TRAIN_SET_BY_STUDY:
            raise StudyError(f"{path}: train.{key} is set by the study itself ({TRAIN_SET_BY_STUDY[key]}); take it "
                             "out of train")
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            raise StudyError(f"{path}: unknown train key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; train takes TrainConfig fields: {', '.join(known)}")
    seeds = study["seeds"]
    if (not isinstance(seeds, list) or not seeds or any(type(s) is not int or s < 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise StudyError(f"{path}: seeds={seeds!r} is invalid: give a list of distinct integers >= 0, e.g. [0, 1, 2]")
    if not isinstance(study["references"], list) or not all(isinstance(r, str) for r in study["references"]):
        raise StudyError(f"{path}: references must be a list of study names, e.g. [scratch-placement]")


def _check_control(path, study: dict) -> None:
    other, _, control = str(study["control"]).rpartition("/")
    if other and other not in study["references"]:
        raise StudyError(f"{path}: control {study['control']!r} names study {other!r}; list it under 'references'")
    if not other and control not in study["configs"]:
        import difflib

        close = difflib.get_close_matches(control, list(study["configs"]), n=1)
        raise StudyError(f"{path}: control {control!r} is not an arm of this study"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; name one of {list(study['configs'])} (every arm is compared with it)")


# train keys a study sets itself, and where
TRAIN_SET_BY_STUDY = {"seed": "seeds", "model": "model", "model_kwargs": "common and configs", "init_from": "base",
                      "output": "its runs folder", "quiet": "study run"}


def _check_references(path, study: dict) -> None:
    """Every referenced study has a file beside this one, and every ``study/config`` a claim or the control names is
    an arm of it."""
    folder = Path(path).parent
    names = {}
    for other in sorted(folder.glob("*.yaml")):
        try:
            text = read_yaml(other)
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue
        if isinstance(text, dict) and isinstance(text.get("name"), str):
            names.setdefault(text["name"], (other, text.get("configs") or {}))
    for ref in study["references"]:
        if ref not in names:
            raise StudyError(f"{path}: references names study {ref!r}, which has no file in {folder} (study "
                             f"names there: {sorted(names)}); fix the name, or copy {ref!r}'s study file beside this "
                             "one (a study that references another must sit in the same folder)")
    wanted = [("control", study["control"])]
    for claim in study["claims"]:
        for key in ("treatment", "control", "guide"):
            value = claim.get(key)
            wanted += [(f"claim {claim['id']!r}", v) for v in (value if isinstance(value, list) else [value])]
    for what, name in wanted:
        other, _, config = str(name).rpartition("/")
        if other and config not in names[other][1]:
            raise StudyError(f"{path}: {what} names {name!r}, but {config!r} is not an arm of study {other!r} "
                             f"({names[other][0]}: {list(names[other][1])})")


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
    from ..data.scenes import SEG_DATASETS

    seg = study.get("train", {}).get("dataset") in SEG_DATASETS
    if seg and check["metric"] in ("expert_spread", "router_shift", "router_nmi_moved") \
            and not study.get("analysis", {}).get("regions"):
        raise StudyError(f"{where}: a segmentation study records {check['metric']} with its regions analysis; "
                         "set analysis.regions: true")
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
    elif claim["kind"] == "guided":
        if not isinstance(claim["treatment"], list) or len(claim["treatment"]) < 2 or "guide" not in claim:
            raise StudyError(f"{where}: a guided claim lists every k-of-L placement as treatment (a list of configs) "
                             f"and names the all-MoE run whose routing picks one per seed as guide (e.g. guide: all)")
        if "tokens" not in claim or claim.get("rank_by", "bal_excess") not in ("bal_excess", "excess"):
            raise StudyError(f"{where}: a guided claim names the routing that picks: tokens (cls or patch) and "
                             f"optionally rank_by (bal_excess, the default, or excess)")
        control = claim.get("control", "others")
        names = claim["treatment"] + [claim["guide"]] + ([control] if control != "others" else [])
    elif claim["kind"] == "refit":
        from .refit import VARIANTS

        compare = claim.get("compare")
        if (not isinstance(compare, list) or len(compare) != 2 or compare[0] == compare[1]
                or set(compare) - set(VARIANTS) or "control" in claim):
            raise StudyError(f"{where}: a refit claim reads one arm's densify_finetune analysis (treatment: the arm) "
                             f"and compares two of its variants, compare: [a, b] from {list(VARIANTS)} (a - b, "
                             "paired by seed), e.g. compare: [merge_ft, unpruned_ft]")
        names = [claim["treatment"]]
        block = study.get("analysis", {}).get("densify_finetune")
        if "/" not in claim["treatment"] and isinstance(block, dict):
            from .refit import starts_of

            have = {v for s in starts_of(block, study["protocol"]) for v in (s, s + "_ft")}
            if set(compare) - have:
                raise StudyError(f"{where}: compare names {sorted(set(compare) - have)}, which "
                                 f"analysis.densify_finetune does not record (its variants: {sorted(have)})")
    elif claim["kind"] == "experts":
        names = [claim["treatment"]]
        _check_experts_claim(where, study, claim)
    else:
        control = claim.get("control")  # none: the study's control
        names = [claim["treatment"]] + ([control] if control not in (None, "step0") else [])
    if "metric" in claim and (claim["kind"] not in ("excess", "depth_trend") or claim["metric"] not in EXCESS_METRICS
                              or (claim["metric"] != "excess" and claim.get("source") != "regions")):
        raise StudyError(f"{where}: metric={claim['metric']!r} is for excess and depth_trend claims: excess (the "
                         f"default), or with source: regions also bal_excess or position_excess")
    if claim.get("tokens", "patch") not in ("patch", "cls"):
        raise StudyError(f"{where}: tokens={claim['tokens']!r} is not 'patch' or 'cls' (the CLS token's routing, "
                         f"recorded when analysis.cls_routing is true)")
    for name in names:
        other, _, config = name.rpartition("/")
        if other and other not in study["references"]:
            raise StudyError(f"{where}: {name!r} names study {other!r}; list it under 'references'")
        if not other and config not in study["configs"]:
            raise StudyError(f"{where}: {config!r} is not a config of this study ({list(study['configs'])})")


def _check_experts_claim(where: str, study: dict, claim: dict) -> None:
    """An ``experts`` claim: two variants of one arm's expert-pruning analysis at ``keep`` experts."""
    from ..analysis.prune import EXPERT_METHODS

    known = [m + ft for m in (*EXPERT_METHODS, "random") for ft in ("", "_ft")] + ["unpruned", "unpruned_ft"]
    compare = claim.get("compare")
    if (not isinstance(compare, list) or len(compare) != 2 or compare[0] == compare[1] or set(compare) - set(known)
            or type(claim.get("keep")) is not int or "control" in claim):
        raise StudyError(f"{where}: an experts claim reads one arm's expert_pruning analysis (treatment: the arm) at "
                         f"keep experts (an integer) and compares two variants, compare: [a, b] from {known} (a - b, "
                         f"paired by seed), e.g. keep: 4, compare: [reap, random]")
    block = study.get("analysis", {}).get("expert_pruning")
    if "/" not in claim["treatment"] and isinstance(block, dict):
        if claim["keep"] not in block.get("keep", []):
            raise StudyError(f"{where}: keep={claim['keep']} is not among analysis.expert_pruning.keep "
                             f"{block.get('keep')}")
        methods = {*block.get("methods", EXPERT_METHODS), "random", "unpruned"}
        if {c.removesuffix("_ft") for c in compare} - methods:
            raise StudyError(f"{where}: compare names {sorted({c.removesuffix('_ft') for c in compare} - methods)}, "
                             f"which analysis.expert_pruning does not record (methods {sorted(methods)})")
        if any(c.endswith("_ft") for c in compare) and not block.get("finetune"):
            raise StudyError(f"{where}: compare names a fine-tuned variant, but analysis.expert_pruning has no "
                             f"finetune block")


def as_study(study_or_path) -> dict:
    """A loaded study as it is, or the study file at a path, loaded."""
    return study_or_path if isinstance(study_or_path, dict) else load_study(study_or_path)


def result_path(study: dict, config: str, seed: int, results: Path | None = None) -> Path:
    return Path(results or RESULTS) / study["name"] / f"{config}__seed{seed}.json"


def runs_folder(study: dict, results: Path | None = None) -> Path:
    """Where a study's runs train (``experiments/runs/studies/<study>``, or ``<results>/../runs/<study>`` for
    another results folder than the default)."""
    other = results and Path(results).resolve() != RESULTS.resolve()
    return (Path(results).parent / "runs" if other else RUNS) / study["name"]


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


def arm_train_values(study: dict, config: str, seed: int, out, device: str = "auto", quiet: bool = True) -> dict:
    """The TrainConfig fields of one run of an arm: the study's ``train`` with the arm's model (scratch) or base
    (upcycle), keywords, seed and output."""
    kwargs, init_kwargs = arm_model_kwargs(study, config)
    values = {"quiet": quiet, "device": device, **study["train"], **init_kwargs, "seed": seed,
              "model_kwargs": kwargs, "output": str(out)}
    if study["protocol"] == "upcycle":
        values["init_from"] = str(ROOT / study["base"])  # step 0 is measured by check_clean_start, not the trainer
    else:
        values["model"] = study["model"]
    return values


_ARMS_CHECKED: set = set()


def check_arms(study: dict) -> None:
    """Every arm, before anything runs: its train config validates, and its model builds on the meta device (no
    weights) exactly as its runs will build it (scratch: from ``model``; upcycle: the base's architecture, then
    upcycled; a base not trained yet: the MoE switches alone).  Errors name the file, the arm and the fix.  Checked
    once per study content in a process."""
    import json

    key = json.dumps({k: study.get(k) for k in ("protocol", "model", "base", "train", "common", "configs", "seeds")},
                     sort_keys=True, default=str)
    if key in _ARMS_CHECKED:
        return
    for config in study["configs"]:
        _check_arm(study, config)
    _ARMS_CHECKED.add(key)


def _check_arm(study: dict, config: str) -> None:
    import torch

    from ..data.scenes import check_data_options
    from ..models.args import UsageError, kwarg_problem, model_params
    from ..train.config import TrainConfig, resolve_task

    where = f"{study['_path']}: arm {config!r}"
    kwargs, _ = arm_model_kwargs(study, config)
    try:
        cfg = TrainConfig.from_dict(arm_train_values(study, config, study["seeds"][0], "-"))
        cfg.validate()
        task = resolve_task(cfg)
        check_data_options(cfg.dataset, cfg.data_options)
    except (ValueError, TypeError) as err:
        raise StudyError(f"{where}: {err}; fix the study's train block") from None
    fix = (f"fix configs.{config}" + (" or common" if study["common"] else "")
           + " (MoE switches and the model's keywords)")
    if study["protocol"] == "scratch":
        try:
            params = model_params(study["model"])
        except UsageError as err:
            raise StudyError(f"{study['_path']}: model: {err}") from None
        for name, value in kwargs.items():
            problem = params is not None and kwarg_problem(params, name, value)
            if problem:
                raise StudyError(f"{where}: {problem}; {fix}")
    try:
        with torch.device("meta"):
            _build_arm(study, cfg, task)
    except Exception as err:  # what the model's own checks raise (top_k > num_experts, a bad placement, ...)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudyError(f"{where}: {text}; {fix}") from None


def _build_arm(study: dict, cfg, task: str) -> None:
    """Build the arm's model as its runs do, under the caller's device (meta)."""
    import json

    from ..models.vimoe import split_moe_kwargs, validate_moe_kwargs
    from ..train import checkpoint as ckpt
    from ..train.trainer import build_training_model, upcycle_dense

    if study["protocol"] == "scratch":
        build_training_model(cfg)
        return
    config_path = ROOT / study["base"] / "config.json"
    try:
        dense_config = json.loads(config_path.read_text())
        dense = ckpt.build_model(dense_config)
    except (OSError, ValueError, KeyError, ckpt.CheckpointError):  # no base yet: its runs will say so
        moe, other = split_moe_kwargs(cfg.model_kwargs)
        other.pop("moe_layers", None)
        if other:
            raise ValueError(f"with init_from only MoE switches may be given, not {sorted(other)}") from None
        validate_moe_kwargs(moe)
        return
    upcycle_dense(dense, dense_config, cfg, task)


def arm_spec(study: dict, config: str) -> dict:
    """Everything in the study file that determines one arm's runs: recorded with each run, and compared before a
    recorded run is skipped, so an edited study file cannot silently mix arms."""
    return {"protocol": study["protocol"], "model": study.get("model"), "base": study.get("base"),
            "train": study["train"], "common": study["common"], "config": study["configs"][config],
            "analysis": study.get("analysis", {})}


