"""``python -m workbench <command>``: the one entry point; each package registers its own subcommands.

* ``train``, ``eval``, ``info``: ``workbench.train.cli``
* ``profile``, ``prune``: ``workbench.analysis.cli``
* ``study``: ``workbench.studies.cli``
* ``bench``: ``workbench.bench.cli``

Usage errors (a bad flag, a bad value, a config that does not validate) exit with code 2 and one line naming the
value and what is allowed; a failed run (missing data, unreadable checkpoint, non-finite loss) exits with 1.  A run
stopped by SIGINT (Ctrl-C) or SIGTERM exits with 128 + the signal's number (130, 143) and one line saying what was
saved and the command that continues it (under torchrun: from the main process only).

Building the parser imports nothing heavy: torch, timm and the command modules are imported inside the command that
needs them (and the bench / profile / study parsers only when that command is asked for), so ``--help`` is quick.

Imports: every package's ``cli`` module (this is the top of the import graph).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys

from .models.args import DEFAULT_MODEL, UsageError, parse_moe_layers  # noqa: F401  (public: workbench.cli.*)
from .train.interrupt import Interrupted

EXTENSIONS = {  # command -> (module with register_cli, one-line help); the module is imported only when used
    "bench": ("workbench.bench.cli", "speed and memory of MoE layers and ViMoE training vs dense equivalents"),
    "profile": ("workbench.analysis.cli", "parameters and activated MACs (per image), dense-equivalent, per block"),
    "prune": ("workbench.analysis.cli", "prune a ViMoE checkpoint: MoE layers to dense, or experts pruned / merged"),
    "card": ("workbench.analysis.cli", "a checkpoint's model card: facts and per-layer routing verdicts (cached)"),
    "study": ("workbench.studies.cli", "run a study (configs x seeds, resumable; here or as cluster jobs), show its "
                                       "status, summary or claims"),
}


def build_parser() -> argparse.ArgumentParser:
    from .train.cli import register_cli

    parser = Parser(prog="python -m workbench", description="ViMoE Workbench")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_cli(sub)
    plain = sub._parser_class
    for name, (module, text) in EXTENSIONS.items():
        if importlib.util.find_spec(module) is not None:
            sub._parser_class = lambda module=module, **kw: _DeferredParser(module=module, **kw)
            sub.add_parser(name, help=text)
    sub._parser_class = plain
    return parser


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): the problem, and where the allowed values are (app.py's
    parser too).  Flags
    must be spelled out: an abbreviation (``--keep-expert`` for ``--keep-experts``) is an error naming the flag, not
    a silent match that a later flag could make ambiguous."""

    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*a, **kw)
        self._seen: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._seen = list(sys.argv[1:] if args is None else args)  # for error(): which flags were not known
        return super().parse_known_args(args, namespace)

    def error(self, message):
        parser = self._command()  # the (sub)command the arguments name: its flags and its --help
        unknown = [a for a in self._seen if a.startswith("--") and a.split("=", 1)[0] not in parser._option_string_actions]
        if unknown and "unrecognized arguments" not in message:  # e.g. a required flag missing because it was mistyped
            message += f"; unrecognized: {' '.join(unknown)}"
        guesses = [(a.split("=", 1)[0], close[0]) for a in unknown
                   if (close := difflib.get_close_matches(a.split("=", 1)[0], parser._option_string_actions, 1, 0.75))]
        if len(guesses) == 1:
            message += f" (did you mean {guesses[0][1]}?)"
        elif guesses:
            message += f" (did you mean {', '.join(f'{right} for {wrong}' for wrong, right in guesses)}?)"
        self.exit(2, f"{self.prog}: error: {message} (see {parser.prog} --help)\n")

    def _command(self) -> argparse.ArgumentParser:
        """The deepest subcommand parser that the seen arguments name (this parser if they name none)."""
        parser = self
        for token in self._seen:
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            if sub is None or token not in sub.choices:
                continue
            parser = sub.choices[token]
            parser = parser.real() if isinstance(parser, _DeferredParser) else parser
        return parser


class _DeferredParser(Parser):
    """A subcommand whose module (bench, flops, study: torch, pandas ...) is imported only when the command runs:
    the first parse imports it, lets its ``register_cli`` build the real parser and hands the arguments over."""

    def __init__(self, *a, module: str, **kw):
        super().__init__(*a, add_help=False, **kw)
        self._module, self._real = module, None

    def real(self) -> argparse.ArgumentParser:
        if self._real is None:
            name = self.prog.rsplit(" ", 1)[-1]
            holder = Parser(prog=self.prog.rsplit(" ", 1)[0])
            importlib.import_module(self._module).register_cli(holder.add_subparsers())
            self._real = holder._subparsers._group_actions[0].choices[name]
        return self._real

    def parse_known_args(self, args=None, namespace=None):
        return self.real().parse_known_args(args, namespace)


def _failures() -> tuple:
    """Exception types of a failed run (exit 1), from the modules that are loaded (none can be raised otherwise)."""
    found = []
    for module, name in (("workbench.train.checkpoint", "CheckpointError"),
                         ("workbench.data.classification", "DatasetNotFound"),
                         ("workbench.train.config", "NonFiniteLoss")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as err:  # SIGINT / SIGTERM: the trainer or the study runner saved and says how to go on
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{parser.prog} {args.command}: {err}\n")
        sys.stderr.flush()
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C where nothing is saved (reading data, evaluating, printing)
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{parser.prog} {args.command}: interrupted (Ctrl-C); nothing was saved\n")
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    except Exception as err:
        failures = _failures()
        if failures and isinstance(err, failures):
            parser.exit(1, f"{parser.prog} {args.command}: error: {err}\n")
        if isinstance(err, (ValueError, FileExistsError)):
            text = str(err)
            if "moe_layers=" in text:
                text += " (on the command line a list is --moe-layers 1,3 or '1 3' or '[1, 3]')"
            parser.exit(2, f"{parser.prog} {args.command}: error: {text}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
