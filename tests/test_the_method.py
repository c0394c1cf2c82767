"""The method, end to end in one step: read this first to copy it (§4, App. A).

A random teacher, frozen; a student initialized from it at locality alpha; both with the paper's
head (MLP 512-2048-2048, the L2 bottleneck to 256-d, a weight-normalized layer to 2^16 outputs);
the same un-augmented image to both; the cross-entropy between their softmaxes; one AdamW step on
the student only. distill.py runs exactly this, through `make_loss`, which by default caches the
teacher's 256-d codes once (the teacher never changes). This test shows the cached step is the
recomputed-teacher step, and that the loss is the formula of App. A."""
import copy

import torch

import distill
from common import flat_params, locality_init, make_model, normalize


def test_one_distillation_step_with_the_cached_teacher_is_the_step_with_the_teacher_recomputed():
    # teacher and student: same architecture, independent seeds, then the student mixed toward the teacher
    teacher = make_model("resnet20", out_dim=4096, generator=torch.Generator().manual_seed(0))
    student = make_model("resnet20", out_dim=4096, generator=torch.Generator().manual_seed(1))
    locality_init(teacher, student, alpha=0.5)   # alpha = 0.5: the two differ, so the step is not ~0
    teacher.eval().requires_grad_(False)         # frozen, BN in eval mode (App. E.3)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = dict(mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25))
    batch = torch.tensor([5, 0, 33, 17, 41, 8, 12, 29])

    # App. A's pseudo-code, written out: target = softmax(teacher(x)), loss = -sum target * log softmax(student(x))
    x = normalize(images[batch], data)
    with torch.no_grad():
        target = teacher(x).softmax(-1)
    by_hand = -(target * copy.deepcopy(student).train()(x).log_softmax(-1)).sum(-1).mean()

    stepped = []
    for cache in (True, False):
        s = copy.deepcopy(student).train()
        # AdamW, lr 1e-3, constant; no weight decay (App. E.4; torch's default 0.01 would decay every weight)
        optimizer = torch.optim.AdamW(s.parameters(), lr=1e-3, weight_decay=0.0)
        loss_fn = distill.make_loss(s, teacher, images, data, cache=cache)
        loss, stats = loss_fn(batch)
        torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
        assert 0 < stats["kl"] < loss.item()   # KL(p_t || p_s) = CE - H(p_t) > 0 when the two differ
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stepped.append(flat_params(s))
    cached, recomputed = stepped
    moved = (cached - flat_params(student)).abs()
    assert moved.max() > 1e-4   # the step did something: Adam moves every weight with a gradient by ~lr
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-6)
    torch.testing.assert_close(flat_params(teacher), flat_params(make_model(
        "resnet20", out_dim=4096, generator=torch.Generator().manual_seed(0))), rtol=0, atol=0)   # never trained
