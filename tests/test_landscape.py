"""landscape.py on two tiny distill.py runs: anchors, the orthonormal frame, resuming."""
import json
import math

import pytest
import torch

import distill
import landscape
from common import UserError, distillation_loss, extract_features, linear_probe, normalize

FLAGS = ["--dataset", "fake", "--eval-samples", "60", "--probe-samples", "100", "50", "--batch-size", "64",
         "--epochs", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for alpha in ("1", "1e-10"):
        distill.main(["--dataset", "fake", "--arch", "resnet20", "--out-dim", "128", "--epochs", "1",
                      "--batch-size", "128", "--alpha", alpha, "--probe-samples", "64", "32", "--compile", "none",
                      "--device", "cpu", "--out", str(d / f"a{alpha}")])
    return d


def points(runs):   # the shared view of Fig. 5: teacher, alpha~0 student, alpha=1 student
    return ["teacher:" + str(runs / "a1"), "student:" + str(runs / "a1e-10"), "student:" + str(runs / "a1")]


def test_anchor_grid_points_reproduce_each_checkpoints_own_values(runs, tmp_path):
    # resolution 2 on [0, 1]^2 puts the three anchors on grid points (0,0), (1,0), (0,1); ResNet20 has
    # BN, so each anchor is its checkpoint only with the BN statistics combined like the parameters
    grid = landscape.main(["--points", *points(runs), "--resolution", "2", "--xlim", "0", "1", "--ylim", "0", "1",
                           "--points-per-batch", "4", "--encoder", "--buffers", "interpolate", "--out", str(tmp_path),
                           *FLAGS])
    args = landscape.parse_args(["--points", *points(runs), *FLAGS])
    ckpt = landscape.load_point(points(runs)[0])[1]
    ev = landscape.fixed_data(args, ckpt, torch.device("cpu"))
    teacher = landscape.load_point(points(runs)[0])[2].eval()
    for spec, i in zip(points(runs), [0, 1, 2]):   # grid index of (0,0), (1,0), (0,1), x fastest
        model = landscape.load_point(spec)[2].eval()
        x = normalize(ev["x_eval"], ev["data"])   # 60 images: one batch, as on the grid
        with torch.no_grad():
            kl = distillation_loss(model(x), teacher(x))[1].item()
        f = [extract_features(model.encoder, xs, ev["data"]) for xs in (ev["x_probe_train"], ev["x_probe_test"])]
        probe = linear_probe(f[0], ev["y_probe_train"], f[1], ev["y_probe_test"], 10, epochs=2, batch_size=64)
        # the same weights; only the vmapped forward's kernels differ from a plain one (float32 rounding)
        assert grid["kl"][i].item() == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert grid["probe"][i].item() == probe
    assert grid["kl"][0] < 1e-12 and grid["embed_kl"][0] < 1e-12   # the teacher against itself
    assert grid["done"].all() and torch.isfinite(grid["kl"]).all()
    # --plot redraws from grid.json / landscape.json alone (no checkpoint) and tables the anchors' values
    for f in ("grid.pt", "args.json"):
        (tmp_path / f).unlink()
    landscape.main(["--plot", str(tmp_path), "--out", str(tmp_path / "figs")])
    assert (tmp_path / "figs" / f"{tmp_path.name}.png").stat().st_size > 10_000
    rows = (tmp_path / "figs" / "landscape.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[2] for r in rows] == points(runs)
    for r, i in zip(rows, [0, 1, 2]):
        assert f"| {grid['kl'][i].item():.2e} | {100 * grid['probe'][i].item():.2f} |" in r and "(0)" in r


def test_ortho_frame_preserves_distances_and_centers_on_the_minimum_norm_point(runs, tmp_path):
    landscape.main(["--points", *points(runs), "--frame", "ortho", "--resolution", "2", "--out", str(tmp_path),
                    *FLAGS])
    summary = json.load(open(tmp_path / "landscape.json"))
    c = torch.tensor(summary["anchor_coords"], dtype=torch.float64)
    models = [landscape.load_point(s)[2] for s in points(runs)]
    flat = [torch.cat([p.detach().double().flatten() for p in m.parameters()]) for m in models]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert (c[i] - c[j]).norm().item() == pytest.approx((flat[i] - flat[j]).norm().item(), rel=1e-5)
    # ||p_i||^2 = ||origin||^2 + x_i^2 + y_i^2 with one origin for all three: the origin is orthogonal
    # to the plane, i.e. its minimum-norm point, and ||theta|| contours are circles
    origin_sq = [(f @ f).item() - (ci @ ci).item() for f, ci in zip(flat, c)]
    assert origin_sq[1] == pytest.approx(origin_sq[0], rel=1e-6) and origin_sq[2] == pytest.approx(origin_sq[0], rel=1e-6)
    assert (tmp_path / "landscape.png").stat().st_size > 10_000


def test_killed_grid_resumes_to_the_uninterrupted_result(runs, tmp_path, monkeypatch):
    flags = ["--points", *points(runs), "--resolution", "2", "--points-per-batch", "1", *FLAGS]
    whole = landscape.main([*flags, "--out", str(tmp_path / "a")])
    real, calls = landscape.evaluate_batch, []

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(landscape, "evaluate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        landscape.main([*flags, "--out", str(tmp_path / "b")])
    assert torch.load(tmp_path / "b" / "grid.pt", weights_only=True)["done"].sum() == 2
    monkeypatch.setattr(landscape, "evaluate_batch", real)
    resumed = landscape.main([*flags, "--out", str(tmp_path / "b")])
    for key in ("kl", "probe", "weights", "done"):
        assert torch.equal(resumed[key], whole[key])
    assert not math.isnan(resumed["kl"].sum().item())


def test_coinciding_points_are_a_one_line_error(runs, tmp_path):
    # at alpha=1e-10 the student's init is its teacher to float precision: no plane
    a0 = str(runs / "a1e-10")
    with pytest.raises(UserError, match="same parameters"):
        landscape.main(["--points", "teacher:" + a0, "init:" + a0, "student:" + a0, "--out", str(tmp_path), *FLAGS])


def test_eval_subset_larger_than_the_dataset_names_its_own_flag(runs, tmp_path):
    with pytest.raises(UserError, match="--eval-samples 100000 must be .* at most 510"):
        landscape.main(["--points", *points(runs), "--resolution", "2", "--out", str(tmp_path),
                        *FLAGS, "--eval-samples", "100000"])


def test_views_are_named_as_in_the_paper():
    assert landscape.view_name(["teacher:a", "init:a", "student:a"]) == "non-local view"
    assert landscape.view_name(["teacher:a", "student:b", "student:a"]) == "shared view"
    assert landscape.view_name(["student:a", "teacher:a", "init:a"]) == "plane through student, teacher, init"


def test_interpolated_bn_statistics_stay_finite_off_the_triangle(runs, tmp_path):
    # the ortho window lies mostly outside the three points' triangle: some weights are negative and
    # a combined running_var could be < 0 (NaN KL, and a probe of NaN features reading as chance)
    grid = landscape.main(["--points", *points(runs), "--frame", "ortho", "--resolution", "5",
                           "--buffers", "interpolate", "--out", str(tmp_path), *FLAGS])
    assert (grid["weights"] < 0).any()
    assert torch.isfinite(grid["kl"]).all() and torch.isfinite(grid["probe"]).all()


def test_bn_variances_combine_geometrically_positive_and_exact_at_the_anchors():
    g = torch.Generator().manual_seed(0)
    var = torch.rand(3, 16, generator=g) * 2 + 0.05           # three points' running_var
    mean = torch.randn(3, 16, generator=g)
    w = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [5.85, -4.65, -0.2]], dtype=torch.float64)
    out = landscape.combine_bn_statistics(w, {"bn.running_var": var, "bn.running_mean": mean})
    assert torch.equal(out["bn.running_var"][:3], var) and torch.equal(out["bn.running_mean"][:3], mean)
    assert torch.allclose(out["bn.running_var"][3], (var[0] * var[1]).sqrt())   # the geometric mean
    assert torch.allclose(out["bn.running_mean"][4], 5.85 * mean[0] - 4.65 * mean[1] - 0.2 * mean[2])
    # where the linear combination goes negative (BN would divide by sqrt(eps)), this one stays positive
    assert (5.85 * var[0] - 4.65 * var[1] - 0.2 * var[2] < 0).any() and (out["bn.running_var"][4] > 0).all()
