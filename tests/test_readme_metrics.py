"""The README's metric tables are the results schema's definitions, word for word.

A metric is defined once, in its column of `schemas/results.py` (formula, range, which way is
better); `harmonize schema` prints it and the README shows it. Changing one without the other
fails here, with the table to paste.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.results import GROUND_TRUTH_METRICS, METRIC_COLUMNS, metrics_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("ground_truth", [True, False], ids=["with real", "reference-free"])
def test_readme_holds_the_schemas_metric_table(ground_truth: bool) -> None:
    table = metrics_table(ground_truth)
    assert table in README, (
        f"README.md's metrics table is not the schema's; it should read:\n{table}"
    )


def test_every_metric_is_in_one_table() -> None:
    rows = {
        line.split("`")[1]
        for ground_truth in (True, False)
        for line in metrics_table(ground_truth).splitlines()[2:]
    }
    assert rows == set(METRIC_COLUMNS) and set(GROUND_TRUTH_METRICS) < rows
