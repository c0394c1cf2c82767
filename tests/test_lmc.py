"""lmc.py: linear mode connectivity between supervised copies (§6, Fig. 9), on `fake` data."""
import json

import pytest
import torch

from common import load_dataset, make_classifier, make_encoder, accuracy
from conftest import load_script

lmc = load_script("lmc")
QUICK = ["--arch", "resnet20", "--dataset", "fake", "--batch-size", "64", "--epochs", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmc")
    rows, summary = lmc.main([*QUICK, "--copies", "3", "--points", "5", "--out", str(out)])
    return out, rows, summary


def copy_state(out, i):
    return torch.load(out / f"copy{i}.pt", weights_only=True)["model"]


def model_and_data():
    data = load_dataset("fake", "unused", "cpu")
    g = torch.Generator().manual_seed(0)
    return make_classifier(make_encoder("resnet20", generator=g), 10, g), data


def test_path_endpoints_reproduce_each_copys_own_error(run):
    out, rows, summary = run
    model, data = model_and_data()
    assert [(r["i"], r["j"]) for r in rows] == [(0, 1), (0, 2), (1, 2)]
    for r in rows:   # γ = 0 is copy j, γ = 1 is copy i, bit for bit
        for gamma_end, k in ((0, r["j"]), (-1, r["i"])):
            model.load_state_dict(copy_state(out, k))
            assert r["errors"][gamma_end] == 1 - accuracy(model, data) == summary["copy_errors"][k]
        assert r["barrier"] == max(r["errors"]) - (r["errors"][0] + r["errors"][-1]) / 2
    assert (out / "fig9.png").stat().st_size > 10_000 and (out / "summary.json").exists()


def test_plot_writes_fig9_md_with_every_pairs_barrier_from_the_files(run, tmp_path):
    out, rows, summary = run
    lmc.main(["--plot", str(out), str(out), "--out", str(tmp_path)])
    table = (tmp_path / "fig9.md").read_text().splitlines()
    assert len(table) == 2 + 2   # header, rule, one row per run directory
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:3] == [str(out), "random", "interpolate"]
    assert cells[3] == " / ".join(f"{100 * e:.1f}" for e in summary["copy_errors"])
    assert cells[4] == " / ".join(f"{100 * r['barrier']:.1f} ({r['i']}-{r['j']})" for r in rows)
    assert cells[5] == f"**{100 * summary['barrier_mean']:.1f} ± {100 * summary['barrier_std']:.1f}**"
    assert table[3] == table[2] and (tmp_path / "fig9.png").exists()


def test_copies_differ_by_seed_only(run, tmp_path):
    out, _, _ = run
    a, b = copy_state(out, 0), copy_state(out, 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)   # seeds 0 and 1: other data order / crops
    lmc.main([*QUICK, "--copies", "2", "--points", "2", "--out", str(tmp_path)])
    again = copy_state(tmp_path, 0)   # seed 0 again, from the same start: identical
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_bn_recompute_changes_statistics_and_not_parameters(run):
    out, _, _ = run
    model, data = model_and_data()
    s0, s1 = copy_state(out, 0), copy_state(out, 1)
    lmc.path_errors(model, s0, s1, [0.5], data, bn="recompute", bn_x=data["x_train"][:256])
    state = model.state_dict()
    mid = lmc.interpolate(s0, s1, 0.5)
    params = {n for n, _ in model.named_parameters()}
    for k in params:
        assert torch.equal(state[k], mid[k]), k
    stats = [k for k in state if k.endswith("running_mean")]
    assert stats and all(not torch.allclose(state[k], mid[k]) for k in stats)


def test_barrier_between_a_model_and_itself_is_zero(run):
    out, _, _ = run
    model, data = model_and_data()
    s = copy_state(out, 0)
    errors = lmc.path_errors(model, s, s, [0, 0.25, 0.5, 0.75, 1], data)
    assert lmc.barrier(errors) == 0 and len(set(errors)) == 1


def test_rerun_resumes_from_saved_copies(run, monkeypatch):
    out, rows, _ = run
    monkeypatch.setattr(lmc, "supervised_epoch", lambda *a, **k: pytest.fail("retrained a finished copy"))
    again, _ = lmc.main([*QUICK, "--copies", "3", "--points", "5", "--out", str(out)])
    assert again == rows == [json.loads(line) for line in open(out / "metrics.jsonl")]
