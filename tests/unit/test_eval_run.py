"""`vla-rl eval`'s pure parts: splits as task-id lists, the table rows and their markdown."""

from __future__ import annotations

import pytest

from vla_rl.eval_run import OOD_VARIANTS, markdown_table, split_tasks, table_rows
from vla_rl.evaluation import EvalResult


def test_splits_are_variants_of_the_training_tasks():
    assert split_tasks(["PickCube-v1"], "train") == ["PickCube-v1"]
    vision = split_tasks(["PickCube-v1", "PushCube-v1"], "vision")
    assert vision[0] == "PickCube-v1-vision-light"
    assert len(vision) == 2 * len(OOD_VARIANTS["vision"])
    with pytest.raises(ValueError, match="unknown split"):
        split_tasks(["PickCube-v1"], "weather")


def test_table_rows_and_ood_average():
    def result(wins: int, n: int) -> EvalResult:
        return EvalResult([{"task_id": "T", "success_once": i < wins} for i in range(n)])

    rows = table_rows({"train": result(8, 10), "vision": result(5, 10), "semantic": result(2, 10)})
    assert rows["train"]["success_rate"] == 0.8
    assert rows["ood_average"] == {"success_rate": pytest.approx(0.35), "splits": 2}
    text = markdown_table(rows, "base")
    assert "| train | 80.0% |" in text and "| OOD average | 35.0% |" in text
    assert text.count("\n") == len(rows) + 2
