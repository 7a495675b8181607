"""Studies: every config x seed of a YAML study, upcycled from one dense model and fine-tuned (the paper's
procedure), each recorded with its provenance.  Resumable: a run already recorded is skipped; a run interrupted
mid-way resumes from its own checkpoint.

    python -m workbench study run experiments/studies/placement.yaml [--only NAME ...] [--seeds 0 1 2]
    python -m workbench study summary experiments/studies/placement.yaml

A study file::

    name: placement
    profile: cpu                       # cpu: tiny ViMoE on a Fashion-MNIST subset; gpu: larger, full data
    base: experiments/checkpoints/vit_tiny_fmnist_dense      # the dense model every variant starts from
    train: {dataset: fashion-mnist, train_subset: 4000, epochs: 2, batch_size: 128, lr: 5.0e-4}
    seeds: [0, 1, 2]
    common: {num_experts: 8}           # MoE switches shared by every config
    configs:
      dense: {moe_layers: none}
      last-2: {moe_layers: last-2}

Results: ``experiments/results/<name>/<config>__seed<k>.json`` (config, seed, commit, device, wall time, test
accuracy on the full test set, parameters and activated MACs).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import yaml

from .checkpoint import atomic_write_text, load_model
from .provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs" / "studies"
STUDY_KEYS = {"name", "profile", "base", "train", "seeds", "common", "configs", "description", "analysis"}
PROFILES = ("cpu", "gpu")  # cpu: tiny ViMoE, Fashion-MNIST subset; gpu: ViT-S width/depth, full data, on a GPU
ANALYSIS_KEYS = {"routing", "prune_fraction", "prune_min_layers", "null_repeats"}


def load_study(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file {path} does not exist")
    study = yaml.safe_load(path.read_text()) or {}
    unknown = set(study) - STUDY_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(STUDY_KEYS)}")
    for key in ("name", "base", "configs"):
        if key not in study:
            raise ValueError(f"{path}: '{key}' is required")
    study.setdefault("seeds", [0, 1, 2])
    study.setdefault("common", {})
    study.setdefault("train", {})
    study.setdefault("profile", "cpu")
    if study["profile"] not in PROFILES:
        raise ValueError(f"{path}: profile={study['profile']!r} is not one of {PROFILES}")
    analysis = study.setdefault("analysis", {})
    unknown = set(analysis) - ANALYSIS_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown analysis keys {sorted(unknown)}; allowed: {sorted(ANALYSIS_KEYS)}")
    fraction = analysis.get("prune_fraction", 0)
    if not 0 <= fraction < 1:
        raise ValueError(f"{path}: analysis.prune_fraction={fraction} must be in [0, 1)")
    return study


def _as_study(study_or_path) -> dict:
    """A loaded study as it is, or the study file at a path, loaded."""
    return study_or_path if isinstance(study_or_path, dict) else load_study(study_or_path)


def result_path(study: dict, config: str, seed: int, results: Path | None = None) -> Path:
    return Path(results or RESULTS) / study["name"] / f"{config}__seed{seed}.json"


def plan(study: dict, only=None, seeds=None) -> list[tuple[str, int]]:
    names = list(study["configs"])
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ValueError(f"--only {missing}: not in this study (configs: {names})")
        names = [n for n in names if n in only]
    return [(name, seed) for seed in (seeds or study["seeds"]) for name in names]


def run_one(study: dict, config: str, seed: int, device: str = "auto", quiet: bool = True,
            results: Path | None = None) -> dict:
    """Fine-tune one config from the study's dense base and record the result (atomically)."""
    from .flops import profile
    from .train import TrainConfig, train

    kwargs = {**study["common"], **study["configs"][config]}
    if kwargs.get("moe_layers", "none") == "none":
        kwargs = {"moe_layers": "none"}
    out = (Path(results).parent / "runs" if results else RUNS) / study["name"] / config / f"seed{seed}"
    cfg = TrainConfig.from_dict({"quiet": quiet, "device": device, **study["train"], "seed": seed,
                                 "init_from": str(ROOT / study["base"]), "model_kwargs": kwargs,
                                 "output": str(out)})
    started = time.time()
    history = train(cfg, resume=(out / "checkpoint.pt").exists())["history"]
    model, model_cfg = load_model(out / "model")
    prof = profile(model)
    last = history[-1]
    analysis = analyse_run(model, cfg, study.get("analysis", {}), seed)
    record = {"study": study["name"], "config": config, "seed": seed, "model_config": model_cfg,
              "train_config": {k: v for k, v in cfg.__dict__.items() if k not in ("quiet", "output")},
              "test_acc": last["test_acc"], "test_loss": last["test_loss"], "test_n": last["test_n"],
              "train_acc": last["train_acc"], "params": prof.params, "active_params": prof.active_params,
              "gmacs": prof.macs / 1e9, "moe_test": last["moe_test"], "history": history, **analysis,
              "provenance": provenance(device if device != "auto" else None,
                                       wall_time_s=round(time.time() - started, 1),
                                       train_wall_time_s=last["wall_time"])}
    atomic_write_text(result_path(study, config, seed, results), json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the record holds what matters; weights of every variant would bloat
    return record


def analyse_run(model, cfg, analysis: dict, seed: int) -> dict:
    """What a study's ``analysis`` block asks of a trained run, computed before its weights are deleted:

    * ``routing: true``: per MoE layer on the full test set, the specialisation metrics against the
      label-permutation null (``layer_report``) and the class x expert / position x expert count tables.
    * ``prune_fraction: f`` (runs with at least ``prune_min_layers`` MoE layers, default 4): densify
      round(f x layers) MoE layers three ways, the least specialised, the most specialised and a seeded random
      choice, and record test accuracy, parameters and MACs of each (no fine-tuning after the merge).
    """
    from .data import build_datasets
    from .moe import moe_modules

    blocks = sorted(moe_modules(model))
    if not blocks or not (analysis.get("routing") or analysis.get("prune_fraction")):
        return {}
    from .routing import collect_routing
    from .specialisation import layer_report

    _, test = build_datasets(cfg.dataset, root=cfg.data_root, model=model, augment=False, test_subset=cfg.test_subset)
    stats = collect_routing(model, test, progress=False)
    report = layer_report(stats, repeats=int(analysis.get("null_repeats", 20)))
    out = {}
    if analysis.get("routing"):
        tables = {b: {"class_expert": s.class_expert.round().int().tolist(),
                      "position_expert": s.position_expert.round().int().tolist()
                      if s.position_expert is not None else None} for b, s in stats.layers.items()}
        out["routing"] = {str(int(r["block"])): {**{k: (round(v, 5) if isinstance(v, float) else v)
                                                   for k, v in r.items() if k != "block"}, **tables[int(r["block"])]}
                          for r in report.to_dict("records")}
    k = round(analysis.get("prune_fraction", 0) * len(blocks))
    if k and len(blocks) >= analysis.get("prune_min_layers", 4):
        out["pruning"] = prune_controls(model, stats, report, test, k, seed)
    return out


def prune_controls(model, stats, report, test, count: int, seed: int) -> list[dict]:
    """Densify ``count`` MoE layers chosen by specialisation (least, most) and at random; evaluate each."""
    import random

    from .densify import densify
    from .flops import profile
    from .specialisation import layers_to_densify
    from .train import evaluate

    ranked = report["block"].tolist()  # most specialised first
    choices = [("none", []), ("least specialised", layers_to_densify(report, count=count)),
               ("most specialised", sorted(ranked[:count])),
               ("random", sorted(random.Random(seed).sample(sorted(stats.layers), count)))]
    rows = []
    for name, chosen in choices:
        m = densify(model, chosen, "merge", stats=stats) if chosen else model
        p = profile(m)
        rows.append({"densified": name, "blocks": [int(b) for b in chosen], "test_acc": evaluate(m, test)["acc"],
                     "params": p.params, "gmacs": round(p.macs / 1e9, 6)})
    return rows


def run_study(path, only=None, seeds=None, device: str = "auto", results: Path | None = None) -> list[dict]:
    study = load_study(path)
    todo = plan(study, only, seeds)
    base = ROOT / study["base"]
    if not base.exists():
        raise ValueError(f"{path}: the dense base {study['base']} does not exist; train it first "
                         f"(experiments/default/train.sh for the cpu profile, experiments/gpu/train_base.sh "
                         f"for the gpu profile)")
    if study["profile"] == "gpu" and device == "auto":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{path} is a gpu-profile study and this machine has no CUDA GPU; run it on one, "
                             f"or pass --device cpu to run it here anyway (slowly)")
    done = []
    for i, (config, seed) in enumerate(todo, 1):
        target = result_path(study, config, seed, results)
        if target.exists():
            print(f"[{i}/{len(todo)}] {config} seed {seed}: recorded, skipped", flush=True)
            continue
        t0 = time.time()
        record = run_one(study, config, seed, device, results=results)
        print(f"[{i}/{len(todo)}] {config} seed {seed}: test acc {record['test_acc']:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        done.append(record)
    return done


def load_results(study_or_path, results: Path | None = None) -> pd.DataFrame:
    rows = []
    for r in _records(study_or_path, results):
        rows.append({"config": r["config"], "seed": r["seed"], "test_acc": r["test_acc"], "params": r["params"],
                     "active_params": r["active_params"], "gmacs": r["gmacs"],
                     "wall_time_s": r["provenance"]["wall_time_s"], "device": r["provenance"]["device"],
                     "commit": r["provenance"]["commit"]})
    return pd.DataFrame(rows, columns=["config", "seed", "test_acc", "params", "active_params", "gmacs",
                                       "wall_time_s", "device", "commit"])


def _records(study_or_path, results: Path | None = None):
    study = _as_study(study_or_path)
    for path in sorted((Path(results or RESULTS) / study["name"]).glob("*.json")):
        yield json.loads(path.read_text())


def load_routing(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """The recorded routing analyses: one row per (config, seed, MoE block) with the specialisation metrics and
    their nulls (runs recorded without ``analysis.routing`` are absent)."""
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
    study = _as_study(study_or_path)
    path = result_path(study, config, seed, results)
    if not path.is_file():
        raise ValueError(f"{config} seed {seed} is not recorded in study {study['name']} ({path})")
    record = json.loads(path.read_text())
    if "routing" not in record:
        raise ValueError(f"{path} has no routing analysis: it was recorded without analysis.routing")
    return {int(b): layer[kind] for b, layer in record["routing"].items() if layer[kind] is not None}


def load_pruning(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """The recorded pruning controls: one row per (config, seed, choice of densified layers)."""
    rows = [{"config": r["config"], "seed": r["seed"], **row}
            for r in _records(study_or_path, results) if "pruning" in r and (not configs or r["config"] in configs)
            for row in r["pruning"]]
    return pd.DataFrame(rows, columns=["config", "seed", "densified", "blocks", "test_acc", "params", "gmacs"])


def summary(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Mean and std of test accuracy over seeds per config (in the study's order), params and GMACs beside."""
    study = _as_study(study_or_path)
    df = load_results(study, results)
    if df.empty:
        return pd.DataFrame(columns=["config", "n", "acc_mean", "acc_std", "params_M", "gmacs"])
    g = df.groupby("config")
    table = pd.DataFrame({"n": g["seed"].count(), "acc_mean": g["test_acc"].mean(),
                          "acc_std": g["test_acc"].std(ddof=1).fillna(0.0),
                          "params_M": g["params"].first() / 1e6, "gmacs": g["gmacs"].first()})
    order = [c for c in study["configs"] if c in table.index]
    return table.loc[order].reset_index()


def format_summary(table: pd.DataFrame) -> str:
    lines = [f"{'config':<16} {'n':>2} {'acc mean':>9} {'acc std':>8} {'params M':>9} {'GMACs':>7}"]
    for r in table.itertuples():
        lines.append(f"{r.config:<16} {r.n:>2} {r.acc_mean:>9.4f} {r.acc_std:>8.4f} {r.params_M:>9.3f} {r.gmacs:>7.4f}")
    return "\n".join(lines)


def register_cli(sub) -> None:
    p = sub.add_parser("study", help="run a study (configs x seeds, resumable) or print its summary")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run")
    r.add_argument("study")
    r.add_argument("--only", nargs="+", help="config names to run")
    r.add_argument("--seeds", nargs="+", type=int)
    r.add_argument("--device", default="auto")
    r.set_defaults(func=lambda a: (run_study(a.study, a.only, a.seeds, a.device), 0)[1])
    s = ssub.add_parser("summary")
    s.add_argument("study")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_summary)


def _cmd_summary(args) -> int:
    table = summary(args.study)
    print(table.to_json(orient="records", indent=1) if args.json else format_summary(table))
    return 0
