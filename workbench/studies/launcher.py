"""A study's ``launcher:`` block (and the flags that override it): how a cluster scheduler runs each (config, seed)
as a job (``study run --executor submitit``), checked before anything is submitted.

Imports: this package's ``errors``.
"""
from __future__ import annotations

from .errors import StudyError

# ``launcher:``: how a cluster runs each (config, seed) as a job (``study run --executor submitit``; flags override)
LAUNCHER_KEYS = {"partition": "SLURM partition", "time": "time limit per job: minutes, or as sbatch --time (HH:MM:SS, D-HH:MM)",
                 "gpus": "GPUs per job", "cpus": "CPUs per job", "mem_gb": "memory per job in GB",
                 "slurm": "other sbatch options, e.g. {account: lab, qos: normal, constraint: a100}",
                 "setup": "shell lines run before each job, e.g. [module load cuda, source .venv/bin/activate]"}


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
