"""gpu_check.py, the one command that checks a GPU end to end: its small mode runs here (fake data,
stages 1-2 on the CPU), so CI keeps the check working for the day a GPU is at hand."""
import json
import os
import tarfile
import time

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


def test_stage_3_archives_the_run_files_without_checkpoints(tmp_path, monkeypatch):
    check = load_script("gpu_check")
    calls = []

    def fake_distill(cmd, timeout, log):   # what distill.py leaves when the time box cuts it after epoch 10
        run_dir = cmd[cmd.index("--out") + 1]
        calls.append(cmd)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps(dict(step=1960, epoch=10, student_linear=0.4, teacher_linear=0.3, student_knn=0.4)) + "\n")
        with open(os.path.join(run_dir, "last.pt"), "wb") as f:
            f.write(b"weights")
        return "timeout", ""
    monkeypatch.setattr(check, "run_script", fake_distill)
    runs = check.fig1_stage("data", str(tmp_path / "out"), time.time() + 300, str(tmp_path / "work"))
    assert list(runs) == ["vgg11_authors", "vgg11_paper"] and runs["vgg11_authors"]["epoch"] == 10
    assert "--bottleneck" in calls[0] and "authors" in calls[0] and "--bias-decay" in calls[0]
    assert sorted(os.listdir(tmp_path / "out")) == ["runs.tar.gz"]   # logs too in a real run; never checkpoints
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/vgg11_authors/metrics.jsonl" in names and not [n for n in names if n.endswith(".pt")]
