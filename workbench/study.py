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
STUDY_KEYS = {"name", "profile", "base", "train", "seeds", "common", "configs", "description"}


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
    return study


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
    record = {"study": study["name"], "config": config, "seed": seed, "model_config": model_cfg,
              "train_config": {k: v for k, v in cfg.__dict__.items() if k not in ("quiet", "output")},
              "test_acc": last["test_acc"], "test_loss": last["test_loss"], "test_n": last["test_n"],
              "train_acc": last["train_acc"], "params": prof.params, "active_params": prof.active_params,
              "gmacs": prof.macs / 1e9, "moe_test": last["moe_test"], "history": history,
              "provenance": provenance(device if device != "auto" else None,
                                       wall_time_s=round(time.time() - started, 1),
                                       train_wall_time_s=last["wall_time"])}
    atomic_write_text(result_path(study, config, seed, results), json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the record holds what matters; weights of every variant would bloat
    return record


def run_study(path, only=None, seeds=None, device: str = "auto", results: Path | None = None) -> list[dict]:
    study = load_study(path)
    todo = plan(study, only, seeds)
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
    study = study_or_path if isinstance(study_or_path, dict) else load_study(study_or_path)
    rows = []
    for path in sorted((Path(results or RESULTS) / study["name"]).glob("*.json")):
        r = json.loads(path.read_text())
        rows.append({"config": r["config"], "seed": r["seed"], "test_acc": r["test_acc"], "params": r["params"],
                     "active_params": r["active_params"], "gmacs": r["gmacs"],
                     "wall_time_s": r["provenance"]["wall_time_s"], "device": r["provenance"]["device"],
                     "commit": r["provenance"]["commit"]})
    return pd.DataFrame(rows)


def summary(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Mean and std of test accuracy over seeds per config (in the study's order), params and GMACs beside."""
    study = study_or_path if isinstance(study_or_path, dict) else load_study(study_or_path)
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
