"""``python -m workbench study run | summary | claims``.

Imports: this package's ``spec``, ``runner``, ``records`` and ``claims``.
"""
from __future__ import annotations

from pathlib import Path

from .claims import contrasts, evaluate_claims, format_claims, format_contrasts, format_summary, summary
from .records import load_results
from .runner import run_study
from .spec import METRICS, StudyError, load_study, parse_shard

RESULTS_HELP = "results folder (default: experiments/results)"


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
    r.add_argument("--results", metavar="DIR", type=Path, help=RESULTS_HELP + "; runs train in DIR/../runs")
    r.set_defaults(func=lambda a: (run_study(a.study, a.only, a.seeds, a.device, results=a.results, jobs=a.jobs,
                                             shard=parse_shard(a.shard), allow_dirty=a.allow_dirty), 0)[1])
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
    k.set_defaults(func=_cmd_checks)


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
    if study.get("checks"):
        from .checks import evaluate_checks, format_checks

        print(format_checks(evaluate_checks(study, args.results)))
        if table.attrs.get("failed_checks"):
            print(f"VOID: {', '.join(table.attrs['failed_configs'])} failed the checks "
                  f"{', '.join(table.attrs['failed_checks'])}: the claims that read them have no verdict (their "
                  f"estimates below are descriptive)")
    print(format_claims(table))
    return 0


def _cmd_checks(args) -> int:
    from .checks import evaluate_checks, format_checks

    study = load_study(args.study)
    if not study.get("checks"):
        print(f"{study['name']} states no checks")
        return 0
    print(format_checks(evaluate_checks(study, args.results)))
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
