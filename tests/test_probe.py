"""probe.py: Tables 1-4 style probing of checkpoints, random networks, transfer, bad input."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import distill
import probe
from common import atomic_save, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--device", "cpu", "--probe-samples", "256", "128"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    distill.main(["--arch", "resnet20", "--out-dim", "256", "--dataset", "fake", "--epochs", "1",
                  "--batch-size", "64", "--probe-samples", "256", "128", "--device", "cpu", "--out", str(out)])
    return out


def fake_checkpoint(path, arch, img_size):
    config = dict(arch=arch, out_dim=128, bottleneck="011110", norm=None, img_size=img_size)
    model = make_model(**config, generator=torch.Generator().manual_seed(0))
    atomic_save(dict(config=config, teacher=model.state_dict(), student=model.state_dict()), str(path))
    return str(path)


def test_probing_a_checkpoint_twice_gives_identical_numbers(run_dir, tmp_path):
    flags = [str(run_dir), "--dataset", "fake", "--repeats", "2", "--features", "both", *QUICK]
    first = probe.main([*flags, "--out", str(tmp_path / "a")])
    second = probe.main([*flags, "--out", str(tmp_path / "b")])
    assert first == second
    row = first[0]
    assert set(row) >= {"teacher", "student", "input"} and len(row["student"]["linear"]) == 2
    assert row["student"]["linear_std"] and len(row["student"]["knn"]) == 1
    assert all(0 <= a <= 1 for s in ("teacher", "student", "input") for a in row[s]["linear"])
    table = (tmp_path / "a" / "probe.md").read_text()
    assert "| fake | resnet20 |" in table and "±" in table and "k-NN probe (k=20, l2)" in table
    assert (tmp_path / "a" / "probe.json").exists() and (tmp_path / "a" / "args.json").exists()


def test_rows_are_dataset_by_model(run_dir, tmp_path):
    rows = probe.main([str(run_dir), "--arch", "vgg11", "--random", "--dataset", "fake", "fake", *QUICK,
                       "--out", str(tmp_path)])
    assert [(r["dataset"], r["arch"]) for r in rows] == [("fake", "resnet20"), ("fake", "vgg11")] * 2
    assert rows[0]["student"] == rows[2]["student"]   # the same data twice: the same numbers


def test_random_network_is_distills_teacher_for_the_same_seed(run_dir, tmp_path):
    rows = probe.main([str(run_dir), "--arch", "resnet20", "--random", "--dataset", "fake", *QUICK,
                       "--out", str(tmp_path)])
    from_checkpoint, random = rows
    assert "student" not in random and random["teacher"] == from_checkpoint["teacher"]


def test_transfer_from_64px_checkpoint_to_32px_dataset_and_back(tmp_path):
    ckpt64 = fake_checkpoint(tmp_path / "vgg64.pt", "vgg11", 64)
    row = probe.main([ckpt64, "--dataset", "fake", *QUICK, "--out", str(tmp_path / "p64")])[0]
    # the 32 px images are resized to 64 px: VGG11's 5 poolings leave 512 x 2 x 2 features
    assert row["img_size"] == 64 and row["embed_dim"] == 2048 and row["input_dim"] == 3 * 64 * 64
    assert 0 <= row["student"]["knn"][0] <= 1

    for split, n in [("train", 20), ("test", 10)]:   # a 64 px dataset, probed by a 32 px checkpoint
        for c in range(2):
            os.makedirs(tmp_path / "tree" / split / str(c))
            for i in range(n):
                img = Image.new("RGB", (64, 64), (100 * c + i, 50 + i, 50))
                img.save(tmp_path / "tree" / split / str(c) / f"{i}.png")
    ckpt32 = fake_checkpoint(tmp_path / "vgg32.pt", "vgg11", 32)
    row = probe.main([ckpt32, "--dataset", "imagefolder", "--data-root", str(tmp_path / "tree"),
                      "--device", "cpu", "--out", str(tmp_path / "p32")])[0]
    assert row["img_size"] == 32 and row["embed_dim"] == 512 and row["input_dim"] == 3 * 32 * 32
    assert row["input"]["knn"][0] == 1.0   # the classes' red channels are 100 levels apart: separable


def text_file(d):
    (d / "notes.txt").write_text("hello")
    return d / "notes.txt"


def alexnet_checkpoint(d):
    torch.save(dict(config=dict(arch="alexnet")), d / "a.pt")
    return d / "a.pt"


@pytest.mark.parametrize("make_path,message", [
    (text_file, "not a readable checkpoint"),
    (lambda d: d / "missing.pt", "no checkpoint at"),
    (alexnet_checkpoint, "unknown arch 'alexnet'"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, make_path, message):
    r = subprocess.run([sys.executable, "probe.py", str(make_path(tmp_path)), "--dataset", "fake",
                        "--device", "cpu", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_dataset_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "probe.py", "--arch", "vgg11", "--random", "--dataset", "imagefolder",
                        "--data-root", str(tmp_path), "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and f"{tmp_path}/train/<class>" in r.stderr
    assert "Traceback" not in r.stderr
