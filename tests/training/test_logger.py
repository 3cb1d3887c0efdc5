"""metrics.jsonl rows, resumed runs continuing the file, and TensorBoard being optional with a clear error."""

import importlib.util
import json

import pytest

from chronicals.training.logger import MetricsLogger


def _row(step, loss=1.0):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0}


def test_rows_and_resume_truncation(tmp_path, capsys):
    log = MetricsLogger(tmp_path, total_steps=4, logging_steps=2, progress_bar=False)
    for step in (1, 2, 3):
        log.log(_row(step, loss=float("nan") if step == 3 else 1.0))
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == "nan"  # valid JSON even for NaN
    assert "step      2" in capsys.readouterr().out
    again = MetricsLogger(tmp_path, total_steps=4, initial_step=2, progress_bar=False)  # resumed at step 2
    again.log(_row(3))
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 1.0


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", total_steps=2, enabled=False)
    log.log(_row(1))
    log.close()
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'chronicals\[tensorboard\]'"):
        MetricsLogger(tmp_path, total_steps=2, progress_bar=False, tensorboard=True)
