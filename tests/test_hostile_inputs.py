"""What a careless or unlucky user does to a run directory or a data tree: edit args.json, swap in
another script's files, point one script at another's output, fill the disk, feed odd images.
Each case is refused in one line (exit code 2) before any file of the run changes, or handled
right -- and where the old failure was a silently wrong number, the number is checked."""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import distill
import probe
from common import UserError
from conftest import load_script
from test_robustness import FAST, cli, image_tree, one_line_error


def files_of(d):
    """Every file of a run directory with its bytes (what a refused command must leave alone)."""
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d)) if f != ".lock"}


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_run")
    distill.main([*FAST, "--out", str(out), "--epochs", "1"])
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ------------------------------------------------------------------ the checkpoint is the truth

@pytest.mark.parametrize("edited", ["{}", '{"alpha": 0.5}', "[]", "42"])
def test_an_edited_args_json_cannot_resume_another_experiment(distill_run, tmp_path, edited):
    run = copy_run(distill_run, tmp_path / "run")
    args = json.loads((run / "args.json").read_text())
    if edited.startswith("{") and edited != "{}":
        edited = json.dumps({**args, **json.loads(edited)})   # alpha changed by hand, the rest intact
    (run / "args.json").write_text(edited)
    before = files_of(run)
    r = cli("distill.py", *FAST, "--out", str(run), "--epochs", "2", "--alpha", "0.5")
    if edited in ("[]", "42"):
        one_line_error(r, "args.json is not a JSON object")
    else:   # last.pt was trained at alpha = 1e-10, whatever args.json says now
        one_line_error(r, "other arguments (--alpha 1e-10, per its last.pt)")
    assert files_of(run) == before


def test_a_flag_an_older_run_lacks_means_its_default(distill_run, tmp_path):
    run = copy_run(distill_run, tmp_path / "run")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["args"]["adam_eps"]   # a run from before --adam-eps existed
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(UserError, match=r"--adam-eps 1e-08, per its last.pt"):
        distill.main([*FAST, "--out", str(run), "--epochs", "2", "--adam-eps", "1e-6"])
    rows = distill.main([*FAST, "--out", str(run), "--epochs", "2"])   # at the default it resumes
    assert [r["step"] for r in rows] == [0, 8, 16]


def test_resume_on_other_data_is_refused(tmp_path):
    tree = tmp_path / "tree"
    image_tree(tree, size=32)
    flags = [*FAST, "--dataset", "imagefolder", "--data-root", str(tree), "--out", str(tmp_path / "run")]
    distill.main([*flags, "--epochs", "1"])
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    ran = common.resolve_precision("auto", "cpu", distill.CPU_AUTO_PRECISION)   # bf16 on a CPU with bf16 units
    assert prov["data"]["imagefolder"]["fingerprint"] and prov["segments"][0]["precision"] == ran
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["precision"] == "auto" and args["precision_used"] == ran and args["script"] == "distill.py"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tree / "train" / "cat" / "0.jpg")   # the same files, other pixels
    before = files_of(tmp_path / "run")
    with pytest.raises(UserError, match="was made from other data"):
        distill.main([*flags, "--epochs", "2"])
    assert files_of(tmp_path / "run") == before


# ------------------------------------------------------------------ one run directory, one script

def test_imp_and_lmc_refuse_each_others_run_directories(tmp_path):
    imp = load_script("imp")
    common_flags = ["--arch", "resnet20", "--dataset", "fake", "--device", "cpu", "--epochs", "1",
                    "--batch-size", "128"]
    imp.main([*common_flags, "--rounds", "0", "--out", str(tmp_path / "imp")])
    before = files_of(tmp_path / "imp")
    one_line_error(cli("lmc.py", *common_flags, "--copies", "2", "--out", str(tmp_path / "imp")),
                   "is a run directory of imp.py; lmc.py does not write into it")
    assert files_of(tmp_path / "imp") == before
    old_lmc = tmp_path / "lmc"   # an lmc run from before args.json named its script: known by its files
    old_lmc.mkdir()
    (old_lmc / "args.json").write_text(json.dumps({"copies": 2}))
    (old_lmc / "copy0.pt").write_bytes(b"weights")
    with pytest.raises(UserError, match="run directory of lmc.py; imp.py does not write"):
        imp.main([*common_flags, "--out", str(old_lmc)])
    assert (old_lmc / "copy0.pt").read_bytes() == b"weights"


def test_probe_never_writes_into_a_distillation_run(distill_run, tmp_path):
    run = copy_run(distill_run, tmp_path / "run")
    before = files_of(run)
    r = cli("probe.py", str(run), "--dataset", "fake", "--device", "cpu", "--probe-samples", "64", "32",
            "--out", str(run))
    one_line_error(r, "is a run directory of distill.py; probe.py does not write into it")
    assert files_of(run) == before


def test_probes_of_two_runs_keep_two_tables(distill_run, tmp_path):
    a, b = copy_run(distill_run, tmp_path / "a"), copy_run(distill_run, tmp_path / "b")
    out_a = probe.parse_args([str(a), "--dataset", "fake"]).out
    out_b = probe.parse_args([str(b), "--dataset", "fake"]).out
    assert out_a == os.path.join("runs", "probe_fake_a") and out_b == os.path.join("runs", "probe_fake_b")
    flags = ["--dataset", "fake", "--device", "cpu", "--probe-samples", "64", "32", "--out", str(tmp_path / "p")]
    probe.main([str(a), *flags])
    table = (tmp_path / "p" / "probe.md").read_text()
    with pytest.raises(UserError, match="holds a run with other arguments"):   # one --out, another probe
        probe.main([str(b), *flags])
    assert (tmp_path / "p" / "probe.md").read_text() == table
    probe.main([str(a), *flags])   # the same probe again: its own table, rewritten
    prov = json.loads((tmp_path / "p" / "provenance.json").read_text())
    assert list(prov["data"]) == ["fake"] and len(prov["segments"]) == 2 and prov["segments"][0]["machine"]


def test_every_plot_refuses_another_scripts_directory(distill_run, tmp_path):
    imp, lmc = load_script("imp"), load_script("lmc")
    imp_dir = tmp_path / "imp"
    imp_dir.mkdir()
    (imp_dir / "args.json").write_text(json.dumps({"script": "imp.py", "arch": "resnet20"}))
    (imp_dir / "metrics.jsonl").write_text(json.dumps({"round": 0, "density": 1.0, "final_acc": 0.5}) + "\n")
    one_line_error(cli("distill.py", "--plot", str(imp_dir), str(distill_run), "--out", str(tmp_path / "f")),
                   f"--plot {imp_dir}: a run directory of imp.py, not of distill.py")
    with pytest.raises(UserError, match="a run directory of distill.py, not of imp.py"):
        imp.main(["--plot", str(distill_run), "--out", str(tmp_path / "f")])
    with pytest.raises(UserError, match="a run directory of imp.py, not of lmc.py"):
        lmc.main(["--plot", str(imp_dir), "--out", str(tmp_path / "f")])
    with pytest.raises(UserError, match="a run directory of distill.py, not of landscape.py"):
        load_script("landscape").main(["--plot", str(distill_run), "--out", str(tmp_path / "f")])


@pytest.mark.parametrize("script,flag,value", [("distill.py", "--teacher-seed", str(2 ** 70)),
                                               ("imp.py", "--seed", "-1"), ("probe.py", "--init-seed", str(2 ** 64))])
def test_a_seed_torch_cannot_take_is_refused_at_parse_time(tmp_path, script, flag, value):
    # 2^70 ended in an overflow traceback from torch.Generator.manual_seed
    flags = ["--arch", "resnet20", "--random"] if script == "probe.py" else []
    one_line_error(cli(script, *flags, "--dataset", "fake", "--device", "cpu", "--out", str(tmp_path / "r"),
                       flag, value), flag)


# ------------------------------------------------------------------ a full disk loses nothing

def test_a_full_disk_is_one_line_and_the_run_resumes_where_its_checkpoint_is(tmp_path, monkeypatch):
    whole = distill.main([*FAST, "--out", str(tmp_path / "whole"), "--epochs", "2"])
    save = torch.save

    def full_disk(obj, path, *a, **kw):   # step 16's last.pt finds the disk full
        if os.path.basename(str(path)).startswith("last.pt") and obj.get("step") == 16:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")
        return save(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write .*last.pt \(.*unexpected pos.*\); the previous last.pt is kept"):
        distill.main([*FAST, "--out", str(run), "--epochs", "2"])
    monkeypatch.setattr(torch, "save", save)
    assert common.load_checkpoint(str(run / "last.pt"))["step"] == 8
    assert [r["step"] for r in common.read_jsonl(str(run / "metrics.jsonl"))] == [0, 8]   # never ahead of last.pt
    assert not [f for f in os.listdir(run) if ".tmp" in f]
    assert distill.main([*FAST, "--out", str(run), "--epochs", "2"]) == whole


def test_json_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "args.json"
    common.write_json(str(path), {"alpha": 1e-10})
    real_open = open

    def enospc(file, mode="r", *a, **kw):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *a, **kw)
    monkeypatch.setattr("builtins.open", enospc)
    with pytest.raises(UserError, match=r"args.json \(No space left on device\); the previous args.json is kept"):
        common.write_json(str(path), {"alpha": 0.5})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"alpha": 1e-10}


# ------------------------------------------------------------------ data trees that used to lie

def test_a_class_added_to_train_only_relabels_the_cached_test_split(tmp_path):
    image_tree(tmp_path, classes=("ant", "cat"))
    assert common.load_dataset("imagefolder", str(tmp_path), "cpu")["y_test"].tolist() == [0, 0, 1, 1]
    image_tree(tmp_path, classes=("bee",), splits=(("train", 3),))   # train/ gains a class, test/ unchanged
    data = common.load_dataset("imagefolder", str(tmp_path), "cpu")
    assert data["y_test"].tolist() == [0, 0, 2, 2] and data["num_classes"] == 3   # cat is class 2 now


def test_a_symlink_loop_in_a_class_folder_adds_no_images(tmp_path):
    image_tree(tmp_path)
    os.symlink(".", tmp_path / "train" / "cat" / "loop")
    data = common.load_dataset("imagefolder", str(tmp_path), "cpu")
    assert data["y_train"].tolist() == [0, 0, 0, 1, 1, 1]


def test_a_dangling_symlink_is_named(tmp_path):
    image_tree(tmp_path)
    os.symlink(tmp_path / "gone.jpg", tmp_path / "train" / "cat" / "9.jpg")
    with pytest.raises(UserError, match=r"train/cat/9\.jpg is a link to nothing"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")


def test_16_bit_grayscale_keeps_its_gray_and_rangeless_modes_are_refused(tmp_path):
    image_tree(tmp_path, size=4)
    for f in (tmp_path / "train" / "cat").iterdir():   # mid-gray as 16-bit PNGs (a microscope's, say)
        f.unlink()
        Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(f.with_suffix(".png"))
    data = common.load_dataset("imagefolder", str(tmp_path), "cpu")
    cat = data["x_train"][data["y_train"] == 1]
    assert cat.shape == (3, 3, 4, 4) and (cat == round(30000 * 255 / 65535)).all()   # 117, not 255
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "train" / "cat" / "f.tif")
    with pytest.raises(UserError, match=r"cat/f\.tif is a float image \(mode F\)"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")


def test_partly_extracted_tiny_imagenet_is_named(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    os.makedirs(base / "train" / "n01" / "images")
    os.makedirs(base / "train" / "n02" / "images")
    Image.new("RGB", (64, 64)).save(base / "train" / "n01" / "images" / "a.JPEG")
    with pytest.raises(UserError, match=r"partly extracted\? train/n02 has no images"):
        common.load_dataset("tinyimagenet", str(tmp_path), "cpu")


# ------------------------------------------------------------------ transfer to unseen classes

def test_split_classes_cuts_two_trees_and_a_run_distills_on_one_and_probes_on_the_other(tmp_path):
    image_tree(tmp_path / "tree", classes=("ant", "bee", "cat", "dog"), size=32)
    halves = distill.main(["--split-classes", "2", str(tmp_path / "split"), "--data-root", str(tmp_path / "tree")])
    assert halves == {"distill": ["ant", "bee"], "probe": ["cat", "dog"]}
    for half, names in halves.items():
        for split in ("train", "test"):
            assert sorted(os.listdir(tmp_path / "split" / half / split)) == names
            assert all(os.path.islink(tmp_path / "split" / half / split / c) for c in names)   # nothing copied
    # again: the same links, nothing to do; the labels of each half start at 0
    assert distill.main(["--split-classes", "2", str(tmp_path / "split"), "--data-root", str(tmp_path / "tree")]) == halves
    probe_half = common.load_dataset("imagefolder", str(tmp_path / "split" / "probe"), "cpu")
    assert probe_half["y_train"].tolist() == [0, 0, 0, 1, 1, 1] and probe_half["num_classes"] == 2
    full = common.load_dataset("imagefolder", str(tmp_path / "tree"), "cpu")
    assert torch.equal(probe_half["x_train"], full["x_train"][6:])   # cat, dog: the same pixels
    out = tmp_path / "run"
    distill.main([*FAST, "--dataset", "imagefolder", "--data-root", str(tmp_path / "split" / "distill"),
                  "--probe-data-root", str(tmp_path / "split" / "probe"), "--epochs", "1", "--out", str(out)])
    data = json.loads((out / "provenance.json").read_text())["data"]
    assert sorted(v["root"] for v in data.values()) == [str(tmp_path / "split" / h) for h in ("distill", "probe")]
    assert len({v["fingerprint"] for v in data.values()}) == 2
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["n_distill"] == 6   # ant and bee only
    # a resume reads the same two trees; distilling on the probe half instead is another experiment's data
    distill.main([*FAST, "--dataset", "imagefolder", "--data-root", str(tmp_path / "split" / "distill"),
                  "--probe-data-root", str(tmp_path / "split" / "probe"), "--epochs", "2", "--out", str(out)])
    with pytest.raises(UserError, match="other data"):
        distill.main([*FAST, "--dataset", "imagefolder", "--data-root", str(tmp_path / "split" / "probe"),
                      "--probe-data-root", str(tmp_path / "split" / "probe"), "--epochs", "3", "--out", str(out)])


@pytest.mark.parametrize("flags,message", [
    (["--split-classes", "4", "DEST"], "--split-classes 4: the tree has 4 classes"),
    (["--split-classes", "two", "DEST"], "--split-classes takes N DEST"),
])
def test_a_split_that_leaves_a_half_empty_is_one_line(tmp_path, flags, message):
    image_tree(tmp_path / "tree", classes=("ant", "bee", "cat", "dog"))
    one_line_error(cli("distill.py", *flags, "--data-root", str(tmp_path / "tree")), message)


# ------------------------------------------------------------------ image geometry against the model

def test_distilling_a_64px_tree_probed_on_32px_data_trains_at_64px(tmp_path):
    image_tree(tmp_path / "tree", size=64)
    out = tmp_path / "run"
    distill.main([*FAST, "--dataset", "imagefolder", "--data-root", str(tmp_path / "tree"), "--probe-dataset", "fake",
                  "--epochs", "1", "--out", str(out)])
    ckpt = common.load_checkpoint(str(out / "last.pt"))
    assert ckpt["config"]["img_size"] == 64   # the distillation resolution; the probe images resized to it
    assert set(json.loads((out / "provenance.json").read_text())["data"]) == {"imagefolder", "fake"}


@pytest.mark.parametrize("train_size,test_size,message", [
    ((28, 28), (28, 28), "vgg11 needs images of at least 32x32 px, these are 28x28"),
    ((32, 16), (32, 16), "the images are 32x16; the encoders take square images"),
    ((32, 32), (64, 64), "the training images are 32x32 but the test images 64x64"),
])
def test_image_geometry_the_model_cannot_take_is_one_line(tmp_path, train_size, test_size, message):
    for split, size in (("train", train_size), ("test", test_size)):
        for c in ("ant", "cat"):
            os.makedirs(tmp_path / "tree" / split / c)
            for i in range(2):
                Image.new("RGB", size, (60 * i,) * 3).save(tmp_path / "tree" / split / c / f"{i}.png")
    r = cli("distill.py", *FAST, "--arch", "vgg11", "--dataset", "imagefolder", "--data-root", str(tmp_path / "tree"),
            "--out", str(tmp_path / "run"))
    one_line_error(r, message)


def test_plot_never_sweeps_runs_on_two_trees(tmp_path):
    from test_distill import fake_run
    for name, alpha, tree in (("a", 1e-10, "x"), ("b", 0.5, "x"), ("c", 1.0, "y")):
        fake_run(tmp_path / name, 0.4, alpha=alpha, dataset="imagefolder")
        (tmp_path / name / "provenance.json").write_text(json.dumps(
            {"script": "distill.py", "data": {"imagefolder": {"fingerprint": tree}}}))
    summary = distill.main(["--plot", *(str(tmp_path / n) for n in "abc"), "--out", str(tmp_path / "figs")])
    assert [r["alpha"] for r in summary["fig3"]] == [1e-10, 0.5]   # c read another tree: not on this curve
    with pytest.raises(UserError, match="form no sweep"):
        distill.main(["--plot", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "figs")])


# ------------------------------------------------------------------ state files know their model

def test_imp_refuses_a_state_of_another_model_before_writing(tmp_path):
    imp = load_script("imp")
    flags = ["--arch", "resnet20", "--dataset", "fake", "--device", "cpu", "--epochs", "1", "--batch-size", "128",
             "--out", str(tmp_path)]
    imp.main([*flags, "--rounds", "2"])
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    foreign = common.make_classifier(common.make_encoder("resnet56"), 10, None).state_dict()
    torch.save(dict(state, rewind=foreign), tmp_path / "state.pt")   # same arguments, another network
    before = files_of(tmp_path)
    with pytest.raises(UserError, match="state.pt holds another model than this --arch resnet20"):
        imp.main([*flags, "--rounds", "3"])
    assert files_of(tmp_path) == before
    torch.save(dict(state, args=dict(state["args"], arch="vgg11")), tmp_path / "state.pt")   # a vgg11 run's state
    before = files_of(tmp_path)
    with pytest.raises(UserError, match=r"--arch vgg11, per its state.pt"):
        imp.main([*flags, "--rounds", "3"])
    assert files_of(tmp_path) == before and len(common.read_jsonl(str(tmp_path / "metrics.jsonl"))) == 3


# ------------------------------------------------------------------ landscape inputs

def test_landscape_refuses_a_checkpoint_without_arguments_and_a_nan_window(tmp_path, capsys):
    landscape = load_script("landscape")
    config = dict(arch="resnet20", out_dim=128, bottleneck="011110", norm=None, img_size=32)
    model = common.make_model(**config, generator=torch.Generator().manual_seed(0))
    common.atomic_save(dict(config=config, teacher=model.state_dict(), student=model.state_dict()),
                       str(tmp_path / "bare.pt"))   # no "args": not what distill.py writes
    points = ["--points", f"teacher:{tmp_path / 'bare.pt'}", f"init:{tmp_path / 'bare.pt'}", f"student:{tmp_path / 'bare.pt'}"]
    with pytest.raises(UserError, match="does not record the run's arguments"):   # was a KeyError traceback
        landscape.main([*points, "--dataset", "fake", "--device", "cpu", "--out", str(tmp_path / "land")])
    with pytest.raises(SystemExit) as e:
        landscape.parse_args([*points, "--xlim", "nan", "1"])
    assert e.value.code == 2 and "--xlim takes two finite numbers" in capsys.readouterr().err


def test_imp_lmc_and_landscape_record_their_data_and_refuse_a_resume_on_other_pixels(tmp_path):
    imp, lmc = load_script("imp"), load_script("lmc")
    image_tree(tmp_path / "tree", size=32)
    flags = ["--arch", "resnet20", "--dataset", "imagefolder", "--data-root", str(tmp_path / "tree"), "--device", "cpu",
             "--epochs", "1", "--batch-size", "128"]
    imp.main([*flags, "--rounds", "0", "--out", str(tmp_path / "imp")])
    lmc.main([*flags, "--copies", "2", "--points", "2", "--out", str(tmp_path / "lmc")])
    for d in ("imp", "lmc"):
        prov = json.loads((tmp_path / d / "provenance.json").read_text())
        assert prov["script"] == f"{d}.py" and prov["data"]["imagefolder"]["train"] == 6
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "tree" / "train" / "cat" / "0.jpg")
    with pytest.raises(UserError, match="state.pt was made from other data"):
        imp.main([*flags, "--rounds", "1", "--out", str(tmp_path / "imp")])
    with pytest.raises(UserError, match="copy0.pt was made from other data"):
        lmc.main([*flags, "--copies", "2", "--points", "2", "--out", str(tmp_path / "lmc")])
