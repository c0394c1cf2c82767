"""gpu_check.py, the one command that checks a GPU end to end: its small mode runs here (fake data,
stages 1-2 on the CPU), so CI keeps the check working for the day a GPU is at hand."""
import json

import pytest

from conftest import load_script


def test_small_mode_passes_every_stage_and_writes_its_summary(tmp_path):
    check = load_script("gpu_check")
    results = check.main(["--small", "--out", str(tmp_path), "--device", "cpu"])
    assert [r["verdict"] for r in results["stages"]] == ["PASS"] * 8, results["stages"]
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(results))
    summary = (tmp_path / "summary.md").read_text()
    assert "| vgg11 training step, no host sync | PASS |" in summary and "ratios over plain" in summary


def test_a_wrong_loss_fails_its_stage(monkeypatch):
    check = load_script("gpu_check")
    monkeypatch.setattr(check, "distillation_loss", lambda s, t: ((s - t).square().mean(), None, None))
    with pytest.raises(AssertionError, match="loss rel. error"):
        check.loss_against_float64(check.torch.device("cpu"), small=True)
