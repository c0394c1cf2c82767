"""Models, head, init, loss, probes, data and checkpoints of common.py, checked against the paper."""
import inspect
import math
import os
import tarfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from common import (Head, UserError, distillation_loss, knn_probe, linear_probe, locality_init,
                    make_encoder, make_model)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpeg.tar.gz")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ models (Table 5)

@pytest.mark.parametrize("arch,count", [
    ("vgg11", 9_220_480), ("vgg13", 9_404_992), ("vgg16", 14_714_688), ("vgg19", 20_024_384),
    ("resnet20", 271_824), ("resnet56", 855_120),
    ("resnet18", 11_168_832), ("resnet34", 21_276_992), ("resnet50", 23_500_352),
    ("vit_tiny", 594_048), ("vit_small", 2_072_832), ("vit_medium", 3_550_208), ("vit_base", 7_684_608),
])
def test_encoder_matches_table5_param_count(arch, count):
    assert n_params(make_encoder(arch)) == count


def test_vit_is_the_authors_one_shared_block_with_head_attention():
    # dinopl's models/vit.py, written out: the model Table 5 ran (checked equal to their module,
    # bit for bit, with copied weights). One block, 12 times; attention over heads within a token.
    enc = make_encoder("vit_tiny", generator=torch.Generator().manual_seed(0)).eval()
    assert not any(".0." in k or "blocks" in k for k in enc.state_dict())   # no per-layer copies
    x = torch.randn(2, 3, 32, 32)
    t = enc.patch_embed(x).flatten(-2, -1).transpose(-2, -1)
    t = torch.cat((enc.cls_token.expand(2, -1, -1), t), dim=1) + enc.pos_embed
    H = 3   # ViT-Tiny's heads
    for _ in range(12):
        B, L, E = t.shape
        qkv = enc.qkv(enc.norm1(t)).reshape(B, L, 3, E).permute(2, 0, 1, 3).reshape(3, B, L, H, E // H)
        attn = F.softmax((qkv[0] @ qkv[1].transpose(-2, -1)) * (E // H) ** -0.5, dim=-1)   # B, L, H, H
        t = enc.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, L, E)) + t
        t = F.gelu(enc.fc2(F.gelu(enc.fc1(enc.norm2(t))))) + t
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.norm(t)[:, 0], rtol=1e-5, atol=1e-5)
    assert enc.pos_embed.shape == (1, 5, 192)   # patch 16: 4 patches at 32 px + CLS


def test_head_param_count_embed512_out65536():
    for bottleneck in ["paper", "authors"]:
        assert n_params(Head(512, 65536, bottleneck)) == 22_548_736


@pytest.mark.parametrize("arch", common.ARCHS)
def test_every_encoder_outputs_its_embed_dim(arch):
    enc = make_encoder(arch, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, enc.embed_dim)
    assert enc.embed_dim == {"vgg11": 512, "resnet50": 2048, "resnet20": 64, "vit_small": 384,
                             "flatten": 3072}.get(arch, enc.embed_dim)


def test_model_outputs_out_dim_logits():
    model = make_model("resnet20", out_dim=1000).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 1000)
    assert isinstance(model.encoder, nn.Module) and isinstance(model.head, Head)


def test_vgg_has_no_norm_layers_and_norm_swap_replaces_them():
    types = lambda m: {type(x) for x in m.modules()}
    assert not types(make_encoder("vgg11")) & {nn.BatchNorm2d, nn.GroupNorm}
    assert nn.BatchNorm2d in types(make_encoder("vgg11", norm="batch"))
    gn = [m for m in make_encoder("resnet18", norm="group8").modules() if isinstance(m, nn.GroupNorm)]
    assert gn and all(m.num_channels // m.num_groups == 8 for m in gn)
    inst = [m for m in make_encoder("resnet20", norm="instance").modules() if isinstance(m, nn.GroupNorm)]
    assert inst and all(m.num_groups == m.num_channels for m in inst)
    assert not types(make_encoder("resnet18", norm="none")) & {nn.BatchNorm2d, nn.GroupNorm}


def test_init_is_fixed_by_the_generator_seed():
    a = make_model("resnet20", out_dim=64, generator=torch.Generator().manual_seed(3))
    b = make_model("resnet20", out_dim=64, generator=torch.Generator().manual_seed(3))
    c = make_model("resnet20", out_dim=64, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)


def test_init_scheme_kaiming_convs_truncnormal_head():
    model = make_model("vgg11", out_dim=4096, generator=torch.Generator().manual_seed(0))
    conv = model.encoder[0]   # 64 x 3 x 3 x 3, kaiming normal fan_out: std = sqrt(2 / (64 * 9))
    assert abs(conv.weight.std().item() - math.sqrt(2 / (64 * 9))) < 0.01
    assert torch.count_nonzero(conv.bias) == 0
    w = model.head.lin2.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    assert torch.count_nonzero(model.head.lin1.bias) == 0


def test_bottleneck_weight_norm_bounds_the_logits():
    # paper text: unit feature . unit weight row -> |logit| <= 1; authors' runs: raw rows, ~N(0, 0.02^2)
    x = torch.randn(8, 512)
    paper = Head(512, 4096, "paper")
    common.init_weights(paper, torch.Generator().manual_seed(0))
    authors = Head(512, 4096, "authors")
    authors.load_state_dict(paper.state_dict())
    lp, la = paper(x), authors(x)
    assert lp.abs().max() <= 1 + 1e-5 and lp.std() > 0.01
    assert la.std() < 0.03 and not torch.allclose(lp, la)
    row_norms = paper.lin2.weight.norm(dim=1)
    torch.testing.assert_close(lp, nn.functional.normalize(paper.lin1(paper.mlp(x)), dim=1)
                               @ (paper.lin2.weight / row_norms[:, None]).T)


def test_bottleneck_spec_fields():
    assert Head(512, 100, "011010").lin2.weight_norm is False
    h = Head(512, 100, "010000")   # only lin1: outputs the 256-d bottleneck, no second layer
    assert h.lin2 is None and h.out_dim == 256 and h(torch.randn(2, 512)).shape == (2, 256)
    for bad in ["01111", "abcdef", "100000"]:   # wrong length, not bits, wn1 without lin1
        with pytest.raises(UserError):
            Head(512, 100, bad)


# ------------------------------------------------------------------ locality init (§4)

def _pair(arch="resnet20"):
    teacher = make_model(arch, out_dim=64, generator=torch.Generator().manual_seed(0))
    fresh = make_model(arch, out_dim=64, generator=torch.Generator().manual_seed(1))
    return teacher, fresh


def test_alpha0_student_equals_teacher_and_alpha1_the_fresh_init():
    teacher, fresh = _pair()
    fresh_copy = [p.clone() for p in fresh.parameters()]
    student = locality_init(teacher, fresh, 0.0)
    assert all(torch.equal(s, t) for s, t in zip(student.parameters(), teacher.parameters()))
    teacher, fresh = _pair()
    student = locality_init(teacher, fresh, 1.0)
    assert all(torch.equal(s, r) for s, r in zip(student.parameters(), fresh_copy))


def test_alpha_1e10_is_numerically_the_teacher():
    # in float32, 1 - 1e-10 == 1 and the divisor == 1: the student differs from its teacher only
    # where alpha * theta_R survives rounding, i.e. on weights within ~1e-5 of zero, by ~1e-12
    teacher, fresh = _pair("vgg11")
    student = locality_init(teacher, fresh, 1e-10)
    diff = max((s - t).abs().max().item() for s, t in zip(student.parameters(), teacher.parameters()))
    assert diff < 1e-10
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # the same function to float32 precision (logits are cosines, |l| <= 1)
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=1e-6)


def test_locality_applies_the_variance_preserving_divisor():
    teacher, fresh = _pair()
    t, r = teacher.encoder[0].weight.clone(), fresh.encoder[0].weight.clone()
    student = locality_init(teacher, fresh, 0.5)
    torch.testing.assert_close(student.encoder[0].weight, (0.5 * t + 0.5 * r) / math.sqrt(0.5))
    # the divisor keeps the init's scale: a plain average of independent inits would shrink it by 1/sqrt(2)
    assert abs(student.encoder[0].weight.std() / t.std() - 1) < 0.05


def test_locality_leaves_buffers_alone():
    teacher, fresh = _pair()
    teacher.encoder[1].running_mean.fill_(5.0)
    student = locality_init(teacher, fresh, 0.0)
    assert torch.count_nonzero(student.encoder[1].running_mean) == 0


def test_alpha_outside_unit_interval_is_rejected():
    with pytest.raises(UserError, match="alpha"):
        locality_init(*_pair(), 1.5)


# ------------------------------------------------------------------ the loss (§3, §4)

def test_loss_equals_hand_computed_cross_entropy(device):
    s = torch.tensor([[0.1, -0.3, 0.7], [1.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 0.2, -0.1], [0.0, 0.3, 0.3]])
    ce, kl, ent = distillation_loss(s.to(device), t.to(device))
    s64, t64 = s.double(), t.double()
    p_t = t64.exp() / t64.exp().sum(1, keepdim=True)
    log_p_s = s64 - s64.exp().sum(1, keepdim=True).log()
    assert ce.item() == pytest.approx(-(p_t * log_p_s).sum(1).mean().item(), rel=1e-6)
    assert kl.item() == pytest.approx((p_t * (p_t.log() - log_p_s)).sum(1).mean().item(), rel=1e-5)
    assert ent.item() == pytest.approx(-(p_t * p_t.log()).sum(1).mean().item(), rel=1e-6)


def test_kl_is_exact_where_ce_minus_entropy_is_lost_in_float32():
    # the authors' head: logits ~N(0, 0.02^2) over 2^16 outputs, a student a hair away from its teacher
    g = torch.Generator().manual_seed(0)
    t = 0.02 * torch.randn(4, 65536, generator=g)
    s = t + 1e-3 * torch.randn(4, 65536, generator=g)
    ce, kl, ent = distillation_loss(s, t)
    s64, t64 = s.double(), t.double()
    ref = (t64.softmax(1) * (t64.log_softmax(1) - s64.log_softmax(1))).sum(1).mean().item()
    assert ref == pytest.approx(5e-7, rel=0.2)   # ~Var(s - t) / 2
    assert kl.item() == pytest.approx(ref, rel=1e-3)


def _cache_setup():
    g = torch.Generator().manual_seed(0)
    teacher = make_model("resnet20", out_dim=512, generator=g).eval().requires_grad_(False)
    student = make_model("resnet20", out_dim=512, generator=g)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = dict(mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25))
    return teacher, student, x, data


def test_teacher_cache_gives_the_recomputed_loss_and_gradients(device):
    import distill
    teacher, student, x, data = _cache_setup()
    teacher, student, x = teacher.to(device), student.to(device), x.to(device)
    data = {k: v.to(device) for k, v in data.items()}
    idx = torch.tensor([3, 17, 5, 39, 0, 22], device=device)
    results = []
    for cache in (True, False):
        loss_fn = distill.make_loss(student, teacher, x, data, cache=cache)
        student.zero_grad()
        ce, stats = loss_fn(idx)
        ce.backward()
        results.append((ce, stats["kl"], stats["teacher_entropy"],
                        torch.cat([p.grad.flatten() for p in student.parameters()])))
    for cached, recomputed in zip(*results):
        torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-7)


def test_teacher_cache_refuses_a_teacher_changed_after_caching():
    import distill
    teacher, student, x, data = _cache_setup()
    loss_fn = distill.make_loss(student, teacher, x, data)
    loss_fn(torch.arange(4))
    with torch.no_grad():   # an EMA-style in-place update of the teacher after caching
        next(teacher.parameters()).mul_(0.99)
    with pytest.raises(RuntimeError, match="teacher changed"):
        loss_fn(torch.arange(4))


def test_compiled_loss_matches_eager():
    g = torch.Generator().manual_seed(0)
    t = 0.02 * torch.randn(4, 4096, generator=g)
    s = t + 1e-3 * torch.randn(4, 4096, generator=g)
    results = []
    for loss in (distillation_loss, common.compiled(distillation_loss, [(s.clone().requires_grad_(), t)])):
        s_ = s.clone().requires_grad_()
        out = loss(s_, t)
        out[0].backward()
        results.append((*out, s_.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    # the gradient is that of the soft-target cross-entropy: (softmax(s) - p_t) / B
    torch.testing.assert_close(results[0][3], (s.softmax(1) - t.softmax(1)) / 4)


# ------------------------------------------------------------------ probes (§3, App. C.1)

def test_knn_probe_matches_hand_computation_for_both_metrics(device):
    train = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [-1.0, 0.0]], device=device)
    labels = torch.tensor([0, 0, 1, 1, 2], device=device)
    test = torch.tensor([[0.0, 1.5], [2.0, 0.1]], device=device)
    # k=3, L2: test0 neighbours = points 0, 1 (d=0.5) and point 2 or 4 (d=1.80) -> class 0 has 2 votes
    #          test1 neighbours = points 2, 3 (d=1.00) and point 0 (d=2.19) -> votes {1: 2, 0: 1} -> 1
    assert knn_probe(train, labels, test, torch.tensor([0, 1], device=device), k=3, metric="l2") == 1.0
    # cosine, T=0.07: test1 ~ (1, 0.05): sims 0.05, 0.05, 0.9988, 0.9988, -0.9988 over k=3 ->
    # classes 1, 1, and one of the 0-class points -> 1; test0 = (0, 1): 1, 1, 0 -> class 0 wins
    assert knn_probe(train, labels, test, torch.tensor([0, 1], device=device), k=3, metric="cosine") == 1.0
    # tie: k=2 with one neighbour of class 1 and one of class 2 -> the lower class index wins
    tie_train, tie_y = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], device=device), torch.tensor([2, 1], device=device)
    assert knn_probe(tie_train, tie_y, torch.zeros(1, 2, device=device), torch.tensor([1], device=device), k=2,
                     metric="l2") == 1.0
    # cosine weights break the L2 tie: the nearer-in-angle neighbour dominates
    q = torch.tensor([[0.9, 0.1]], device=device)
    assert knn_probe(tie_train, tie_y, q, torch.tensor([2], device=device), k=2, metric="cosine") == 1.0


def test_linear_probe_separates_linearly_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(5, 32, generator=g)
    # 20k samples: 790 AdamW steps of the 10-epoch protocol (CIFAR-10's 50k give 1960)
    y_tr, y_te = torch.arange(20000) % 5, torch.arange(500) % 5
    f_tr = centers[y_tr] + torch.randn(20000, 32, generator=g)
    f_te = centers[y_te] + torch.randn(500, 32, generator=g)
    assert linear_probe(f_tr, y_tr, f_te, y_te) >= 0.95
    assert linear_probe(f_tr, y_tr, f_te, y_te, standardize=True) >= 0.95
    shuffled = y_tr[torch.randperm(20000, generator=g)]   # labels carry no signal -> chance
    assert linear_probe(f_tr, shuffled, f_te, y_te) < 0.4


def test_batched_linear_probes_equal_separate_ones(device):
    g = torch.Generator().manual_seed(0)
    f_tr, f_te = torch.randn(3, 200, 16, generator=g), torch.randn(3, 80, 16, generator=g)
    y_tr, y_te = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (80,), generator=g)
    f_tr[[0, 2], :, 0] += 3 * y_tr   # probes 0 and 2 can learn, probe 1 sees noise only
    f_te[[0, 2], :, 0] += 3 * y_te
    f_tr, f_te, y_tr, y_te = (t.to(device) for t in (f_tr, f_te, y_tr, y_te))
    batched = linear_probe(f_tr, y_tr, f_te, y_te, 4, epochs=5, batch_size=32, seed=5)
    assert batched == [linear_probe(f_tr[i], y_tr, f_te[i], y_te, 4, epochs=5, batch_size=32, seed=5) for i in range(3)]
    assert batched[0] > batched[1]


def test_linear_probe_of_overflowing_features_is_nan_not_chance():
    g = torch.Generator().manual_seed(0)
    f_tr, f_te = torch.randn(3, 200, 16, generator=g), torch.randn(3, 80, 16, generator=g)
    y_tr, y_te = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (80,), generator=g)
    alone = [linear_probe(f_tr[i], y_tr, f_te[i], y_te, 4, epochs=2, batch_size=32) for i in range(3)]
    f_te[1, 7, 3] = float("inf")   # one overflowed feature of probe 1 (a landscape point far off its anchors)
    f_tr[2, 5, 0] = float("nan")   # probe 2 trains on a NaN: its weights diverge
    batched = linear_probe(f_tr, y_tr, f_te, y_te, 4, epochs=2, batch_size=32)
    assert batched[0] == alone[0] and math.isnan(batched[1]) and math.isnan(batched[2])
    assert math.isnan(linear_probe(f_tr[1], y_tr, f_te[1], y_te, 4, epochs=2, batch_size=32))


def test_probe_protocol_is_the_authors():
    # read from dinopl/probing.py and measured side by side (RESULTS.md, "Our probes against the
    # authors'"): Linear(embed, classes), AdamW at lr 1e-3 / weight decay 0.01, batch 256, 10 epochs,
    # raw features; k-NN: the 20 nearest in L2, the most frequent label among them (torch.mode)
    lin, knn = inspect.signature(linear_probe).parameters, inspect.signature(knn_probe).parameters
    assert [lin[k].default for k in ("epochs", "lr", "weight_decay", "batch_size", "standardize")] == \
        [10, 1e-3, 0.01, 256, False]
    assert (knn["k"].default, knn["metric"].default) == (20, "l2")
    g = torch.Generator().manual_seed(0)
    f_tr, f_te = torch.randn(400, 8, generator=g), torch.randn(100, 8, generator=g)
    y_tr, y_te = torch.randint(0, 3, (400,), generator=g), torch.randint(0, 3, (100,), generator=g)
    nearest = torch.cdist(f_te, f_tr).topk(20, largest=False).indices
    theirs = (y_tr[nearest].mode(1).values == y_te).float().mean().item()
    assert knn_probe(f_tr, y_tr, f_te, y_te) == pytest.approx(theirs)


def test_linear_probe_is_deterministic_per_seed():
    f, y = torch.randn(300, 16), torch.arange(300) % 3
    assert linear_probe(f, y, f, y, seed=5) == linear_probe(f, y, f, y, seed=5)


# ------------------------------------------------------------------ data

def test_fake_dataset_shapes_and_normalization():
    data = common.load_dataset("fake", "unused", "cpu")
    assert data["x_train"].shape == (512, 3, 32, 32) and data["x_train"].dtype == torch.uint8
    assert data["x_test"].shape == (256, 3, 32, 32) and data["num_classes"] == 10
    x = common.normalize(data["x_train"], data)
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_balanced_subset_takes_equal_counts_per_class():
    y = torch.arange(1000) % 10
    idx = common.balanced_subset(y, 200, torch.Generator().manual_seed(0))
    assert len(idx) == 200 and len(set(idx.tolist())) == 200
    assert torch.bincount(y[idx]).tolist() == [20] * 10
    with pytest.raises(UserError):
        common.balanced_subset(y, 205, torch.Generator())


def test_imagefolder_is_decoded_once_and_cached(tmp_path, monkeypatch):
    for split, n in [("train", 3), ("test", 2)]:
        for c in ["cat", "ant"]:
            os.makedirs(tmp_path / split / c)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i + (100 if c == "cat" else 0),) * 3).save(
                    tmp_path / split / c / f"{i}.jpg", quality=100)
    data = common.load_dataset("imagefolder", str(tmp_path), "cpu")
    assert data["x_train"].shape == (6, 3, 8, 8) and data["x_test"].shape == (4, 3, 8, 8)
    assert data["y_train"].tolist() == [0, 0, 0, 1, 1, 1] and data["num_classes"] == 2   # ant, cat
    assert abs(int(data["x_train"][4, 0, 0, 0]) - 140) <= 2
    assert (tmp_path / "imagefolder-train.uint8.pt").exists()
    def no_decoding(*args):   # the second load reads the cache only
        raise AssertionError("decoded again")
    monkeypatch.setattr(common.Image, "open", no_decoding)
    assert torch.equal(common.load_dataset("imagefolder", str(tmp_path), "cpu")["x_train"], data["x_train"])


def test_missing_dataset_names_the_expected_files(tmp_path):
    with pytest.raises(UserError, match="imagefolder"):
        common.load_dataset("imagefolder", str(tmp_path), "cpu")
    with pytest.raises(UserError, match="unknown dataset"):
        common.load_dataset("mnist", str(tmp_path), "cpu")


def test_resize_for_transfer_keeps_dtype_and_range():
    data = common.load_dataset("fake", "unused", "cpu", img_size=64)
    assert data["x_train"].shape == (512, 3, 64, 64) and data["x_train"].dtype == torch.uint8


@pytest.mark.skipif(not os.path.exists(SHARED_DATA), reason="real CIFAR-10 (../shared/data) not present")
def test_real_cifar10_imagefolder(tmp_path):
    with tarfile.open(SHARED_DATA) as tar:
        tar.extractall(tmp_path, filter="data")
    data = common.load_dataset("imagefolder", str(tmp_path / "cifar10-jpeg"), "cpu")
    assert data["x_train"].shape == (50000, 3, 32, 32) and data["x_test"].shape == (10000, 3, 32, 32)
    assert torch.bincount(data["y_train"]).tolist() == [5000] * 10
    # channel statistics of the decoded training set, as measured in ../shared/data/README.md
    assert data["mean"].flatten().tolist() == pytest.approx([0.4913, 0.4821, 0.4465], abs=2e-3)
    assert data["std"].flatten().tolist() == pytest.approx([0.2452, 0.2428, 0.2606], abs=2e-3)


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_roundtrip_with_weights_only(tmp_path):
    model = make_model("resnet20", out_dim=32, generator=torch.Generator().manual_seed(0))
    config = dict(arch="resnet20", out_dim=32, bottleneck="011110", norm=None, img_size=32)
    path = str(tmp_path / "m.pt")
    common.atomic_save(dict(config=config, student=model.state_dict()), path)
    assert os.listdir(tmp_path) == ["m.pt"]   # no temp file left behind
    ckpt = torch.load(path, weights_only=True)
    loaded = common.model_from_checkpoint(ckpt, "student")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ckpt["config"]["arch"] = "vgg11"
    with pytest.raises(UserError, match="do not fit"):
        common.model_from_checkpoint(ckpt, "student")


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        common.load_checkpoint(str(tmp_path / "bad.pt"))


# ------------------------------------------------------------------ numerics (--precision)

@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("auto", torch.float32),
                                             ("bf16", torch.bfloat16)])
def test_each_precision_gives_the_activation_dtype_it_promises(precision, dtype):
    try:
        common.setup_device("cpu", precision)
        conv, linear = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)
        with common.autocast("cpu"):
            h = conv(torch.randn(2, 3, 8, 8))
            out = linear(h.mean((2, 3)))
        assert h.dtype == dtype and out.dtype == dtype
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        common.setup_device("cpu", "fp32")


@pytest.mark.parametrize("precision", ["tf32", "tf32-conv"])
def test_tf32_is_refused_without_cuda(precision):
    with pytest.raises(UserError, match=f"{precision} needs a CUDA device"):
        common.setup_device("cpu", precision)


@pytest.mark.parametrize("precision,conv,matmul,resolved", [("auto", True, False, "tf32-conv"),
                                                            ("tf32-conv", True, False, "tf32-conv"),
                                                            ("tf32", True, True, "tf32"), ("fp32", False, False, "fp32")])
def test_cuda_auto_is_the_authors_numerics_and_tf32_covers_the_matmuls(precision, conv, matmul, resolved):
    # the flags only (no GPU needed): auto = TF32 convolutions and fp32 matmuls, as the authors' runs;
    # tf32 puts the head's Linear layers (16% of a VGG11 step) on TF32 too
    try:
        assert common.set_precision(precision, "cuda") == resolved
        assert torch.backends.cudnn.allow_tf32 == conv and torch.backends.cuda.matmul.allow_tf32 == matmul
    finally:
        common.set_precision("fp32", "cpu")


def test_loss_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    t = 0.02 * torch.randn(4, 4096, generator=g)
    s = (t + 1e-3 * torch.randn(4, 4096, generator=g)).requires_grad_()
    exact = distillation_loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = distillation_loss(s, t)
    for a, b in zip(exact, under):
        assert b.dtype == torch.float32 and b.item() == a.item()   # CE ~ 8.3 would round to 8.3125 in bf16
