"""distill.py end to end on the synthetic `fake` dataset: the paper's claims about the setup (§4),
the run directory it writes, resuming, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import distill
from common import UserError, load_checkpoint, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "fake", "--batch-size", "64", "--probe-every", "1", "--probe-samples", "256", "128",
        "--precision", "fp32", "--device", "cpu", "--compile", "none"]   # compiling (the default): once, below
# fp32: the authors' numerics, whose tolerances these tests state; the CPU's bf16 default: test_cpu_defaults.py


def run(out, *flags):
    return distill.main([*FAST, "--out", str(out), *flags])


def cli(*flags):
    return subprocess.run([sys.executable, "distill.py", *flags], cwd=ROOT, capture_output=True, text=True)


def test_student_escapes_float_identical_teacher(tmp_path):
    # VGG11 has no norm layers: at alpha=1e-10 the student computes its teacher's function to float
    # precision, and only rounding residue, amplified by Adam, moves it.
    metrics = run(tmp_path, "--arch", "vgg11", "--alpha", "1e-10", "--epochs", "1")
    start, end = metrics
    assert start["dist_from_init"] == 0 and start["kl"] < 1e-12
    assert end["dist_from_init"] > 1e-3 and end["kl"] > 1e-9
    assert end["teacher_entropy"] == pytest.approx(11.09, abs=0.01)   # ~ln 2^16: a near-uniform teacher


def test_teacher_is_frozen_and_its_bn_stats_stay_at_identity(tmp_path):
    run(tmp_path, "--arch", "resnet20", "--out-dim", "1024", "--epochs", "1")
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    fresh = make_model("resnet20", out_dim=1024, generator=torch.Generator().manual_seed(0)).state_dict()
    assert ckpt["teacher"].keys() == fresh.keys()
    for k, v in fresh.items():
        assert torch.equal(ckpt["teacher"][k], v), k
    assert torch.count_nonzero(ckpt["teacher"]["encoder.1.running_mean"]) == 0
    assert torch.all(ckpt["teacher"]["encoder.1.running_var"] == 1)
    # the student, in train mode, did update its own BN statistics
    assert torch.count_nonzero(ckpt["student"]["encoder.1.running_mean"]) > 0


def test_run_directory_has_args_metrics_checkpoints_and_figure(tmp_path):
    metrics = run(tmp_path, "--arch", "resnet20", "--out-dim", "512", "--epochs", "2", "--alpha", "0.3")
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["alpha"] == 0.3 and args["arch"] == "resnet20" and args["bottleneck"] == "011110"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == metrics and [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["step"] for r in rows] == [0, 8, 16]   # 512 images / 64, last partial batch kept
    for key in ["ce", "kl", "teacher_entropy", "dist_from_init", "student_linear", "student_knn",
                "teacher_linear", "teacher_knn"]:
        assert all(isinstance(r[key], float) for r in rows), key
    assert 0 <= rows[0]["input_linear"] <= 1 and "input_knn" in rows[0] and "input_knn" not in rows[1]
    assert rows[0]["dist_from_init"] == 0 < rows[1]["dist_from_init"] < rows[2]["dist_from_init"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["best"] == max(r["student_linear"] for r in rows)
    assert (tmp_path / "fig1.png").stat().st_size > 10_000


def test_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    flags = ["--arch", "resnet20", "--out-dim", "256"]
    whole = run(tmp_path / "a", *flags, "--epochs", "2")
    run(tmp_path / "b", *flags, "--epochs", "1")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:   # a line the "killed" run wrote past last.pt
        f.write(json.dumps(dict(epoch=2, student_linear=0.99)) + "\n")
    resumed = run(tmp_path / "b", *flags, "--epochs", "2")
    assert resumed == whole
    a, b = (load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab")
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])


def test_compiled_loss_recomputed_teacher_and_channels_last_give_the_same_run(tmp_path):
    # alpha 0.5: at 1e-10 the escape from the teacher feeds on rounding residue, which any change
    # of kernel reorders; away from the teacher the trajectories agree to float tolerance
    flags = ["--arch", "vgg11", "--out-dim", "256", "--epochs", "1", "--probe-samples", "128", "64", "--alpha", "0.5"]
    plain = run(tmp_path / "a", *flags)
    fast = distill.main([*FAST[:-2], "--out", str(tmp_path / "b"), *flags])   # the defaults: compiled loss
    slow = run(tmp_path / "c", *flags, "--recompute-teacher")
    nhwc = run(tmp_path / "d", *flags, "--channels-last")
    for other in (fast, slow, nhwc):
        for key in ("ce", "kl", "dist_from_init"):
            assert other[-1][key] == pytest.approx(plain[-1][key], rel=1e-3)


def test_torchrun_two_ranks_match_one_process(tmp_path):
    # batch 45 on 512 images: every batch splits 23/22 and the last one (17) 9/8, so this also
    # checks that the per-rank losses are weighted back into the global batch mean
    flags = ["--arch", "vgg11", "--out-dim", "256", "--epochs", "2", "--batch-size", "45", "--probe-every", "2",
             "--alpha", "0.5", *FAST[6:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "distill.py", "--dataset", "fake", "--out", str(tmp_path / "one"),
                          *flags], cwd=ROOT, capture_output=True, text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "distill.py", "--dataset", "fake", "--out", str(tmp_path / "two"), *flags],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    rows = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert [r["epoch"] for r in rows[1]] == [0, 2]   # rank 0 alone writes
    for a, b in zip(*rows):
        for key in ("ce", "kl", "dist_from_init", "teacher_entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4)
        for key in a:   # same features: the teacher's and the input's probes agree exactly
            if key.startswith(("teacher_", "input_")) and key.endswith(("linear", "linear_std", "knn", "knn_cos")):
                assert b[key] == a[key]
            elif key.startswith("teacher_"):   # representation stats: one 512-image forward per process
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    a, b = (load_checkpoint(str(tmp_path / d / "last.pt"))["student"] for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)   # 2 epochs of fp32 reduction-order noise (weights ~0.02)


@pytest.mark.parametrize("arch,calls", [("resnet50", 1 + 3 * 16), ("resnet18", 1 + 2 * 8), ("vgg11", 8)])
def test_dead_relu_is_reported_per_relu_call(arch, calls):
    # torchvision's blocks apply one nn.ReLU module several times (Bottleneck: to 64-, 64- and
    # 256-wide tensors); the diagnostics count each call, as the run's metrics rows report them
    model = make_model(arch, out_dim=16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stats = distill.representation_stats(model, x, None)   # float inputs are used as they are
    assert len(stats["dead_relu"]) == calls and all(0 <= f <= 1 for f in stats["dead_relu"])
    assert stats["code_std"] > 0 and stats["embed_norm"] > 0


def test_step_zero_loss_runs_in_chunks_and_equals_the_one_batch_loss():
    # one 2048-image forward of ResNet50 held ~9 GB and OOM-killed Table 5's run at step 0
    teacher, student = (make_model("resnet20", out_dim=64, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    teacher.eval().requires_grad_(False)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))   # float: used as it is
    sizes = []
    student.register_forward_pre_hook(lambda m, inputs: sizes.append(len(inputs[0])))
    got = distill.initial_losses(student, teacher, x, None, "cpu", chunk=16)
    assert sizes == [16, 16, 8]
    with torch.no_grad():
        ce, kl, entropy = (v.item() for v in distill.distillation_loss(student(x), teacher(x)))
    assert got == pytest.approx(dict(ce=ce, kl=kl, teacher_entropy=entropy), rel=1e-5) and got["kl"] > 0


def test_restart_makes_the_trained_student_the_teacher(tmp_path):
    flags = ["--arch", "resnet20", "--out-dim", "256", "--epochs", "1"]
    run(tmp_path / "first", *flags)
    run(tmp_path / "second", *flags, "--teacher-ckpt", str(tmp_path / "first" / "last.pt"))
    first, second = (load_checkpoint(str(tmp_path / d / "last.pt")) for d in ["first", "second"])
    for k, v in first["student"].items():   # weights and buffers (App. D.1)
        assert torch.equal(second["teacher"][k], v), k


def test_gaussian_inputs_distill_and_probe_on_clean_data(tmp_path):
    metrics = run(tmp_path, "--arch", "resnet20", "--out-dim", "256", "--epochs", "1",
                  "--dataset", "gaussian", "--probe-dataset", "fake", "--n-samples", "128")
    assert metrics[1]["step"] == 2 and metrics[1]["dist_from_init"] > 0


def test_nonfinite_loss_stops_the_run_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(UserError, match="non-finite"):
        run(tmp_path, "--arch", "resnet20", "--out-dim", "256", "--epochs", "1", "--lr", "1e30")
    assert load_checkpoint(str(tmp_path / "last.pt"))["epoch"] == 0


@pytest.mark.parametrize("flags,message", [
    (["--arch", "alexnet"], "unknown --arch 'alexnet'; choose from vgg11"),
    (["--dataset", "mnist"], "unknown --dataset 'mnist'; choose from cifar10"),
    (["--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--bottleneck", "0111"], "bad --bottleneck"),
    (["--dataset", "imagefolder", "--data-root", "/nonexistent"], "ROOT/train/<class>"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, flags, message):
    r = cli(*flags, "--out", str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_checkpoints_are_refused_and_never_overwritten(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "last.pt").write_bytes(b"garbage")
    r = cli(*FAST, "--arch", "resnet20", "--out", str(tmp_path / "corrupt"))
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "corrupt" / "last.pt").read_bytes() == b"garbage"

    run(tmp_path / "good", "--arch", "resnet20", "--out-dim", "256", "--epochs", "1")
    before = (tmp_path / "good" / "last.pt").read_bytes()
    r = cli(*FAST, "--arch", "resnet20", "--out-dim", "256", "--epochs", "1", "--alpha", "0.5",
            "--out", str(tmp_path / "good"))   # same --out, another experiment
    assert r.returncode == 2 and "--alpha 1e-10" in r.stderr
    r = cli(*FAST, "--arch", "vgg11", "--out-dim", "256", "--out", str(tmp_path / "other"),
            "--teacher-ckpt", str(tmp_path / "good" / "last.pt"))
    assert r.returncode == 2 and "teacher-ckpt" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "good" / "last.pt").read_bytes() == before


def fake_run(d, student_linear, **changes):
    """A finished run directory as distill.py leaves it, with made-up metrics."""
    args = vars(distill.parse_args(["--dataset", "fake", "--out", str(d)]))
    args.update(changes)
    os.makedirs(d)
    with open(d / "args.json", "w") as f:
        json.dump(args, f)
    row = lambda epoch, acc: dict(epoch=epoch, step=8 * epoch, ce=11.0, kl=0.1 / (epoch + 1), dist_from_init=float(epoch),
                                  student_linear=acc, student_knn=acc, teacher_linear=0.3, teacher_knn=0.3)
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps(dict(row(0, 0.3), input_linear=0.35, n_distill=512)) + "\n")
        f.write(json.dumps(row(5, student_linear)) + "\n")


def test_plot_finds_each_sweep_from_the_runs_own_arguments(tmp_path):
    base = tmp_path / "base"
    fake_run(base, 0.50)
    fake_run(tmp_path / "a05", 0.45, alpha=0.5)
    fake_run(tmp_path / "a1", 0.40, alpha=1.0)
    fake_run(tmp_path / "m256", 0.42, out_dim=256)
    fake_run(tmp_path / "round2", 0.49, teacher_ckpt=str(base / "last.pt"))
    fake_run(tmp_path / "n100", 0.33, n_samples=100)
    # Gaussian runs name the probe data; the real runs leave --probe-dataset at its default (the same data)
    fake_run(tmp_path / "g100", 0.20, n_samples=100, dataset="gaussian", probe_dataset="fake")
    fake_run(tmp_path / "g512", 0.21, dataset="gaussian", probe_dataset="fake")
    fake_run(tmp_path / "vit", 0.38, arch="vit_tiny")
    dirs = sorted(str(p) for p in tmp_path.iterdir())
    summary = distill.main(["--plot", *dirs, "--out", str(tmp_path / "figs")])
    assert [(r["alpha"], r["student_linear"]) for r in summary["fig3"]] == [(1e-10, 0.50), (0.5, 0.45), (1.0, 0.40)]
    assert sorted((r["out_dim"], r["student_linear"]) for r in summary["fig10"]) == [(256, 0.42), (65536, 0.50)]
    assert [(r["round"], r["student_linear"]) for r in summary["fig18"]] == [(1, 0.50), (2, 0.49)]
    assert sorted((r["dataset"], r["n_samples"], r["student_linear"]) for r in summary["fig4"]) == \
        [("fake", 100, 0.33), ("fake", 512, 0.50), ("gaussian", 100, 0.20), ("gaussian", 512, 0.21)]
    assert sorted((r["arch"], r["student_linear"]) for r in summary["table5"]) == [("vgg11", 0.50), ("vit_tiny", 0.38)]
    table5 = (tmp_path / "figs" / "table5.md").read_text()
    assert "| vit_tiny | 40 | 30.0 / 30.0 | **38.0 / 38.0** | 35.0 / - |" in table5
    assert "fig11" not in summary and "fig12" not in summary   # nobody swept --norm or --bottleneck
    for name in ("fig3", "fig17", "fig4", "fig10", "fig18"):
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 10_000
    assert json.load(open(tmp_path / "figs" / "sweeps.json")) == json.loads(json.dumps(summary))
    one = distill.main(["--plot", str(base), "--out", str(tmp_path / "one")])   # one run: its trajectory, no sweep
    assert one["runs"][0]["student_linear"] == 0.50
    assert "| 40 | 50.0 / - / 50.0 / - | 30.0 / - / 30.0 / - |" in (tmp_path / "one" / "trajectory.md").read_text()
    assert "| 50.0 (40) |" in (tmp_path / "one" / "runs.md").read_text()   # best raw linear and its step
    r = cli("--plot", str(base), str(tmp_path / "g512"))
    assert r.returncode == 2 and "form no sweep" in r.stderr


def test_bf16_changes_the_numbers_within_tolerance(tmp_path):
    # (the CPU default, bf16 with bf16 units and fp32 elsewhere, bit for bit: tests/test_cpu_defaults.py)
    flags = ["--arch", "resnet20", "--out-dim", "256", "--epochs", "1", "--alpha", "0.5"]
    fp32 = run(tmp_path / "fp32", *flags, "--precision", "fp32")
    bf16 = run(tmp_path / "bf16", *flags, "--precision", "bf16")
    # the CE (~ln 256) hides a bf16 change below float32 resolution; the KL and the weights do not
    for key in ("kl", "dist_from_init"):
        assert bf16[-1][key] != fp32[-1][key] and bf16[-1][key] == pytest.approx(fp32[-1][key], rel=0.2)
    assert bf16[0]["input_linear"] == fp32[0]["input_linear"]   # the raw input is not a network


def test_one_output_is_a_constant_softmax_that_teaches_nothing(tmp_path):
    # Fig. 10 starts at m = 2^0: the softmax over one output is 1 whatever the input, so the loss is
    # 0 with no gradient, and a student at alpha 1e-10 (its teacher to float precision) stays there
    rows = run(tmp_path, "--arch", "resnet20", "--out-dim", "1", "--epochs", "1", "--precision", "fp32")
    assert rows[-1]["ce"] == 0 and rows[-1]["teacher_entropy"] == 0 and abs(rows[-1]["kl"]) < 1e-9   # KL: rounding
    assert rows[-1]["dist_from_init"] < 1e-3   # only BN running statistics move, not weights
