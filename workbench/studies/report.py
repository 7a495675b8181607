"""What the study notebooks show, kept here rather than in cells: both protocols of one study side by side, each
pre-registered claim with its interval and verdict, and a live, deterministic re-run that nbval checks digit for
digit.

    from workbench import report
    report.show_summary("placement")        # per protocol: means, seed SD, params, GMACs, paired deltas
    report.show_claims("placement")         # per protocol: estimate [95% CI], Holm p, verdict
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from .. import studies as st
from .checks import prediction_shares
from .claims import ClaimLines

STUDIES = st.ROOT / "experiments" / "studies"
# study folders under experiments/studies/, in the order the notebooks show them: ``upcycle`` starts from the
# 4x4-patch dense base (its studies refuse a base below 90% test accuracy); ``upcycle_p7`` is the same protocol's
# earlier record, from the 88.68% base (7x7 patches), kept beside it
PROTOCOLS = ("scratch", "upcycle", "upcycle_p7")


def label(protocol: str) -> str:
    """How the notebooks name a study folder: an upcycle folder by its dense base (the base's accuracy is in each
    record, and in the clean-start table)."""
    files = sorted((STUDIES / protocol).glob("*.yaml"))
    base = st.load_study(files[0]).get("base") if files else None
    return f"upcycle protocol, base {Path(base).name}" if base else f"{protocol} protocol"


def study_file(kind: str, protocol: str) -> Path:
    return STUDIES / protocol / f"{kind}.yaml"


def progress(path) -> tuple[int, int]:
    """(recorded, planned) runs of a study."""
    from .records import progress as recorded

    return recorded(path)


def _status(kind: str, protocol: str) -> tuple[Path, int, int]:
    path = study_file(kind, protocol)
    done, planned = progress(path)
    return path, done, planned


def protocols(kind: str) -> list[str]:
    """The protocols that have a study file for ``kind`` (the router study exists under scratch only)."""
    found = [p for p in PROTOCOLS if study_file(kind, p).exists()]
    if not found:
        raise FileNotFoundError(f"no study file {kind}.yaml under {STUDIES}/<protocol>/: use one of "
                                f"{sorted({p.stem for p in STUDIES.glob('*/*.yaml')})}")
    return found


def show_summary(kind: str) -> dict[str, pd.DataFrame]:
    """Print each protocol's summary and its paired contrasts against the control; return the contrasts."""
    out = {}
    for protocol in protocols(kind):
        path, done, planned = _status(kind, protocol)
        s = st.load_study(path)
        print(f"== {label(protocol)}: {s['name']} ({done} of {planned} runs recorded)")
        if not done:
            print("   not recorded yet: python -m workbench study run", path.relative_to(st.ROOT), "\n")
            continue
        print(st.format_summary(st.summary(s), s["metric"]))
        try:
            table = st.contrasts(s)
        except st.StudyError as e:
            print(f"   (no paired contrasts: {e})\n")
            continue
        unit = st.METRICS[s["metric"]].removeprefix("test ")
        print(f"paired by seed against {s['control']} (delta in {unit} points, 95% t-interval, Holm across configs):")
        print(st.format_contrasts(table), "\n")
        out[protocol] = table
    return out


def clean_starts(kind: str) -> pd.DataFrame:
    """Per upcycle study folder and arm: the dense base's test accuracy, every seed's step-0 test accuracy (before
    any fine-tuning) and the largest step-0 logit difference from the base, whether every seed started clean, and
    the final test accuracy: the dense control's row shows whether continuing the base loses accuracy."""
    rows = []
    for protocol in protocols(kind):
        s = st.load_study(study_file(kind, protocol))
        if s["protocol"] != "upcycle":
            continue
        records = list(st.iter_records(s))
        for config in s["configs"]:
            recs = [r for r in records if r["config"] == config]
            if not recs:
                continue
            step0 = [r["step0_test_acc"] for r in recs]
            rows.append({"protocol": protocol, "config": config, "seeds": len(recs),
                         "base_test_acc": recs[0]["base_test_acc"], "step0_min": min(step0), "step0_max": max(step0),
                         "max_logit_diff": max(r["step0_max_logit_diff"] for r in recs),
                         "clean_start": all(r["clean_start"] for r in recs),
                         "final_test_acc": sum(r["test_acc"] for r in recs) / len(recs)})
    return pd.DataFrame(rows)


def _emit(obj) -> None:
    """Display ``obj`` in a notebook (its HTML), print it elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None and hasattr(get_ipython(), "kernel"):
        display(obj)
    else:
        print(repr(obj))


def claims(kind: str, protocol: str) -> pd.DataFrame | None:
    path, done, planned = _status(kind, protocol)
    return st.evaluate_claims(path) if done else None


def show_claims(kind: str) -> dict[str, pd.DataFrame]:
    """Print every pre-registered claim of both protocols with its estimate, interval and verdict."""
    out = {}
    for protocol in protocols(kind):
        path, done, planned = _status(kind, protocol)
        print(f"== {label(protocol)} ({done} of {planned} runs recorded)")
        if done < planned:
            print(f"   incomplete: the verdicts below use the {done} recorded runs" if done else
                  "   no verdicts: not recorded yet")
        if not done:
            print()
            continue
        table = st.evaluate_claims(path)
        _emit(ClaimLines(table))
        out[protocol] = table
    return out


def verdict_counts(tables: dict[str, pd.DataFrame]) -> str:
    parts = []
    for protocol, t in tables.items():
        counts = t["verdict"].value_counts()
        parts.append(f"{protocol}: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("agrees", "disagrees",
                                                                                       "inconclusive")))
    return "; ".join(parts)


def half_widths(tables: dict[str, pd.DataFrame], kinds=("paired",)) -> str:
    """The widest 95% interval among the accuracy claims of each protocol (the brief asks <= 0.5 points each side)."""
    parts = []
    for protocol, t in tables.items():
        t = t[t["kind"].isin(kinds)]
        if len(t):
            widest = ((t["high"] - t["low"]) / 2).max()
            parts.append(f"{protocol}: widest half-width {widest:.3f} points over {len(t)} accuracy claims")
    return "; ".join(parts)


def live_slice(kind: str, protocol: str, config: str, seed: int = 0, *, train_subset: int = 2000,
               epochs: int = 1) -> dict:
    """A fresh, deterministic run of one config at a tiny budget (one thread, CPU), for nbval to compare exactly:
    the same code on the same machine kind gives the same digits, so a change that moves results shows here."""
    import torch

    s = st.load_study(study_file(kind, protocol))
    s = {**s, "name": f"{s['name']}-slice", "train": {**s["train"], "train_subset": train_subset, "epochs": epochs},
         "analysis": {}}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        record = st.run_one(s, config, seed, device="cpu", results=Path(tmp) / "results", threads=1,
                            allow_dirty=True)
    torch.set_num_threads(threads)
    return record


def show_claim_kinds(kind: str, claim_kinds=None, ids=None) -> dict[str, pd.DataFrame]:
    """Print only the claims of the given kinds (e.g. the routing or pruning claims of the placement studies)
    and/or the given claim ids."""
    out = {}
    for protocol in protocols(kind):
        t = claims(kind, protocol)
        if t is None:
            print(f"{protocol}: not recorded yet")
            continue
        if claim_kinds is not None:
            t = t[t["kind"].isin(list(claim_kinds))]
        if ids is not None:
            t = t[t["id"].isin(list(ids))]
        print(f"== {label(protocol)}")
        _emit(ClaimLines(t))
        out[protocol] = t
    return out


def pilot_vs_confirmation(pilots=("placement", "shared_expert"), confirmation: str = "confirm",
                          protocol: str = "scratch") -> pd.DataFrame:
    """Each claim of the confirmatory study beside the same claim (same id) of the pilot studies it repeats: the
    pilot's estimate, interval and verdict on its seeds, then the confirmation's on its fresh seeds."""
    confirm = claims(confirmation, protocol)
    if confirm is None:
        raise FileNotFoundError(f"{confirmation} ({protocol}) has no recorded runs yet")
    pilot = pd.concat([t for k in pilots if (t := claims(k, protocol)) is not None])
    rows = []
    for r in confirm.itertuples():
        p = pilot[pilot["id"] == r.id]
        row = {"claim": r.id, "contrast": r.contrast}
        if len(p):
            q = p.iloc[0]
            row.update(pilot_n=int(q["n"]), pilot=f"{q['estimate']:+.3f} [{q['low']:+.3f}, {q['high']:+.3f}]",
                       pilot_verdict=q["verdict"])
        row.update(n=int(r.n), confirmation=f"{r.estimate:+.3f} [{r.low:+.3f}, {r.high:+.3f}]",
                   half_width=(r.high - r.low) / 2, verdict=r.verdict)
        rows.append(row)
    table = pd.DataFrame(rows)
    if "pilot_n" in table:
        table["pilot_n"] = table["pilot_n"].astype("Int64")
    return table


def repeated_claim(claim_id: str, kinds=("confirm", "confirm_shared"), protocol: str = "scratch") -> pd.DataFrame:
    """One claim tested again in a later study (e.g. a confirmation whose interval came out too wide): each study's
    estimate, interval, own Holm p and verdict, then the studies as one Holm family (each adjusted p adjusted again
    across the repeats) and its verdict, the one to read (a repeat must not raise the chance of a false 'agrees');
    a void study's stays void.  Studies with no records yet are left out."""
    from ..analysis.stats import holm, verdict

    rows = []
    for kind in kinds:
        table = claims(kind, protocol)
        if table is None:
            continue
        hit = table[table["id"] == claim_id]
        if not len(hit):
            raise KeyError(f"{kind} ({protocol}) has no claim {claim_id!r}: its claims are {table['id'].tolist()}")
        r = hit.iloc[0]
        rows.append({"study": kind, "contrast": r["contrast"], "n": int(r["n"]), "estimate": r["estimate"],
                     "low": r["low"], "high": r["high"], "half_width": (r["high"] - r["low"]) / 2,
                     "p_holm": r["p_holm"], "verdict": r["verdict"], "expect": r["expect"], "margin": r["margin"]})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_family"] = holm(table["p_holm"].fillna(1.0))
        table["family_verdict"] = ["void" if r.verdict == "void" else verdict(r.low, r.high, r.p_family, r.expect,
                                                                               r.margin) for r in table.itertuples()]
    return table


def gap_by_epoch(kind: str, protocol: str, treatment: str, control: str) -> pd.DataFrame:
    """The paired difference (points of test accuracy) between two arms after every epoch, over the seeds both
    recorded: does a gap close or widen as training goes on?"""
    from ..analysis.stats import paired

    s = st.load_study(study_file(kind, protocol))
    src = {c: st.source_of(s, c) for c in (treatment, control)}  # either may be another study's: "study/config"
    seeds = [k for k in s["seeds"] if all(st.result_path(*src[c], k).exists() for c in src)]
    if len(seeds) < 2:
        raise FileNotFoundError(f"{kind} ({protocol}): fewer than two seeds recorded for both {treatment} and {control}")
    hist = {c: [[h.get("test_acc") for h in st.load_record(*src[c], k)["history"]] for k in seeds] for c in src}
    rows = []
    for e in range(len(hist[treatment][0])):
        a = pd.Series([h[e] for h in hist[treatment]], index=seeds) * 100
        b = pd.Series([h[e] for h in hist[control]], index=seeds) * 100
        d = paired(a, b)
        rows.append({"epoch": e + 1, "n": len(seeds), f"{treatment} acc": a.mean() / 100,
                     f"{control} acc": b.mean() / 100, "delta pts": d.mean, "low": d.low, "high": d.high})
    return pd.DataFrame(rows)


def prediction_changes(kind: str, protocol: str) -> pd.DataFrame:
    """Per arm, over seeds: the share of test images whose predicted class differs from the control's prediction on
    the same seed (``vs_control``), and the same between two seeds of the control itself (``control_seed_to_seed``,
    consecutive seed pairs): how much an arm's fine-tune changed the model beyond seed noise (the numbers the
    ``prediction_change`` check reads)."""
    s = st.load_study(study_file(kind, protocol))
    arms, noise = prediction_shares(s)
    seed_to_seed = round(sum(noise.values()) / len(noise), 5) if noise else float("nan")
    rows = []
    for config in s["configs"]:
        diffs = list(arms.get(config, {}).values())
        if diffs:
            rows.append({"config": config, "seeds": len(diffs), "vs_control": round(sum(diffs) / len(diffs), 5),
                         "vs_control_max": round(max(diffs), 5), "control_seed_to_seed": seed_to_seed})
    return pd.DataFrame(rows)


def pruning_bounds(kind: str, protocol: str, config: str = "all") -> pd.DataFrame:
    """What any choice of layers could have scored, in test-accuracy points, paired by seed (95% t-intervals): the
    best subset chosen in hindsight on the test set against the mean of every subset (the most a perfect choice
    could beat chance by), and the worst subset against the unpruned model (the most any choice could lose).  A
    pruning claim whose verdict these bounds already fix cannot tell a good selection rule from a bad one."""
    from ..analysis.stats import paired

    pr = st.load_pruning(study_file(kind, protocol), [config])
    if pr.empty:
        return pd.DataFrame()
    pr = pr.sort_values("seed")
    best, mean, worst, full = (100 * pr[c].to_numpy() for c in ("best_test", "all_mean_test", "worst_test",
                                                                  "full_test"))
    out = []
    for name, a, b in (("best subset (hindsight, test) vs all-subsets mean", best, mean),
                       ("worst subset vs unpruned", worst, full)):
        d = paired(a, b)
        out.append({"contrast": name, "n": len(a), "delta pts": round(d.mean, 3), "low": round(d.low, 3),
                    "high": round(d.high, 3)})
    return pd.DataFrame(out)


def init_vs_trained(kind: str, protocol: str, config: str = "all") -> dict:
    """Upcycled runs: did training move the routers' class alignment?  Over (seed, block): the largest and mean
    |trained NMI - init NMI| on the same inputs, and the correlation between the init router's excess over the
    random routers (init NMI - random mean) and the trained router's recorded excess.  A correlation near 1 with
    small differences means the specialisation test scores where the random init fell, not what was learned."""
    import numpy as np

    s = st.load_study(study_file(kind, protocol))
    init_x, trained_x, moved = [], [], []
    for r in st.iter_records(s):
        if r["config"] != config or "router_init" not in r:
            continue
        for b, v in r["router_init"].items():
            random_nmi = r["routing"][b]["random_nmi"]
            init_x.append(v["init_nmi"] - random_nmi)
            trained_x.append(r["routing"][b]["excess"])
            moved.append(abs(v["trained_nmi"] - v["init_nmi"]))
    if not moved:
        return {}
    return {"pairs": len(moved), "max_abs_nmi_change": round(max(moved), 4),
            "mean_abs_nmi_change": round(float(np.mean(moved)), 4),
            "corr_init_vs_trained_excess": round(float(np.corrcoef(init_x, trained_x)[0, 1]), 3)}


def movement_table(kind: str, protocol: str, config: str = "all") -> pd.DataFrame:
    """Upcycled runs, per MoE block, mean over seeds: how far the routed experts moved apart from the copies they
    started as (``expert_spread``), how far the router moved from its init (``router_shift``), and the class NMI
    of the init router vs the trained router on the same inputs.  Empty for records made before these were kept."""
    s = st.load_study(study_file(kind, protocol))
    rows = [{"seed": r["seed"], "block": int(b), "expert_spread": r["expert_spread"][b], **r["router_init"][b]}
            for r in st.iter_records(s) if r["config"] == config and "router_init" in r for b in r["router_init"]]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).groupby("block").agg(
        seeds=("seed", "nunique"), expert_spread=("expert_spread", "mean"), router_shift=("router_shift", "mean"),
        init_nmi=("init_nmi", "mean"), trained_nmi=("trained_nmi", "mean")).round(4)


def specialisation_table(kind: str, protocol: str, configs=None) -> pd.DataFrame:
    """Per config and MoE block, over seeds: the class NMI of the trained routers' own choices on the random-router
    test's inputs (``router_nmi`` = random mean + excess), the random routers' mean, the excess, and in how many
    seeds the layer beat the random routers (Holm).  For experts-choose the router's choice is the expert a token
    prefers; which experts take it also depends on the other tokens of its image."""
    r = st.load_routing(study_file(kind, protocol), configs)
    if r.empty:
        return pd.DataFrame()
    r = r.assign(router_nmi=r["random_nmi"] + r["excess"])
    return r.groupby(["config", "block"]).agg(
        seeds=("seed", "nunique"), router_nmi=("router_nmi", "mean"), random_nmi=("random_nmi", "mean"),
        excess=("excess", "mean"), specialised=("specialised", "sum")).round(4)


def region_table(kind: str, protocol: str, configs=None) -> pd.DataFrame:
    """Routing vs ground-truth regions (segmentation studies), per config and MoE block, mean over seeds: each NMI
    beside its random-router mean, AMI, and in how many seeds the class NMI beat the random routers (Holm)."""
    r = st.load_regions(study_file(kind, protocol), configs)
    if r.empty:
        return pd.DataFrame()
    cols = {"seeds": ("seed", "nunique"), "nmi": ("nmi", "mean"), "random_nmi": ("random_nmi", "mean"),
            "ami": ("ami", "mean"), "specialised": ("specialised", "sum"), "object_nmi": ("object_nmi", "mean"),
            "random_object_nmi": ("random_object_nmi", "mean"), "object_only_nmi": ("object_only_nmi", "mean"),
            "random_object_only_nmi": ("random_object_only_nmi", "mean"), "interior_nmi": ("interior_nmi", "mean"),
            "random_interior_nmi": ("random_interior_nmi", "mean"), "boundary_nmi": ("boundary_nmi", "mean"),
            "random_boundary_nmi": ("random_boundary_nmi", "mean"), "position_nmi": ("position_nmi", "mean"),
            "random_position_nmi": ("random_position_nmi", "mean")}
    return r.groupby(["config", "block"]).agg(**cols).round(4)


def scene_rows(model, n: int = 4) -> list[dict]:
    """For :func:`workbench.viz.segmentation_panels`: the first ``n`` fixed test scenes with their ground truth,
    the model's prediction and each MoE block's expert map."""
    from ..data.classification import normalise
    from ..analysis.routing import run_with_routing
    from ..data.scenes import example_scenes

    images, masks = example_scenes(n)
    logits, cache = run_with_routing(model, normalise(images, model.pretrained_cfg["mean"],
                                                      model.pretrained_cfg["std"]))
    pred = logits.argmax(1)
    return [{"image": images[i, 0].numpy(), "ground truth": masks[i].numpy(), "prediction": pred[i].numpy(),
             **{f"block {b}": cache[b].top1()[i].numpy() for b in cache.layers()}} for i in range(n)]


def arm_costs(kind: str, protocol: str = "scratch", batch: int | None = None) -> pd.DataFrame:
    """Activated GMACs per image of every arm and of the controls its paired claims name, profiled afresh at the
    training batch (``batch``, default the study's: experts-choose over the whole batch costs what it costs at the
    batch it runs at; top-k, per-image experts-choose and Soft MoE do not depend on it), and each arm's ratio to its
    claim's control."""
    import timm

    from ..analysis.flops import profile

    s = st.load_study(study_file(kind, protocol))
    batch = batch or s["train"].get("batch_size", 128)

    def gmacs(name: str) -> float:
        source, config = st.source_of(s, name)
        kwargs, _ = st.arm_model_kwargs(source, config)
        return profile(timm.create_model(source["model"], **kwargs), batch=batch).macs / 1e9

    controls = {c["treatment"]: c.get("control", s["control"]) for c in s["claims"]
                if c["kind"] == "paired" and c.get("control") != "step0"}
    rows = []
    for config in s["configs"]:
        own, control = gmacs(config), controls.get(config)
        rows.append({"config": config, "gmacs": own, "control": control,
                     "control_gmacs": gmacs(control) if control else float("nan")})
    table = pd.DataFrame(rows)
    table["ratio"] = table["gmacs"] / table["control_gmacs"]
    return table.round(5)


def _classification_pilots() -> list[dict]:  # a segmentation pilot (metric test_miou) is notebook 06's
    return [s for s in map(st.load_study, sorted((STUDIES / "pilots").glob("*.yaml"))) if s["metric"] == "test_acc"]

def pilots() -> pd.DataFrame:
    """The classification regime pilots (``experiments/studies/pilots/``), one row per recorded run: final test and
    validation accuracy, the validation points gained over the last third of the epochs (the plateau rule), and how
    far an upcycled arm moved (median block: expert spread, router shift, router class NMI moved from its init)."""
    from .checks import run_metric
    rows = []
    for s in _classification_pilots():
        for r in st.iter_records(s):
            rows.append({"pilot": s["name"], "config": r["config"], "seed": r["seed"],
                         "epochs": len(r["history"]), "test_acc": r["test_acc"], "val_acc": r["val_acc"],
                         "late_gain_pts": round(run_metric(r, "late_gain"), 3),
                         **{m: round(run_metric(r, m), 4) for m in ("expert_spread", "router_shift",
                                                                    "router_nmi_moved")}})
    return pd.DataFrame(rows)


def pilot_curves() -> pd.DataFrame:
    """Validation (and test) accuracy by epoch of every classification pilot: a row per (pilot, config, seed, epoch)."""
    rows = []
    for s in _classification_pilots():
        for r in st.iter_records(s):
            for h in r["history"]:
                rows.append({"pilot": s["name"], "config": r["config"], "seed": r["seed"], "epoch": h["epoch"],
                             "val_acc": h.get("val_acc"), "test_acc": h.get("test_acc")})
    return pd.DataFrame(rows)
