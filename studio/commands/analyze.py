"""CLI: ``analyze <name>``; each analysis lives in its own module exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib

ANALYSIS_MODULES = (
    "studio.commands.analyze_sls",
    "studio.commands.analyze_importance",
    "studio.commands.analyze_benefit",
    "studio.commands.analyze_sensitivity",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="per-layer separability (sls), importance, block benefit, sensitivity")
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name in ANALYSIS_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(asub)
