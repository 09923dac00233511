"""The Model page's table of what each registered method can prune in the loaded model (issue 14)."""

from __future__ import annotations

import pandas as pd
from torch import nn

from ..families import UNITS, families_of
from ..prune import prunable_by_method

UNIT_TITLES = {
    "blocks": "blocks (depth)",
    "heads": "heads",
    "head_dims": "head dims",
    "mlp": "MLP neurons",
    "embed": "embedding channels",
    "residual": "residual subsets",
}


def units_table(model: nn.Module) -> tuple[list[str], pd.DataFrame]:
    """(the family variants ``model`` is of, one row per method with ✓ under each unit it can prune)."""
    rows = [
        {"method": name, **{UNIT_TITLES[u]: "✓" if u in units else "" for u in UNITS}}
        for name, units in prunable_by_method(model).items()
    ]
    return families_of(model), pd.DataFrame(rows)
