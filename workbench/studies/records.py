"""Reading a study's records: one JSON file per (config, seed) under ``<results>/<study>/``, as tables (results,
routing, regions, pruning) and per-seed values of one config (which may live in a referenced study).  Only the
records the study file describes are read (``iter_records``: the one reader); a damaged record names its file.

Imports: this package's ``spec``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from .spec import RESULTS, ROOT, StudyError, arm_model_kwargs, arm_spec, as_study, load_study, plan, result_path


def progress(study_or_path, results: Path | None = None) -> tuple[int, int]:
    """(recorded, planned): how many of the study's planned (config, seed) runs have a record."""
    study = as_study(study_or_path)
    todo = plan(study)
    done = {(r["config"], r["seed"]) for r in iter_records(study, results)}
    return sum(run in done for run in todo), len(todo)


def read_record(path) -> dict:
    """One record file, or a StudyError naming the file when it is damaged (not JSON, not a record)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"record {path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                         "restore it (git checkout -- FILE) or delete it, and study run records that run again") \
            from None
    except OSError as err:
        raise StudyError(f"record {path} cannot be read ({err.strerror or err})") from None
    if not isinstance(record, dict) or not {"config", "seed"} <= set(record):
        raise StudyError(f"record {path} is damaged (not a study record: no config and seed); restore it "
                         "(git checkout -- FILE) or delete it, and study run records that run again")
    return record


def describes(study: dict, record: dict) -> str | None:
    """None when the study file describes a record (its arm as defined now, one of its seeds), else why not."""
    config = record["config"]
    if config not in study["configs"]:
        return "of arms the file no longer has"
    if record["seed"] not in study["seeds"]:
        return "of seeds the file does not list"
    if "arm_spec" in record:  # the whole arm definition: protocol, model or base, budget, keywords, analysis
        if record["arm_spec"] != json.loads(json.dumps(arm_spec(study, config))):
            return "recorded with another definition of their arm (keywords, budget or analysis since changed)"
        return None
    if "train_config" not in record:  # nothing to compare with
        return None
    kwargs, init = arm_model_kwargs(study, config)  # records from before arm_spec: their budget and keywords
    recorded = record["train_config"]
    if (any(recorded.get(k) != v for k, v in {**study["train"], **init}.items())
            or json.loads(json.dumps(recorded.get("model_kwargs"))) != json.loads(json.dumps(kwargs))
            or study["protocol"] == "scratch" and recorded.get("model") != study["model"]):
        return "recorded with another definition of their arm (keywords or budget since changed)"
    return None


_WARNED: set = set()


def iter_records(study_or_path, results: Path | None = None):
    """The study's records that its file describes (see :func:`describes`), read by every table and claim; the
    others (a seed run beyond the file's, an arm edited since it was recorded) are left out, with one warning on
    stderr naming how many and why.  A damaged record stops with its file named."""
    study = as_study(study_or_path)
    folder = Path(results or RESULTS) / study["name"]
    left_out = {}
    for path in sorted(folder.glob("*__seed*.json")):
        record = read_record(path)
        why = describes(study, record)
        if why is None:
            yield record
        else:
            left_out.setdefault(why, []).append(f"{record['config']} seed {record['seed']}")
    if left_out:
        n = sum(map(len, left_out.values()))
        text = (f"warning: study {study['name']}: {n} record{'s' if n > 1 else ''} in {folder} left out of its "
                f"tables and claims: " + "; ".join(f"{len(runs)} {why} ({', '.join(runs[:4])}"
                                                  f"{', ...' if len(runs) > 4 else ''})"
                                                  for why, runs in left_out.items())
                + ": list those seeds in the file, or restore the arm, or move the records away")
        if text not in _WARNED:
            _WARNED.add(text)
            print(text, file=sys.stderr, flush=True)


def load_record(study_or_path, config: str, seed: int, results: Path | None = None) -> dict:
    study = as_study(study_or_path)
    path = result_path(study, config, seed, results)
    if not path.is_file():
        raise StudyError(f"{config} seed {seed} is not recorded in study {study['name']} ({path})")
    return read_record(path)


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
    """The recorded routing-vs-regions analyses: one row per (config, seed, MoE block), with ``bal_excess`` and
    ``position_excess`` beside the recorded ``excess`` (each the trained router's NMI minus the random routers')."""
    rows = [{"config": r["config"], "seed": r["seed"], "block": int(b), **layer}
            for r in iter_records(study_or_path, results) if "regions" in r and (not configs or r["config"] in configs)
            for b, layer in r["regions"].items()]
    if not rows:
        return pd.DataFrame(columns=["config", "seed", "block"])
    table = pd.DataFrame(rows).sort_values(["config", "seed", "block"]).reset_index(drop=True)
    # the excesses over the random routers that claims read besides ``excess`` (class NMI - theirs): the balanced
    # test's (equal loads for the trained router and every draw) and patch position's
    if {"bal_nmi", "bal_random_nmi"} <= set(table):
        table["bal_excess"] = table["bal_nmi"] - table["bal_random_nmi"]
    if {"position_nmi", "random_position_nmi"} <= set(table):
        table["position_excess"] = table["position_nmi"] - table["random_position_nmi"]
    return table


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


def load_refit(study_or_path, configs=None, results: Path | None = None) -> pd.DataFrame:
    """Per (config, seed): every ``densify_finetune`` variant's test and validation accuracy (``<variant>_test``,
    ``<variant>_val``), parameters and GMACs (``<variant>_params``, ``<variant>_gmacs``), the blocks made dense
    (``least``, ``most``) and the fine-tune."""
    rows = []
    for r in iter_records(study_or_path, results):
        if "densify_finetune" not in r or (configs and r["config"] not in configs):
            continue
        d = r["densify_finetune"]
        row = {"config": r["config"], "seed": r["seed"], "least": d["least"], "most": d["most"],
               "epochs": d["finetune"]["epochs"], "lr": d["finetune"]["lr"]}
        for name, v in d["variants"].items():
            row.update({f"{name}_test": v["test_acc"], f"{name}_val": v["val_acc"], f"{name}_params": v["params"],
                        f"{name}_gmacs": v["gmacs"]})
        rows.append(row)
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


def cached_base(study: dict, results: Path | None = None) -> dict | None:
    """The base's scores a study measured before its first run (``_base.json`` beside its records), or None when
    it has not been measured yet; a damaged file is a one-line StudyError."""
    path = Path(results or RESULTS) / study["name"] / "_base.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"{path} (the dense base's cached accuracy) is damaged ({type(err).__name__}); delete "
                         "it and study run measures the base again") from None


def expert_pairs(study: dict, claim: dict, results: Path | None = None) -> tuple[list[float], list[float]]:
    """An ``experts`` claim's two variants (``compare``) at its ``keep``, test accuracy (%) per seed of its
    treatment's records, ordered by seed; a seed missing either variant is left out."""
    source, config = source_of(study, claim["treatment"])
    first, second = claim["compare"]
    metric = source.get("metric", "test_acc")
    pairs = [(expert_value(r, claim["keep"], first, metric), expert_value(r, claim["keep"], second, metric))
             for r in sorted(iter_records(source, results), key=lambda r: r["seed"]) if r["config"] == config]
    pairs = [p for p in pairs if p[0] == p[0] and p[1] == p[1]]
    return [a for a, _ in pairs], [b for _, b in pairs]


def expert_value(record: dict, keep, name: str, metric: str = "test_acc") -> float:
    """One run's test accuracy (%) of an expert-pruning variant, or its ``metric`` (``test_miou``: a segmentation
    study's test mIoU, in points): a method (or ``random``, the mean of its draws) at ``keep`` experts,
    ``<method>_ft`` after the fine-tune, or ``unpruned`` / ``unpruned_ft`` (NaN when missing)."""
    cell = expert_cell(record, keep, name)
    return 100 * cell[metric] if cell else float("nan")


def expert_cell(record: dict, keep, name: str) -> dict | None:
    """One run's recorded scores of an expert-pruning variant (see :func:`expert_value`), or None when missing."""
    ep = record.get("expert_pruning") or {}
    return ep.get(name) if name.startswith("unpruned") else (ep.get(str(keep)) or {}).get(name)


def iou_groups(iou: list) -> tuple[float, float, float]:
    """A scenes model's per-class IoU list -> the mean IoU of the background (class 0), of the classes a transfer
    base was pretrained on (1-5) and of those it never saw (6-10); a class absent from a split (None) is left out
    of its mean (NaN when none is left)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    return mean(iou[:1]), mean(iou[1:6]), mean(iou[6:11])
