"""CUDA's device rules checked on a CPU: torch's FakeTensorMode gives tensors a `cuda` device without
a GPU and raises on a device mix as CUDA would, so the steps where tensors from several sources meet
are tested here, in CI, before any GPU runs them."""
import copy
import types

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import common
from conftest import load_script


def test_landscape_stacks_three_models_of_which_only_the_first_is_on_the_gpu():
    landscape = load_script("landscape")
    models = [nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in range(3)]
    params = [dict(m.named_parameters()) for m in models]
    buffers = [dict(m.named_buffers()) for m in models]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        # what landscape.main holds: the first model moved to the device, the other two still on the CPU
        params[0] = {k: mode.from_tensor(v).to("cuda") for k, v in params[0].items()}
        buffers[0] = {k: mode.from_tensor(v).to("cuda") for k, v in buffers[0].items()}
        for pts in (params, buffers):   # --buffers first and --buffers interpolate
            stacked = landscape.stack_points(pts, torch.device("cuda"))
            assert all(v.device.type == "cuda" and v.shape[0] == 3 for v in stacked.values())
        with pytest.raises(RuntimeError, match="same device"):   # what the old one-line stack did
            torch.stack([pts["0.weight"].detach() for pts in params])


def test_checkpoints_written_from_the_gpu_hold_cpu_tensors():
    with FakeTensorMode():
        state = dict(step=3, student={"w": torch.ones(2, device="cuda")},
                     optimizer={"state": {0: {"exp_avg": torch.zeros(2, device="cuda")}}, "param_groups": [{"lr": 1e-3}]},
                     metrics=[{"step": 3}], pair=(torch.ones(1, device="cuda"), 2))
        cpu = common.to_cpu(state)
    assert cpu["student"]["w"].device.type == "cpu" and cpu["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert cpu["pair"][0].device.type == "cpu" and cpu["pair"][1] == 2 and cpu["metrics"] == [{"step": 3}]


def test_a_rank_with_no_images_in_the_last_batch_adds_nothing_and_no_nan(monkeypatch):
    # torchrun --nproc_per_node=2 with batch 511 on 512 images: the last batch has one image, rank 1 none;
    # its loss was the mean of an empty tensor (NaN) and stopped the run as "non-finite"
    monkeypatch.setattr(common, "world", lambda: (1, 2))
    monkeypatch.setattr(common.dist, "all_reduce", lambda t: None)   # rank 1 alone: what it adds to the sum
    model = nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3)
    loss_fn = lambda idx: (model(x[idx]).square().mean(), {"n": torch.tensor(float(len(idx)))})
    means = common.train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, [torch.tensor([3])])
    assert means == {"loss": 0.0, "n": 0.0}   # weight 0: rank 0 carries the whole batch
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # a zero gradient


def test_device_cuda_n_becomes_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d).index))
    assert common.setup_device("cuda:1", "fp32") == torch.device("cuda", 1) and chosen == [1]
    with pytest.raises(common.UserError, match="cuda:2: this machine has 2 CUDA device"):
        common.setup_device("cuda:2", "fp32")


def test_the_loss_is_compiled_for_the_local_batch_and_the_dtype_that_run(monkeypatch):
    # under torchrun a rank runs a slice of the global batch, under bf16 the logits are bf16: a trial
    # compile at the global batch in fp32 would compile shapes that never come and recompile at step 1
    monkeypatch.setattr(common, "world", lambda: (1, 3))
    assert common.local_batch_sizes({256, 1}) == [1, 85]   # 256 = 86 + 85 + 85; a lone image: rank 1 runs 1 (weight 0)
    distill = load_script("distill")
    seen = []
    monkeypatch.setattr(distill, "compiled", lambda fn, examples: seen.extend(examples) or fn)
    common.set_precision("bf16", "cpu")
    teacher = common.make_model("resnet20", 64, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    data = dict(mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    monkeypatch.setattr(common, "world", lambda: (0, 1))
    distill.make_loss(teacher, teacher, x, data, cache=False, compile_batches=[3])
    assert [(tuple(s.shape), s.dtype) for s, t in seen] == [((3, 64), torch.bfloat16)]


def fake_cuda(module, mode):
    """The module with every parameter and buffer replaced by a fake CUDA copy (what .to("cuda") does;
    Module.to itself cannot swap tensors under FakeTensorMode). Called outside the mode."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                fake = mode.from_tensor(p.detach())
                with mode:
                    m._parameters[name] = nn.Parameter(fake.to("cuda"), p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                fake = mode.from_tensor(b)
                with mode:
                    m._buffers[name] = fake.to("cuda")
    return module


def test_resident_batches_teacher_codes_loss_and_probe_features_stay_on_the_device(monkeypatch):
    distill = load_script("distill")
    # fake tensors cannot be deep-copied into the same fake mode: the cached teacher's last layer is
    # shared instead (the authors' head has no weight norm to fold into it, so nothing is modified)
    monkeypatch.setattr(distill, "copy", types.SimpleNamespace(deepcopy=copy.copy))
    g = torch.Generator().manual_seed(0)
    teacher = common.make_model("resnet20", 64, "authors", generator=g).eval().requires_grad_(False)
    student = common.make_model("resnet20", 64, "authors", generator=g)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    mode = FakeTensorMode()
    teacher, student, x = fake_cuda(teacher, mode), fake_cuda(student, mode), mode.from_tensor(x)
    with mode:
        x = x.to("cuda")   # the resident data
        data = dict(mean=torch.full((1, 3, 1, 1), 0.5, device="cuda"), std=torch.full((1, 3, 1, 1), 0.25, device="cuda"))
        for cache in (True, False):
            loss_fn = distill.make_loss(student, teacher, x, data, cache=cache)   # teacher codes cached on the device
            idx = distill.step_batches(8, 4, seed=0, first=0, last=1, device=torch.device("cuda"))[0]
            ce, stats = loss_fn(idx)   # index slices of the resident data, the loss on the device
            # (the backward needs a CUDA runtime even for fake tensors: gpu_check.py runs it on a GPU)
            assert ce.device.type == stats["kl"].device.type == "cuda"
        features = common.extract_features(student.encoder, x, data, device=torch.device("cuda"))   # probe inputs
        assert features.device.type == "cuda" and features.shape == (8, 64)


def test_imp_masks_and_lmc_paths_combine_tensors_on_the_device():
    imp, lmc = load_script("imp"), load_script("lmc")
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}
    mode = FakeTensorMode()
    model, masks = fake_cuda(model, mode), {k: mode.from_tensor(v) for k, v in masks.items()}
    with mode:
        # what imp.main does with the masks of a loaded state (saved as CPU tensors)
        imp.apply_masks(model, {k: v.to("cuda") for k, v in masks.items()})
        state_i = {k: v.clone() for k, v in model.state_dict().items()}
        state_j = {k: 2 * v if v.is_floating_point() else v for k, v in state_i.items()}
        path = lmc.interpolate(state_i, state_j, 0.25)
        assert all(v.device.type == "cuda" for v in path.values())
