"""imp.py: global magnitude pruning with rewinding (§6, Fig. 8), on the synthetic `fake` data."""
import json

import pytest
import torch
import torch.nn as nn

from common import UserError, load_dataset, make_classifier, make_encoder, recipe_captions
from conftest import load_script

imp = load_script("imp")
QUICK = ["--arch", "resnet20", "--dataset", "fake", "--batch-size", "128", "--device", "cpu"]


def run(out, *flags):
    return imp.main([*QUICK, "--out", str(out), *flags])


def test_density_is_0_8_pow_k_and_pruned_weights_stay_zero(tmp_path):
    rows = run(tmp_path, "--epochs", "1", "--rounds", "3")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for k in range(4):
        saved = torch.load(tmp_path / f"round{k}.pt", weights_only=True)
        masks, weights = saved["masks"], saved["model"]
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == round(total * 0.8 ** k)
        assert rows[k]["density"] == pytest.approx(0.8 ** k, abs=len(masks) / total)
        for name, m in masks.items():   # after a round of SGD steps, pruned entries are exactly zero
            assert torch.count_nonzero(weights[name][~m]) == 0, name
        if k:
            assert int((~torch.cat([m.flatten() for m in masks.values()])).sum()) > 0


def test_default_prunes_conv_and_linear_weights_only(tmp_path):
    model = make_classifier(make_encoder("resnet20"), 10, torch.Generator().manual_seed(0))
    names = imp.prunable(model)
    assert names and all(dict(model.named_parameters())[n].dim() > 1 for n in names)
    assert not any("bn" in n or "bias" in n for n in names) and "fc.weight" in names
    assert len(imp.prunable(model, prune_all=True)) == len(list(model.parameters()))
    run(tmp_path, "--epochs", "1", "--rounds", "1")
    saved = torch.load(tmp_path / "round1.pt", weights_only=True)
    bn_weights = [v for k, v in saved["model"].items() if k.endswith("bn1.weight")]
    assert bn_weights and all(torch.count_nonzero(v) == v.numel() for v in bn_weights)


def test_global_threshold_keeps_more_of_the_large_tensor():
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(10, 10) + 1.0)   # all larger than every weight of layer 1
        model[1].weight.copy_(torch.rand(10, 10))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    new = imp.prune(model, masks, 120)
    assert int(new["0.weight"].sum()) == 100 and int(new["1.weight"].sum()) == 20
    kept = model[1].weight[new["1.weight"]].min()   # and the 20 survivors of layer 1 are its largest
    assert kept >= model[1].weight[~new["1.weight"]].max()


def test_every_round_starts_from_the_rewound_weights(tmp_path, monkeypatch):
    starts = []
    original = imp.supervised_epoch

    def spy(model, optimizer, data, epoch, *a, **kw):
        if epoch == 2:   # the first epoch of a round when rewinding to l = 1
            starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, optimizer, data, epoch, *a, **kw)
    monkeypatch.setattr(imp, "supervised_epoch", spy)
    run(tmp_path, "--epochs", "3", "--rounds", "2", "--rewind-epochs", "1")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert len(starts) == 3
    for k, start in enumerate(starts):
        masks = torch.load(tmp_path / f"round{k}.pt", weights_only=True)["masks"]
        for name, w in state["rewind"].items():
            expected = w * masks[name] if name in masks else w
            assert torch.equal(start[name], expected), (k, name)


def test_killed_run_resumes_at_its_round_and_epoch(tmp_path, monkeypatch):
    flags = ["--epochs", "2", "--rounds", "1"]
    whole = run(tmp_path / "a", *flags)
    calls = {"n": 0}
    original = imp.supervised_epoch

    def dies_on_third_epoch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:   # round 1, epoch 1
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setattr(imp, "supervised_epoch", dies_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *flags)
    monkeypatch.setattr(imp, "supervised_epoch", original)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["round"] == 1
    assert run(tmp_path / "b", *flags) == whole
    assert [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")] == whole


def test_plot_combines_runs(tmp_path):
    run(tmp_path / "r", "--epochs", "1", "--rounds", "1")
    path = imp.main(["--plot", str(tmp_path / "r"), "--out", str(tmp_path)])
    assert (tmp_path / "fig8.png").stat().st_size > 10_000 and path.endswith("fig8.png")
    # fig8.md: every round's accuracy after its last epoch and the best over its epochs (the authors' pick)
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    table = (tmp_path / "fig8.md").read_text().splitlines()
    cells = " | ".join(f"{100 * r['final_acc']:.1f} / {100 * r['best_acc']:.1f}" for r in rows)
    assert table == ["| run | start | 100% | 80% |", "|---|---|---|---|",
                     f"| {tmp_path / 'r'} | init θ_S (random), ℓ=0 | {cells} |"]
    assert recipe_captions([tmp_path / "r"]) == ["resnet20, 1 epochs, all train / all test images"]   # the title's scale
    run(tmp_path / "s", "--epochs", "1", "--rounds", "0", "--n-samples", "200", "--test-samples", "100")
    assert recipe_captions([tmp_path / "s", tmp_path / "s"]) == ["resnet20, 1 epochs, 200 train / 100 test images"]


def test_shrunk_recipe_trains_on_a_balanced_subset_and_tests_on_one_fixed_subset():
    # --n-samples / --test-samples (the CPU-scale recipe in README): class-balanced, the train subset
    # drawn from --seed, the test subset the same for every seed so runs compare on the same images
    subsets = {}
    for seed in (0, 1):
        args = imp.parse_args([*QUICK, "--n-samples", "100", "--test-samples", "50", "--seed", str(seed)])
        _, data = imp.supervised_start(args, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert torch.bincount(data["y_train"]).tolist() == [10] * 10
        assert torch.bincount(data["y_test"]).tolist() == [5] * 10
        subsets[seed] = data
    assert not torch.equal(subsets[0]["x_train"], subsets[1]["x_train"])
    assert torch.equal(subsets[0]["x_test"], subsets[1]["x_test"])
    full = load_dataset("fake", "unused", "cpu")
    assert torch.equal(subsets[0]["mean"], full["mean"])   # normalized with the whole split's statistics
    args = imp.parse_args([*QUICK, "--test-samples", "55"])
    with pytest.raises(UserError, match="--test-samples 55"):
        imp.supervised_start(args, torch.device("cpu"), torch.Generator().manual_seed(0))


def test_fig8_table_shows_last_and_best_epoch_and_pads_a_shorter_run():
    rows = [dict(density=1.0, final_acc=0.5, best_acc=0.625), dict(density=0.8, final_acc=0.25, best_acc=0.5)]
    table = imp.fig8_table([("runs/a", "student", rows), ("runs/b", "random", rows[:1])]).splitlines()
    assert table == ["| run | start | 100% | 80% |", "|---|---|---|---|",
                     "| runs/a | student | 50.0 / 62.5 | 25.0 / 50.0 |", "| runs/b | random | 50.0 / 62.5 | - |"]
