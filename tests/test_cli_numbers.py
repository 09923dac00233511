"""Every CLI command refuses impossible numbers at parse time: exit status 2, one line, no traceback (issue #13).

The commands and their numeric flags are discovered from the argparse parser itself, so a new command or flag is
covered at once: every numeric flag must use a type from :mod:`studio.argtypes` (a bare ``int``/``float`` reads
``nan``, ``-5`` or ``1e20`` as valid), and each is run through :func:`studio.cli.main` with values no flag of its
type may take.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from studio.cli import build_parser, main

# values every flag of a type must refuse ("-inf" is left out: argparse reads it as an unknown option)
IMPOSSIBLE = {
    "positive_int": ["0", "-5", "1e20", "2.5", "nan"],
    "nonnegative_int": ["-5", "1e20", "0.5", "nan"],
    "integer": ["1e20", "nan", "inf"],
    "positive_float": ["0", "-5", "nan", "inf"],
    "nonnegative_float": ["-5", "nan", "inf"],
    "finite_float": ["nan", "inf", "1e999"],
    "fraction": ["-0.5", "1.5", "nan"],
    "float": ["nan", "inf"],  # a method option's bounded float (argtypes.in_range)
    "int": ["1e20", "nan", "2.5"],  # a method option's bounded int
    "json_object": ["[1,2]", "3", '"patch_size=8"', "{bad", '{"x": NaN}'],
}
# commands with no numeric flag at all (listed, so a new one is a decision, not an oversight)
NO_NUMBERS = {"jobs cancel", "jobs dispatch", "jobs list", "jobs status", "plan diff", "plan show"}


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaves(sub, (*path, name))
            return
    yield " ".join(path), parser


COMMANDS = dict(_leaves(build_parser()))


def _numeric(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options read with a ``type=`` other than ``str``: numbers, and JSON objects (``--timm-kwargs``)."""
    return [a for a in parser._actions if a.option_strings and a.type not in (None, str)]


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", type(action.type).__name__)


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for a command's positionals and required options, so only the flag under test is bad."""
    argv: list[str] = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        value = str(a.choices[0]) if a.choices else "x"
        if not a.option_strings and a.nargs != argparse.REMAINDER:
            argv.append(value)
        elif a.option_strings and a.required:
            argv += [a.option_strings[0], value]
    return argv


def _values(a: argparse.Action, value: str) -> list[str]:
    return [value] * (a.nargs if isinstance(a.nargs, int) else 1)


def test_the_parser_has_every_command():
    assert {
        "prune",
        "retrain",
        "bench",
        "analyze sls",
        "analyze importance",
        "jobs start",
        "demo build",
    } <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_numeric_flag_uses_an_argtype(command):
    numeric = _numeric(COMMANDS[command])
    bare = [a.option_strings[0] for a in numeric if a.type in (int, float)]
    assert not bare, f"{command}: {bare} read with a bare int/float; use a type from studio.argtypes"
    assert all(a.type.__module__ == "studio.argtypes" for a in numeric), [_type_name(a) for a in numeric]
    assert bool(numeric) != (command in NO_NUMBERS), f"{command}: update NO_NUMBERS"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_impossible_numbers_in_one_line(command, capsys):
    parser = COMMANDS[command]
    base = [*command.split(), *_required(parser)]
    tried = 0
    for a in _numeric(parser):
        kind = _type_name(a)
        assert kind in IMPOSSIBLE, f"{command} {a.option_strings[0]}: no impossible values listed for {kind}"
        for value in IMPOSSIBLE[kind]:
            with pytest.raises(SystemExit) as e:
                main([*base, a.option_strings[0], *_values(a, value)])
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert e.value.code == 2, (command, a.option_strings, value, err)
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            assert f"argument {'/'.join(a.option_strings)}" in lines[0], (value, err)
            assert "Traceback" not in err
            tried += 1
    assert tried == sum(len(IMPOSSIBLE[_type_name(a)]) for a in _numeric(parser))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["prune", "--method", "magnitude", "--batch-size", "0"],
            "argument --batch-size: must be a positive integer",
        ),
        (["bench", "--repeats", "0"], "argument --repeats: must be a positive integer, not '0'"),
        (["retrain", "--out", "r", "--epochs", "1e20"], "argument --epochs: '1e20' is too large"),
        (["retrain", "--out", "r", "--lr", "nan"], "argument --lr: must be a finite number, not 'nan'"),
        (
            ["retrain", "--out", "r", "--warmup-epochs", "-5"],
            "argument --warmup-epochs: must be a number >= 0",
        ),
        (["info", "--timm-kwargs", "[1,2]"], "argument --timm-kwargs: must be a JSON object"),
        (["prune", "--method", "magnitude", "--calib-batches", "-3"], "argument --calib-batches"),
        (
            ["prune", "--method", "magnitude", "--target-macs", "nan"],
            "argument --target-macs: must be a finite",
        ),
        (["analyze", "sls", "--alpha", "1.5"], "argument --alpha: must be a number from 0 to 1"),
    ],
)
def test_the_cases_of_the_issue(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_valid_numbers_still_parse():
    args = build_parser().parse_args(
        ["retrain", "--out", "r", "--epochs", "3", "--lr", "1e-3", "--warmup-epochs", "0", "--alpha", "0.5"]
    )
    assert (args.epochs, args.lr, args.warmup_epochs, args.alpha) == (3, 1e-3, 0.0, 0.5)
    args = build_parser().parse_args(
        ["bench", "--batch-sizes", "1", "8", "--warmup", "0", "--timm-kwargs", '{"a": 1}']
    )
    assert (args.batch_sizes, args.warmup, args.timm_kwargs) == ([1, 8], 0, {"a": 1})
    assert build_parser().parse_args(["info"]).timm_kwargs == {}  # the default is a fresh dict per parse
