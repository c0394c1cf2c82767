"""Real datasets, real interruptions, real typos: the scripts refuse what they cannot do right, in
one line with exit code 2, and never leave a silently wrong result or a lost run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import common
import distill
from common import UserError
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "fake", "--batch-size", "64", "--probe-every", "1", "--probe-samples", "256", "128",
        "--device", "cpu", "--compile", "none", "--arch", "resnet20", "--out-dim", "256"]


def cli(script, *flags, **kw):
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True, **kw)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in r.stderr, r.stderr


def image_tree(root, classes=("ant", "cat"), splits=(("train", 3), ("test", 2)), size=8):
    for split, n in splits:
        for k, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), (40 * i + 100 * k,) * 3).save(root / split / c / f"{i}.jpg", quality=100)


# ------------------------------------------------------------------ ImageFolder trees

def test_stray_files_are_skipped_and_counted(tmp_path, capsys):
    image_tree(tmp_path)
    (tmp_path / "train" / "cat" / "README.txt").write_text("not an image")
    (tmp_path / "train" / "ant" / "Thumbs.db").write_bytes(b"\0" * 64)
    data = common.load_dataset("imagefolder", str(tmp_path), "cpu")
    assert data["x_train"].shape == (6, 3, 8, 8) and data["y_train"].tolist() == [0, 0, 0, 1, 1, 1]
    assert "skipped 2 files that are not images" in capsys.readouterr().err


def test_both_splits_take_train_class_indices(tmp_path):
    image_tree(tmp_path, classes=("ant", "bee", "cat"))
    for f in (tmp_path / "test" / "ant").iterdir():   # test/ lacks a class: its labels must not shift
        f.unlink()
    (tmp_path / "test" / "ant").rmdir()
    data = common.load_dataset("imagefolder", str(tmp_path), "cpu")
    assert data["y_test"].tolist() == [1, 1, 2, 2] and data["num_classes"] == 3
    # a test image labelled as in train/: the same pixels get the same label
    bee_train, bee_test = data["x_train"][data["y_train"] == 1], data["x_test"][data["y_test"] == 1]
    assert torch.equal(bee_train[:2], bee_test)


def test_class_folder_only_test_has_is_refused(tmp_path):
    image_tree(tmp_path)
    image_tree(tmp_path, classes=("apple",), splits=(("test", 2),))
    with pytest.raises(UserError, match="class folders that train/ lacks: apple"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")


def test_empty_train_class_folder_is_refused(tmp_path):
    image_tree(tmp_path)
    os.makedirs(tmp_path / "train" / "aaa_empty")
    with pytest.raises(UserError, match="without images: aaa_empty"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 truncated"])
def test_unreadable_image_is_refused_with_its_path(tmp_path, content):
    image_tree(tmp_path)
    (tmp_path / "train" / "cat" / "9.jpg").write_bytes(content)
    with pytest.raises(UserError, match=r"cannot read image .*train/cat/9\.jpg"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")


def test_image_of_another_size_is_named(tmp_path):
    image_tree(tmp_path)
    Image.new("RGB", (16, 8)).save(tmp_path / "train" / "cat" / "odd.jpg")
    with pytest.raises(UserError, match=r"train/cat/odd\.jpg is 16x8, but .*ant/0\.jpg is 8x8"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")


def test_decoded_cache_follows_the_tree_and_survives_corruption(tmp_path, capsys):
    image_tree(tmp_path)
    first = common.load_dataset("imagefolder", str(tmp_path), "cpu")["x_train"]
    Image.new("RGB", (8, 8), (7, 7, 7)).save(tmp_path / "train" / "cat" / "0.jpg", quality=100)
    os.utime(tmp_path / "train" / "cat" / "0.jpg", ns=(1, 1))   # a new mtime, whatever the clock
    changed = common.load_dataset("imagefolder", str(tmp_path), "cpu")["x_train"]
    assert not torch.equal(first, changed) and abs(int(changed[3, 0, 0, 0]) - 7) <= 2
    assert "another version of the data" in capsys.readouterr().err
    (tmp_path / "imagefolder-train.uint8.pt").write_bytes(b"garbage")
    again = common.load_dataset("imagefolder", str(tmp_path), "cpu")["x_train"]
    assert torch.equal(again, changed) and "unreadable" in capsys.readouterr().err


# ------------------------------------------------------------------ one run directory, one experiment

def test_second_process_on_one_out_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import common, sys, time; "
                               f"common.open_run_dir({str(tmp_path)!r}, {{'alpha': 1.0}}, set(), 'distill.py'); "
                               "print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(cli("distill.py", *FAST, "--out", str(tmp_path)), "in use by another running process")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_results_without_last_checkpoint_keep_their_experiment(tmp_path):
    distill.main([*FAST, "--out", str(tmp_path), "--epochs", "1"])
    (tmp_path / "last.pt").unlink()
    best = (tmp_path / "best.pt").read_bytes()
    r = cli("distill.py", *FAST, "--out", str(tmp_path), "--epochs", "1", "--alpha", "1")
    one_line_error(r, "holds a run with other arguments", "--alpha 1e-10")
    assert (tmp_path / "best.pt").read_bytes() == best


def test_partial_metrics_line_from_a_crash_is_dropped_on_resume(tmp_path):
    whole = distill.main([*FAST, "--out", str(tmp_path / "a"), "--epochs", "2"])
    distill.main([*FAST, "--out", str(tmp_path / "b"), "--epochs", "1"])
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "ce": 11.0')   # what a crash in the middle of a write leaves
    assert distill.main([*FAST, "--out", str(tmp_path / "b"), "--epochs", "2"]) == whole
    assert common.read_jsonl(str(tmp_path / "b" / "metrics.jsonl")) == whole


def test_stale_checkpoint_temp_files_are_removed(tmp_path):
    distill.main([*FAST, "--out", str(tmp_path), "--epochs", "1"])
    (tmp_path / "last.pt.tmp12345").write_bytes(b"\0" * 1000)
    distill.main([*FAST, "--out", str(tmp_path), "--epochs", "1"])
    assert not list(tmp_path.glob("*.tmp*"))


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path):
    flags = [*FAST, "--out", str(tmp_path), "--epochs", "30", "--probe-every", "1"]
    # Ctrl-C as a terminal delivers it: a suite started in the background of a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    run = subprocess.Popen([sys.executable, "distill.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(common.read_jsonl(str(metrics))) >= 3):
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "stopped (Ctrl-C)" in err and "rerun the same command to resume" in err
    step = common.load_checkpoint(str(tmp_path / "last.pt"))["step"]
    assert step >= 8   # the point being written when the signal came may be lost, never a whole one
    rows = distill.main([*flags[:-4], "--epochs", str(step // 8 + 1), "--probe-every", "1"])
    assert rows[-1]["step"] == step + 8 and [r["step"] for r in rows] == list(range(0, step + 9, 8))


# ------------------------------------------------------------------ flags checked at parse time

@pytest.mark.parametrize("flags,message", [
    (["--knn-k", "0"], "--knn-k: must be a finite number >= 1"),
    (["--n-samples", "0"], "--n-samples: must be a finite number >= 1"),
    (["--n-samples", "-10"], "--n-samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--probe-every", "0"], "--probe-every"),
    (["--epochs", "-1"], "--epochs"),
    (["--lr", "nan"], "--lr: must be a finite number > 0"),
    (["--lr", "-1"], "--lr"),
    (["--knn-k", "-5"], "--knn-k"),
    (["--out-dim", "0"], "--out-dim"),
    (["--probe-samples", "5"], "--probe-samples"),
    (["--n-samples", "15"], "--n-samples 15 must be a positive multiple of 10"),
])
def test_distill_flags_out_of_range_are_one_line(tmp_path, flags, message):
    one_line_error(cli("distill.py", *FAST, "--out", str(tmp_path / "run"), *flags), message)


@pytest.mark.parametrize("script,flags,message", [
    ("imp.py", ["--rounds", "-1"], "--rounds"),
    ("imp.py", ["--epochs", "0"], "--epochs: must be a finite number >= 1"),
    ("imp.py", ["--lr", "nan"], "--lr"),
    ("lmc.py", ["--bn-samples", "0"], "--bn-samples"),
    ("lmc.py", ["--copies", "1"], "--copies"),
    ("probe.py", ["--arch", "resnet20", "--random", "--repeats", "0"], "--repeats"),
    ("probe.py", ["--arch", "resnet20", "--random", "--probe-samples", "5"], "--probe-samples"),
    ("landscape.py", ["--points", "teacher:a", "init:a", "student:a", "--eval-samples", "0"], "--eval-samples"),
])
def test_other_scripts_flags_out_of_range_are_one_line(tmp_path, script, flags, message):
    one_line_error(cli(script, "--dataset", "fake", "--device", "cpu", "--out", str(tmp_path / "run"), *flags),
                   message)


def test_out_that_cannot_be_a_directory_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(cli("distill.py", *FAST, "--out", str(tmp_path / "file")), "cannot write a directory there")
    one_line_error(cli("distill.py", *FAST, "--out", str(tmp_path / "file" / "sub")), "cannot write a directory")
    one_line_error(cli("probe.py", "--arch", "resnet20", "--random", "--dataset", "fake", "--device", "cpu",
                       "--out", str(tmp_path / "file")), "cannot write a directory there")


# ------------------------------------------------------------------ imp, lmc, landscape state files

def test_imp_metrics_always_match_its_state(tmp_path):
    imp = load_script("imp")
    flags = ["--arch", "resnet20", "--dataset", "fake", "--device", "cpu", "--epochs", "1", "--batch-size", "128",
             "--out", str(tmp_path)]
    whole = imp.main([*flags, "--rounds", "1"])
    with open(tmp_path / "metrics.jsonl", "a") as f:   # what appending a row before saving the state left
        f.write(json.dumps(whole[1]) + "\n" + '{"round": 2, "dens')
    rows = imp.main([*flags, "--rounds", "1"])   # the state says: done
    assert rows == whole and [r["round"] for r in rows] == [0, 1]
    assert common.read_jsonl(str(tmp_path / "metrics.jsonl")) == whole
    more = imp.main([*flags, "--rounds", "2"])   # more rounds continue the same experiment
    assert more[:2] == whole and [r["round"] for r in more] == [0, 1, 2]


def test_lmc_refuses_copies_of_another_experiment(tmp_path):
    lmc = load_script("lmc")
    flags = ["--arch", "resnet20", "--dataset", "fake", "--device", "cpu", "--copies", "2", "--points", "3",
             "--batch-size", "128", "--out", str(tmp_path)]
    lmc.main([*flags, "--epochs", "1"])
    (tmp_path / "copy0.pt").unlink()
    with pytest.raises(UserError, match="other arguments.*--epochs 1"):
        lmc.main([*flags, "--epochs", "2"])
    (tmp_path / "copy1.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="copy1.pt is not a readable checkpoint"):
        lmc.main([*flags, "--epochs", "1"])


# ------------------------------------------------------------------ torch.compile failing late

def test_compile_failure_in_the_backward_falls_back_to_eager(monkeypatch, capsys):
    class BrokenBackward(torch.autograd.Function):   # what a half-written cached kernel does
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise ImportError("main.so: file too short")

    monkeypatch.setattr(torch, "compile", lambda fn: (lambda *a: BrokenBackward.apply(fn(*a))))
    loss = lambda s: (s ** 2).sum()
    s = torch.ones(3, requires_grad=True)
    assert common.compiled(loss, [(s,)]) is loss
    err = capsys.readouterr().err
    assert "torch.compile failed (ImportError: main.so: file too short); running eager" in err
    assert "torchinductor" in err and s.grad is None


def test_bench_times_any_subset_of_variants_and_refuses_unknown_ones():
    # ratios are over plain only when plain is timed; a subset without it used to end in a KeyError
    r = cli("bench.py", "--archs", "resnet20", "--variants", "ours_eager", "ours_nocache", "--batch-size", "4",
            "--out-dim", "64", "--steps", "1", "--reps", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "ratios over ours_eager: ours_nocache" in r.stdout and "speedup:" not in r.stdout
    r = cli("bench.py", "--variants", "ours_fast")
    assert r.returncode == 2 and "invalid choice: 'ours_fast'" in r.stderr and "Traceback" not in r.stderr
