"""``python -m workbench study run | status | summary | claims | checks | tensorboard``.

Imports: this package's ``spec``, ``runner``, ``records``, ``claims``, ``regime`` and ``cluster``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .claims import contrasts, evaluate_claims, format_claims, format_contrasts, format_summary, summary
from .records import load_results
from .runner import run_study
from .spec import METRICS, StudyError, load_study, parse_shard

RESULTS_HELP = "results folder (default: experiments/results)"


def register_cli(sub) -> None:
    p = sub.add_parser("study", help="run a study (configs x seeds, resumable; here or as cluster jobs), show its "
                                      "status, summary, claims or checks")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="train every (config, seed) not yet recorded")
    r.add_argument("study", help="study YAML file")
    r.add_argument("--only", nargs="+", help="config names to run (default: all)")
    r.add_argument("--seeds", nargs="+", type=int, help="seeds to run (default: the study's)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    r.add_argument("--jobs", type=int, help="parallel single-thread workers on this machine (default 1); with "
                   "--executor submitit, at most this many jobs at once (default: local 1, slurm no limit)")
    r.add_argument("--shard", help="i/N: run only the i-th of N disjoint slices (N machines, one results folder)")
    r.add_argument("--allow-dirty", action="store_true",
                   help="record from a tree with uncommitted changes (throw-away runs only)")
    r.add_argument("--results", metavar="DIR", type=Path,
                   help=RESULTS_HELP + ", e.g. on a cluster's shared file system; runs train in DIR/../runs")
    r.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard event files (default: <results>/<study>/tensorboard/<config>/seed<k>)")
    c = r.add_argument_group("cluster jobs (--executor submitit; flags override the study file's launcher: block)")
    c.add_argument("--executor", choices=("local", "submitit"), default="local",
                   help="local: --jobs workers of this command (default); submitit: each run a scheduler job")
    c.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm (a job array; default) or local (jobs as processes of this machine, no scheduler)")
    c.add_argument("--partition", help="SLURM partition")
    c.add_argument("--time", help="time limit per job: minutes, or HH:MM:SS / D-HH:MM as sbatch --time "
                   "(required for slurm)")
    c.add_argument("--gpus", type=int, help="GPUs per job (default 0)")
    c.add_argument("--cpus", type=int, help="CPUs per job (default 1)")
    c.add_argument("--mem-gb", type=float, help="memory per job in GB")
    c.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="another sbatch option, e.g. account=lab or constraint=a100; repeat for several")
    c.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before each SLURM job, e.g. 'module load cuda'; repeat for several")
    c.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the jobs and report each (default: yes for --cluster local, no for slurm)")
    r.set_defaults(func=_cmd_run)
    t = ssub.add_parser("status", help="each planned run: recorded, queued, running, stopped, failed (with the tail of its "
                                       "log) or not submitted")
    t.add_argument("study")
    t.add_argument("--results", metavar="DIR", help="results folder (default: experiments/results)")
    t.add_argument("--lines", type=int, default=12, help="log lines shown for a failed job (default 12)")
    t.set_defaults(func=_cmd_status)
    b = ssub.add_parser("tensorboard", help="(re)write each recorded run's TensorBoard event files from its record "
                                            "(<results>/<study>/tensorboard/<config>/seed<k>)")
    b.add_argument("study")
    b.add_argument("--results", metavar="DIR", help="results folder (default: experiments/results)")
    b.set_defaults(func=_cmd_tensorboard)
    s = ssub.add_parser("summary", help="per config: mean, seed SD, params, GMACs; then deltas vs the control")
    s.add_argument("study")
    s.add_argument("--json", action="store_true")
    s.add_argument("--results", metavar="DIR", type=Path, help=RESULTS_HELP)
    s.set_defaults(func=_cmd_summary)
    c = ssub.add_parser("claims", help="each pre-registered claim: estimate, 95%% CI, Holm p, verdict (--all: every "
                                       "recorded study's claims, with project-wide Holm and BH verdicts beside)")
    c.add_argument("study", nargs="?", help="study YAML file (or --all)")
    c.add_argument("--all", action="store_true", help="every study file under experiments/studies/ but the pilots")
    c.add_argument("--results", metavar="DIR", type=Path, help=RESULTS_HELP)
    c.set_defaults(func=_cmd_claims)
    k = ssub.add_parser("checks", help="the pre-registered checks that the arms learned (movement, plateau): "
                                       "each config's median, its rule, pass or fail")
    k.add_argument("study")
    k.add_argument("--results", metavar="DIR", type=Path, help=RESULTS_HELP)
    k.add_argument("--by-seed", action="store_true", help="also each run's value behind each median (and, for "
                   "predictions-moved, the raw shares of changed predictions and the control's seed-to-seed shares)")
    k.set_defaults(func=_cmd_checks)


def _slurm_options(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"--slurm {pair!r} is invalid: use KEY=VALUE, e.g. --slurm account=lab")
        out[key.strip()] = value.strip()
    return out


def _cmd_run(a) -> int:
    launcher = {"partition": a.partition, "time": a.time, "gpus": a.gpus, "cpus": a.cpus, "mem_gb": a.mem_gb,
                "slurm": _slurm_options(a.slurm), "setup": a.setup}
    run_study(a.study, a.only, a.seeds, a.device, results=a.results, jobs=a.jobs, shard=parse_shard(a.shard),
              allow_dirty=a.allow_dirty, executor=a.executor, cluster=a.cluster, launcher=launcher, wait=a.wait,
              tensorboard=not a.no_tensorboard)
    return 0


def _cmd_status(args) -> int:
    from .jobstate import format_status, run_costs, run_states
    from .spec import plan

    if args.lines < 0:
        raise StudyError(f"--lines {args.lines} is invalid: use 0 or more")
    study = load_study(args.study)
    rows = run_states(study, plan(study), args.results, args.lines)
    left = any(r["state"] != "recorded" for r in rows)
    print(format_status(study, rows, run_costs(study, args.results) if left else None))
    return 0


def _cmd_tensorboard(args) -> int:
    from ..train.events import write_events
    from .records import iter_records
    from .spec import RESULTS, tensorboard_folder

    study = load_study(args.study)
    n = 0
    for record in iter_records(study, args.results):
        write_events(tensorboard_folder(study, record["config"], record["seed"], args.results), record["history"])
        n += 1
    where = Path(args.results or RESULTS) / study["name"] / "tensorboard"
    print(f"{study['name']}: event files of {n} recorded runs in {where}" + (f"; tensorboard --logdir {where}"
                                                                               if n else ""))
    return 0


def _cmd_claims(args) -> int:
    if args.all:
        if args.study:
            raise StudyError("give a study file or --all, not both")
        from .claims import format_project_claims, project_claims

        table = project_claims(results=args.results)
        print(format_project_claims(table) if len(table) else "no study has recorded runs yet")
        return 0
    if not args.study:
        raise StudyError("name a study file (python -m workbench study claims FILE), or pass --all")
    study = load_study(args.study)
    if not study["claims"]:
        print(f"{study['name']} states no claims")
        return 0
    if load_results(study, args.results).empty:
        print(f"{study['name']}: no runs recorded yet, so no verdicts: python -m workbench study run {args.study}")
        return 0
    table = evaluate_claims(study, args.results)
    from .checks import progress_line

    progress = progress_line(study, args.results)
    if progress:
        print(progress)
    if study.get("checks"):
        from .checks import evaluate_checks, format_checks

        print(format_checks(evaluate_checks(study, args.results)))
    if table.attrs.get("failed_configs"):
        which = (f"the checks {', '.join(table.attrs['failed_checks'])}" if table.attrs.get("failed_checks")
                 else "their studies' checks")
        print(f"VOID: {', '.join(table.attrs['failed_configs'])} failed {which}: the claims that read them have no "
              f"verdict (their estimates below are descriptive)")
    print(format_claims(table))
    # claims on segmentation routing: the blocks each random-router test flags, and claim 3's run rule read from them
    regions = sorted({c["treatment"] for c in study["claims"] if c.get("source") == "regions"
                      and "/" not in c["treatment"]})
    if regions:
        from .regime import regions_premise

        for config in regions:
            print(f"{config}: {regions_premise(study, config, args.results)[2]}")
    return 0


def _cmd_checks(args) -> int:
    from .checks import evaluate_checks, format_checks

    study = load_study(args.study)
    if not study.get("checks"):
        print(f"{study['name']} states no checks")
        return 0
    from .checks import progress_line

    progress = progress_line(study, args.results)
    if progress:
        print(progress)
    print(format_checks(evaluate_checks(study, args.results)))
    if args.by_seed:
        from .checks import checks_by_seed

        table = checks_by_seed(study, args.results)
        print("\nper run (share: of test predictions differing from the same seed's control; seed-to-seed rows: the "
              "control's consecutive seeds, the denominator):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    return 0


def _cmd_summary(args) -> int:
    table = summary(args.study, args.results)
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
        print(format_contrasts(contrasts(args.study, args.results)))
    except StudyError as e:
        print(f"\n(no contrasts: {e})")
    return 0
