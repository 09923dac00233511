"""``python -m studio`` / ``studio``: every engine operation from a shell.

Contract for every command: with ``--json`` stdout carries exactly one JSON object (the result) and progress goes
to stderr; without it, readable text. Errors exit non-zero with a one-line reason, never a traceback.
Commands live in ``studio/commands/*.py``; each module exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from .commands import Output
from .errors import Cancelled, StudioError

COMMAND_MODULES = (
    "studio.commands.model",
    "studio.commands.prune",
    "studio.commands.analyze",
    "studio.commands.jobs",
    "studio.commands.run",
    "studio.commands.importer",
)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2), as every other CLI error.

    argparse prints the whole usage block before its message; with dozens of options that buries the reason.
    Subcommand parsers are of this class too (``add_subparsers`` builds them with ``type(self)``).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="studio", description="Pruning Studio: prune fine-tuned Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        out: Output = args.func(args)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print(
            "cancelled: the work stopped cleanly; resume it with the same command and --resume",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(out.data, default=_default) + "\n")
    else:
        sys.stdout.write(
            (out.text if out.text is not None else json.dumps(out.data, indent=2, default=_default)) + "\n"
        )
    return 0


def _default(obj: object) -> object:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()  # type: ignore[no-any-return]
    if hasattr(obj, "tolist"):
        return obj.tolist()  # type: ignore[no-any-return]
    return str(obj)
