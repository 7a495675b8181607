"""Reading a study's records: one JSON file per (config, seed) under ``<results>/<study>/``, as tables (results,
routing, regions, pruning) and per-seed values of one config (which may live in a referenced study).

Imports: this package's ``spec``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .spec import RESULTS, ROOT, StudyError, as_study, load_study, result_path


def iter_records(study_or_path, results: Path | None = None):
    study = as_study(study_or_path)
    for path in sorted((Path(results or RESULTS) / study["name"]).glob("*__seed*.json")):
        yield json.loads(path.read_text())


def load_record(study_or_path, config: str, seed: int, results: Path | None = None) -> dict:
    study = as_study(study_or_path)
    path = result_path(study, config, seed, results)
    if not path.is_file():
        raise StudyError(f"{config} seed {seed} is not recorded in study {study['name']} ({path})")
    return json.loads(path.read_text())


def load_results(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """One row per recorded run; ``score`` is the study's metric (test accuracy, or test mIoU for segmentation)."""
    metric = as_study(study_or_path)["metric"]
    cols = ["config", "seed", "score", "test_acc", "val_acc", "step0_test_acc", "params", "active_params", "gmacs",
            "wall_time_s", "threads", "device", "commit"]
    rows = [{"config": r["config"], "seed": r["seed"], "score": r[metric], "test_acc": r["test_acc"],
             "val_acc": r.get("val_acc"),
             "step0_test_acc": r.get("step0_test_acc"), "params": r["params"], "active_params": r["active_params"],
             "gmacs": r["gmacs"], "wall_time_s": r["provenance"]["wall_time_s"],
             "threads": r["provenance"].get("threads"), "device": r["provenance"]["device"],
             "commit": r["provenance"]["commit"]} for r in iter_records(study_or_path, results)]
    return pd.DataFrame(rows, columns=cols)


def load_regions(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """The recorded routing-vs-regions analyses: one row per (config, seed, MoE block)."""
    rows = [{"config": r["config"], "seed": r["seed"], "block": int(b), **layer}
            for r in iter_records(study_or_path, results) if "regions" in r and (not configs or r["config"] in configs)
            for b, layer in r["regions"].items()]
    if not rows:
        return pd.DataFrame(columns=["config", "seed", "block"])
    return pd.DataFrame(rows).sort_values(["config", "seed", "block"]).reset_index(drop=True)


def load_routing(study_or_path, configs=None, results: Path | None = None, tokens: str = "patch") -> pd.DataFrame:
    """The recorded routing analyses: one row per (config, seed, MoE block) with the specialisation metrics, the
    random-router test and the label-permutation null (runs recorded without ``analysis.routing`` are absent).
    ``tokens='cls'``: the class token's routing instead (``analysis.cls_routing``)."""
    key = {"patch": "routing", "cls": "routing_cls"}[tokens]
    rows = []
    for r in iter_records(study_or_path, results):
        if key not in r or (configs and r["config"] not in configs):
            continue
        for block, layer in r[key].items():
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
    for r in iter_records(study_or_path, results):
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
    source, config = source_of(study, name)
    df = load_results(source, results)
    df = df[df["config"] == config]
    return df.set_index("seed")[metric].sort_index()


def source_of(study: dict, name: str) -> tuple[dict, str]:
    """(study, config) for a config name that may be ``other-study/config``."""
    other, _, config = name.rpartition("/")
    return (referenced(study, other) if other else study), config


def referenced(study: dict, name: str) -> dict:
    folder = Path(study.get("_path", ROOT / "experiments" / "studies" / "x.yaml")).parent
    for path in sorted(folder.glob("*.yaml")):
        other = load_study(path)
        if other["name"] == name:
            return other
    raise StudyError(f"study {name!r} (named in references of {study['name']}) has no file in {folder}")
