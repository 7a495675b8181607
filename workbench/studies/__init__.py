"""Studies: configs x seeds written in a YAML file with their claims before any run, run under a protocol
(scratch or upcycle), recorded with provenance, and judged.

One file, one job, in the order a study flows:
``spec`` (read and check a study file, plan its runs) -> ``run`` (one (config, seed): train, check its clean start,
record) with ``analyse`` (what the analysis block asks of a trained run; ``refit``: densify, then fine-tune) -> ``runner`` (every run not yet recorded:
local workers or a shard; where executors plug in) -> ``records`` (read records as tables) -> ``claims`` (summary,
contrasts, each claim's interval and verdict) with ``checks`` (did the arms learn: movement, plateau; a study
failing one is void), ``pruning`` (expert-level pruning and densify-then-fine-tune over seeds) and ``regime`` (the regime studies' views) ->
``report`` (what the notebooks show) and ``cli``
(``python -m workbench study``).

Imports: every package below it (data, models, train, analysis); nothing imports it but the top (cli, notebooks).
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "StudyError": "spec", "load_study": "spec", "plan": "spec", "parse_shard": "spec", "result_path": "spec",
    "arm_model_kwargs": "spec", "arm_spec": "spec", "as_study": "spec", "ROOT": "spec", "RESULTS": "spec",
    "RUNS": "spec", "METRICS": "spec", "PROTOCOLS": "spec", "CLAIM_KINDS": "spec",
    "run_one": "run", "base_accuracy": "run", "base_fingerprint": "run", "check_clean_start": "run",
    "train_config": "run", "analyse_run": "analyse", "prune_subsets": "analyse", "predict": "analyse",
    "run_study": "runner", "iter_records": "records", "load_record": "records", "load_results": "records",
    "load_routing": "records", "load_regions": "records", "load_pruning": "records", "routing_tables": "records",
    "load_refit": "records", "densify_finetune": "refit",
    "config_values": "records", "source_of": "records", "referenced": "records",
    "summary": "claims", "contrasts": "claims", "evaluate_claims": "claims", "seeds_for_half_width": "claims",
    "format_claims": "claims", "format_summary": "claims", "format_contrasts": "claims",
    "project_claims": "claims", "evaluate_checks": "checks", "study_is_void": "checks",
    "expert_pruning_table": "pruning", "refit_table": "pruning", "placement_ranking": "pruning", "gain_kept": "pruning",
    "picks_table": "pruning"})
