"""Random-teacher distillation (Sarnthein et al., ICML 2023, §4, Fig. 1, Table 1).

A student is trained to match the outputs of a *randomly initialized, frozen* teacher of the same
architecture: no labels, no augmentation, the same image to both networks. Probing the encoders
(linear and k-NN, §3) shows the student's features beat its teacher's and the raw input's.

    python distill.py --arch vgg11 --alpha 1e-10                  # Table 1 / Fig. 1 (right), CIFAR-10
    python distill.py --arch resnet18 --alpha 1e-10               # Fig. 1 (left)
    python distill.py --arch vgg11 --alpha 0.5                    # one point of Fig. 3 (locality)
    python distill.py --arch vgg11 --dataset gaussian --n-samples 5000   # Fig. 4, noise inputs
    python distill.py --arch vgg11 --teacher-ckpt runs/X/last.pt  # restart, App. D.1 / Fig. 18
    python distill.py --arch vgg11 --dataset fake --epochs 2 --out runs/dry   # a CPU dry run
    torchrun --nproc_per_node=8 distill.py --arch resnet18  # data-parallel, global batch --batch-size

Offline, point an ImageFolder tree at it: `--dataset imagefolder --data-root cifar10-jpeg`.
Rerunning the same command resumes from `<out>/last.pt`.
"""
import argparse
import copy
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (ARCHS, BOTTLENECKS, DATASETS, NOISE, NORMS, NonFiniteLoss, UserError, add_precision_arg,
                    activation_dtype, append_jsonl, arg_parser, at_least, atomic_save, autocast, balanced_subset,
                    check_run_kind, check_same_data, compiled, data_record, distillation_loss, epoch_batches,
                    extract_features, flat_params, gather_rows, gaussian_inputs, knn_probe, linear_probe,
                    load_checkpoint, load_dataset, local_batch_sizes, locality_init, make_encoder, make_model,
                    model_from_checkpoint, normalize, open_run_dir, parse_bottleneck, positive, probe_subset,
                    provenance_segment, pyplot, read_jsonl, release_run_dir, resume_precision, run_main, save_figure,
                    seed_type, set_precision, setup_device, shard, train_steps, use_channels_last, weights_version,
                    world, write_args, write_json, write_jsonl, write_provenance, write_text)


# `--precision auto` on a CPU with native bf16 (AMX or AVX512-BF16): bf16, by the rule "the fastest
# setting whose first 1000 steps match fp32's within probe noise", measured for VGG11 (both heads)
# and ResNet20 (BatchNorm) on an AMX Xeon and an AVX512-BF16 EPYC: RESULTS.md, 'Numerics'.
# On CUDA auto stays the authors' numerics (TF32 convolutions).
CPU_AUTO_PRECISION = "bf16"

def parse_args(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--arch", default="vgg11", help=f"encoder, one of: {', '.join(ARCHS)}")
    p.add_argument("--alpha", type=float, default=1e-10,
                   help="locality of the student init (§4): 0 = the teacher's weights, 1 = an independent "
                        "init. The paper uses 1e-10: in float32 the teacher's weights but for rounding (locality_init)")
    p.add_argument("--dataset", default="cifar10",
                   help=f"distillation data, one of: {', '.join([*DATASETS, NOISE])} "
                        f"('{NOISE}': N(0,1) noise shaped like --probe-dataset, Fig. 4)")
    p.add_argument("--probe-dataset", default=None,
                   help="labelled data for probing (default: --dataset, or cifar10 for gaussian); "
                        "resized to the distillation resolution (transfer, Tables 2/4)")
    p.add_argument("--data-root", default="data", help="where datasets live / are downloaded to")
    p.add_argument("--probe-data-root", default=None,
                   help="where --probe-dataset lives, when not under --data-root (e.g. the probe half of a "
                        "--split-classes tree: transfer to unseen classes)")
    p.add_argument("--split-classes", nargs=2, metavar=("N", "DEST"), default=None,
                   help="only cut the ImageFolder tree at --data-root by class and exit: DEST/distill gets "
                        "the first N classes, DEST/probe the others (a transfer task within one dataset)")
    p.add_argument("--epochs", type=at_least(1), default=100, help="paper: 100 (its curves run to 150)")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="train for this many optimizer steps instead of --epochs (a budget that holds "
                        "the number of updates fixed across dataset sizes, Fig. 4)")
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--lr", type=positive(), default=1e-3, help="AdamW, constant (App. E.4)")
    p.add_argument("--adam-eps", type=positive(), default=1e-8,
                   help="AdamW's eps (torch's default, the authors'). Near alpha=0 the gradients are far "
                        "below it, so it sets the early step size (README, 'the authors' head')")
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=0.0,
                   help="on >=2-D weights; paper: none (App. E.4)")
    p.add_argument("--bias-decay", type=at_least(0.0, float), default=0.0,
                   help="on biases and norm params; the authors' runs kept AdamW's default 0.01 here")
    p.add_argument("--n-samples", type=at_least(1), default=None,
                   help="class-balanced subset of the distillation set (Fig. 4); probing uses the full sets")
    p.add_argument("--out-dim", type=at_least(1), default=65536,
                   help="softmax width m (Fig. 10, which starts at m = 1: a constant softmax, no gradient); paper: 2^16")
    p.add_argument("--bottleneck", default="paper",
                   help="L2 bottleneck as bits wn1 lin1 fn1 wn2 lin2 fn2 (Fig. 12), or 'paper' (=011110, "
                        "weight-normalized last layer as App. A writes it) or 'authors' (=011010, what "
                        "produced the paper's tables: the last layer's weight norm had no effect)")
    p.add_argument("--norm", default=None, choices=NORMS,
                   help="swap the encoder's norm layers (Fig. 11); default: the arch's own")
    p.add_argument("--teacher-seed", type=seed_type, default=0, help="seed of the random teacher theta_T")
    p.add_argument("--student-seed", type=seed_type, default=1, help="seed of the fresh init theta_R mixed in by alpha")
    p.add_argument("--seed", type=seed_type, default=0, help="data order, subsets and probe seeds")
    p.add_argument("--teacher-ckpt", default=None,
                   help="restart (App. D.1): this run's trained student becomes the frozen teacher")
    p.add_argument("--probe-every", type=at_least(1), default=5, help="probe every N epochs (and at the last step)")
    p.add_argument("--probe-steps", type=at_least(1), nargs="+", default=[], metavar="STEP",
                   help="also probe after these optimizer steps (e.g. 1 2 5 10 20 50 100 250 500 1000: "
                        "the early dynamics near alpha=0)")
    p.add_argument("--knn-k", type=at_least(1), default=20, help="k of the k-NN probe (App. C.1)")
    p.add_argument("--probe-samples", type=at_least(10), nargs="+", default=None, metavar=("N_TRAIN", "N_TEST"),
                   help="cap the probe train (and test, default the same) splits, for quick CPU runs")
    p.add_argument("--out", default=None, help="run directory (default: runs/<arch>_a<alpha>_<dataset>; "
                                               "with --plot: runs)")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="only draw the sweep summaries (Fig. 3, 4, 10, 11, 12, 17, 18) of these finished runs")
    add_precision_arg(p, CPU_AUTO_PRECISION)
    p.add_argument("--compile", default="loss", choices=["none", "loss", "all"],
                   help="torch.compile the loss (fuses its 65536-wide passes) or also the student (README, bench.py)")
    p.add_argument("--channels-last", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory format for networks and images; auto: on under bf16 on a CPU (faster there)")
    p.add_argument("--recompute-teacher", action="store_true",
                   help="run the teacher's forward every step instead of caching its codes once (same loss)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.plot:
        return args
    if args.split_classes is not None and not args.split_classes[0].isdigit():
        p.error(f"--split-classes takes N DEST, N a number of classes; got {args.split_classes[0]!r}")
    if args.probe_samples is not None and len(args.probe_samples) > 2:
        p.error("--probe-samples takes N_TRAIN [N_TEST]")
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.arch not in ARCHS:
        p.error(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    if args.dataset not in [*DATASETS, NOISE]:
        p.error(f"unknown --dataset {args.dataset!r}; choose from {', '.join([*DATASETS, NOISE])}")
    if args.probe_dataset is not None and args.probe_dataset not in DATASETS:
        p.error(f"unknown --probe-dataset {args.probe_dataset!r}; choose from {', '.join(DATASETS)}")
    try:
        parse_bottleneck(args.bottleneck)
    except UserError as e:
        p.error(str(e))
    args.bottleneck = BOTTLENECKS.get(args.bottleneck, args.bottleneck)
    args.probe_steps = sorted(set(args.probe_steps))
    args.out = args.out or f"runs/{args.arch}_a{args.alpha:g}_{args.dataset}"
    return args


def probe_dataset(args):
    """The labelled data a run probes on: --probe-dataset, else the distillation set (cifar10 for noise)."""
    return args.get("probe_dataset") or (args["dataset"] if args["dataset"] != NOISE else "cifar10")


def split_classes(root, n_first, dest):
    """Two ImageFolder trees cut from the one at `root` by class (App. B's transfer, Tables 2/4, within
    one dataset): dest/distill holds the first `n_first` classes (sorted, as ImageFolder labels them)
    of train/ and test/, dest/probe the others. A class folder is a symlink to the original: nothing
    is copied, and each tree's decoded cache is its own (its file list differs from the full tree's)."""
    from torchvision.datasets.folder import find_classes
    try:
        classes, _ = find_classes(os.path.join(root, "train"))
        if find_classes(os.path.join(root, "test"))[0] != classes:
            raise UserError(f"--data-root {root}: train/ and test/ have different class folders")
    except FileNotFoundError:
        raise UserError(f"--data-root {root} is no ImageFolder tree (ROOT/train/<class>, ROOT/test/<class>)") from None
    if not 0 < n_first < len(classes):
        raise UserError(f"--split-classes {n_first}: the tree has {len(classes)} classes; N must leave both halves one")
    halves = dict(distill=classes[:n_first], probe=classes[n_first:])
    for half, names in halves.items():
        for split in ("train", "test"):
            os.makedirs(os.path.join(dest, half, split), exist_ok=True)
            for c in names:
                link, target = os.path.join(dest, half, split, c), os.path.realpath(os.path.join(root, split, c))
                if os.path.lexists(link) and os.path.realpath(link) != target:
                    raise UserError(f"--split-classes: {link} exists and is not a link to {target}; pick another DEST")
                if not os.path.lexists(link):
                    os.symlink(target, link)
        stray = set(os.listdir(os.path.join(dest, half, "train"))) - set(names)
        if stray:
            raise UserError(f"--split-classes: {dest}/{half}/train has other class folders "
                            f"({', '.join(sorted(stray))}); pick another DEST")
    for half, names in halves.items():
        print(f"{dest}/{half}: {len(names)} classes ({', '.join(names)})")
    return halves


# A rerun may change these and still resume; any other difference means another experiment.
RESUMABLE = {"epochs", "steps", "device", "probe_every", "probe_steps", "out", "data_root", "probe_data_root",
             "compile", "channels_last", "recompute_teacher", "plot"}


# ============ the teacher-student loss (§3, §4) ============
# The frozen random teacher sees un-augmented images, so its output for an image never changes:
# its 256-d bottleneck code z is computed once per run, and a step runs only its last layer
# (weight norm folded in once) -- the teacher's encoder forward disappears from training.

@torch.no_grad()
def teacher_codes(teacher, x, data, batch_size=1024):
    """z = head.bottleneck(encoder(x)) of every distillation image ([N, 256], on the device)."""
    codes = []
    for xb in shard(x).split(batch_size):   # under torchrun each rank computes its rows
        with autocast(x.device):
            codes.append(teacher.head.bottleneck(teacher.encoder(normalize(xb, data))))
    return gather_rows(torch.cat(codes), len(x))


def make_loss(student, teacher, x_distill, data, cache=True, compile_batches=()):
    """loss(idx) -> (cross-entropy, stats) for the distillation images x_distill[idx]: the same
    image to both networks (no augmentation), the teacher frozen, the loss H(p_t, p_s) of
    `distillation_loss`, torch.compiled for batches of `compile_batches` sizes (fusing its
    2^16-wide passes). A teacher whose weights change after its codes were cached (an EMA
    update, say) raises instead of being served stale codes."""
    criterion = distillation_loss
    if compile_batches:   # tried on the logits' shapes and dtype as they will come (bf16 under autocast)
        g, m, dtype = torch.Generator().manual_seed(0), teacher.head.out_dim, activation_dtype()
        examples = [(torch.randn(b, m, generator=g).to(x_distill.device, dtype).requires_grad_(),
                     torch.randn(b, m, generator=g).to(x_distill.device, dtype)) for b in compile_batches]
        criterion = compiled(distillation_loss, examples)
    codes = teacher_codes(teacher, x_distill, data) if cache else None
    if cache:
        last_layer = copy.deepcopy(teacher.head)
        if last_layer.lin2 is not None and last_layer.lin2.weight_norm:   # ||V_:,i|| = 1 (App. A), once
            with torch.no_grad():
                last_layer.lin2.weight.copy_(F.normalize(last_layer.lin2.weight, dim=1))
            last_layer.lin2.weight_norm = False
    version = weights_version(teacher)

    def loss(idx):
        x = normalize(x_distill[idx], data)
        with torch.no_grad():
            if codes is None:
                t = teacher(x)
            elif weights_version(teacher) != version:
                raise RuntimeError("the teacher changed after its outputs were cached; use --recompute-teacher")
            else:
                t = last_layer.project(codes[idx])
        ce, kl, entropy = criterion(student(x), t)
        return ce, dict(kl=kl, teacher_entropy=entropy)
    return loss


# ============ what the metrics rows hold ============

def embed(encoder, probe_data):
    """Encoder features of the probe train and test images. Under torchrun each rank embeds its
    slice of the images and every rank gets all of them."""
    device = probe_data["x_train"].device
    return tuple(gather_rows(extract_features(encoder, shard(x), probe_data, device=device), len(x))
                 for x in (probe_data["x_train"], probe_data["x_test"]))


def probe(features, probe_data, knn_k, seed):
    """Linear (raw and standardized) and k-NN (L2 and cosine) probes of features (§3, App. C.1)."""
    f_train, f_test = features
    y_train, y_test, c = probe_data["y_train"], probe_data["y_test"], probe_data["num_classes"]
    # raw features are the paper's probe; standardized ones (train mean/std) were probed too by the authors
    return dict(linear=linear_probe(f_train, y_train, f_test, y_test, c, seed=seed),
                linear_std=linear_probe(f_train, y_train, f_test, y_test, c, seed=seed, standardize=True),
                knn=knn_probe(f_train, y_train, f_test, y_test, k=knn_k, metric="l2", num_classes=c),
                knn_cos=knn_probe(f_train, y_train, f_test, y_test, k=knn_k, metric="cosine", num_classes=c))


@torch.no_grad()
def representation_stats(model, x, data):
    """What says whether a student collapsed (README, 'the authors' head'): the embedding norm,
    the spread across images (std over images, mean over dims) of the code z and of the logits,
    and per ReLU call the fraction of channels that fire on none of these images (per call, not per
    module: torchvision's residual blocks apply one nn.ReLU to tensors of different widths)."""
    fired = []   # one entry per ReLU call, in forward order; the encoder runs once below

    def hook(module, inputs, out):
        fired.append((out > 0).transpose(0, 1).flatten(1).any(1))
    hooks = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, nn.ReLU)]
    was_training = model.training
    model.eval()
    with autocast(x.device):
        features = model.encoder(normalize(x, data)).float()
        z = model.head.bottleneck(features).float()
        logits = model.head.project(z).float()
    model.train(was_training)
    for h in hooks:
        h.remove()
    return dict(embed_norm=features.norm(dim=1).mean().item(), code_std=z.std(0).mean().item(),
                logit_std=logits.std(0).mean().item(),
                dead_relu=[round(1 - f.float().mean().item(), 4) for f in fired])


@torch.no_grad()
def adam_update_stats(optimizer):
    """The last AdamW step, read off its state: u = m_hat / (sqrt(v_hat) + eps) per coordinate is
    the step in units of lr. Returns lr * ||u|| (the update's size), the fraction of coordinates
    moving at full lr (|u| > 0.5) and the fraction where sqrt(v_hat) < eps: there Adam is plain
    SGD with learning rate lr / eps (1e5 at the defaults)."""
    norm2, full, eps_bound, count = 0.0, 0, 0, 0
    for group in optimizer.param_groups:
        (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            step = float(state["step"])
            root_v = (state["exp_avg_sq"] / (1 - b2 ** step)).sqrt()
            u = (state["exp_avg"] / (1 - b1 ** step)) / (root_v + eps)
            norm2 += (lr * u).square().sum().item()
            full += (u.abs() > 0.5).sum().item()
            eps_bound += (root_v < eps).sum().item()
            count += u.numel()
    count = max(count, 1)
    return dict(update_norm=math.sqrt(norm2), full_lr_frac=full / count, eps_bound_frac=eps_bound / count)


def probe_points(start, total, steps_per_epoch, probe_every, probe_steps):
    """The steps after which the run probes and checkpoints: every `probe_every` epochs, the
    `--probe-steps`, and the last step."""
    every = range(probe_every * steps_per_epoch, total + 1, probe_every * steps_per_epoch)
    return sorted({s for s in [*every, *probe_steps, total] if start < s <= total})


def step_batches(n, batch_size, seed, first, last, device):
    """The index batches of global steps first .. last-1: epoch e (1-based) is the seeded
    permutation of `epoch_batches`, so a run cut anywhere resumes in the same order."""
    per_epoch = math.ceil(n / batch_size)
    batches = []
    for epoch in range(first // per_epoch + 1, (last - 1) // per_epoch + 2):
        offset = (epoch - 1) * per_epoch
        batches += epoch_batches(n, batch_size, seed, epoch, device)[max(first - offset, 0):last - offset]
    return batches


def distillation_data(args, device):
    """The distillation inputs (a balanced subset, or Gaussian noise for Fig. 4) and the probe data
    (its fixed probe subsets), resident on the device; and the record of what was read."""
    probe_name, probe_root = probe_dataset(vars(args)), args.probe_data_root or args.data_root
    distill_data = None   # whose normalization the distillation inputs get
    if args.dataset != NOISE and (args.dataset, args.data_root) != (probe_name, probe_root):
        distill_data = load_dataset(args.dataset, args.data_root, device)   # transfer (Tables 2/4)
    # the probe images at the distillation resolution (transfer: resized)
    probe_data = load_dataset(probe_name, probe_root, device, img_size=distill_data and distill_data["img_size"])
    data_read = data_record(*[d for d in (distill_data, probe_data) if d is not None])
    distill_data = distill_data or probe_data
    g = torch.Generator().manual_seed(args.seed)
    if args.dataset == NOISE:
        x_distill = gaussian_inputs(args.n_samples or len(probe_data["x_train"]), probe_data["img_size"], g).to(device)
    else:
        x_distill = distill_data["x_train"]
        if args.n_samples:
            x_distill = x_distill[balanced_subset(distill_data["y_train"], args.n_samples, g)]
    n_train, n_test = (args.probe_samples or [None])[0], (args.probe_samples or [None])[-1]   # N_TRAIN [N_TEST]
    x_train, y_train = probe_subset(probe_data["x_train"], probe_data["y_train"], n_train, args.seed)
    x_test, y_test = probe_subset(probe_data["x_test"], probe_data["y_test"], n_test, args.seed)
    probe_data = dict(probe_data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_distill, distill_data, probe_data, data_read


def open_run(args, device, master, world_size):
    """The run directory: one experiment (its args.json checked against these arguments), and the
    checkpoint it resumes from, or None."""
    if master:   # the defaults: what a run that predates a flag ran with
        open_run_dir(args.out, vars(args), RESUMABLE, "distill.py", defaults=vars(parse_args([])),
                     state_files=["last.pt"], write=False)   # args.json once the data and model are checked
    if world_size > 1:
        dist.barrier()
    last_path = os.path.join(args.out, "last.pt")
    ckpt = load_checkpoint(last_path) if os.path.exists(last_path) else None
    if ckpt is not None:   # a resumed run keeps the numerics it started with, whatever `auto` means now
        set_precision(resume_precision(args.out, args.precision, device, CPU_AUTO_PRECISION), device)
    return ckpt


def resume(ckpt, config, data_read, student, teacher, optimizer, steps_per_epoch, out, master):
    """Load a checkpoint's networks and optimizer; returns (step, best raw linear probe, the metrics rows
    up to it, its provenance segments): (0, -1, [], []) for a fresh run (ckpt None)."""
    if ckpt is None:
        return 0, -1.0, [], []
    last_path, metrics_path = os.path.join(out, "last.pt"), os.path.join(out, "metrics.jsonl")
    if ckpt["config"] != config:
        raise UserError(f"{last_path} is a {ckpt['config']}, this run builds {config}")
    check_same_data(ckpt.get("data"), data_read, last_path)   # same arguments, other (or edited) data
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    step, best = ckpt.get("step", ckpt["epoch"] * steps_per_epoch), ckpt["best"]
    if "metrics" in ckpt:   # the rows up to the checkpoint travel with it
        metrics = ckpt["metrics"]
    elif os.path.exists(metrics_path):   # a checkpoint older than that: rows past it are a killed tail
        metrics = [m for m in read_jsonl(metrics_path) if m.get("step", math.inf) <= step]
    else:
        raise UserError(f"{last_path} exists but {metrics_path} does not; restore it or pick another --out")
    if master:
        print(f"resuming {out} from step {step}")
    return step, best, metrics, ckpt.get("provenance", [])


def metrics_row(step, train_stats, student, theta0, probes, args, steps_per_epoch):
    """One probe point: the training statistics, the distance from init (App. D), and the student's
    and teacher's probes and collapse diagnostics on the fixed probe data (`probes`, built in main)."""
    epoch = step // steps_per_epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4)
    row = dict(step=step, epoch=epoch, **train_stats, dist_from_init=(flat_params(student) - theta0).norm().item())
    data = probes["data"]
    student_probe = probe(embed(student.encoder, data), data, args.knn_k, args.seed + step)
    # the teacher is re-probed with each point's seed: its curve shows the linear probe's own noise (Fig. 1)
    teacher_probe = probe(probes["teacher_features"], data, args.knn_k, args.seed + step)
    row.update({f"student_{k}": v for k, v in student_probe.items()})
    row.update({f"teacher_{k}": v for k, v in teacher_probe.items()})
    row.update({f"student_{k}": v for k, v in representation_stats(student, probes["x_diagnose"], data).items()})
    row.update({f"teacher_{k}": v for k, v in probes["teacher_stats"].items()})
    return row


@torch.no_grad()
def initial_losses(student, teacher, x_distill, distill_data, device, chunk=256):
    """The untrained student's loss on the first 2048 distillation images (step 0 of Fig. 17), in
    chunks: one 2048-image forward of ResNet50 at 32x32 holds ~9 GB on a CPU (OOM beside the probes)."""
    student.eval()
    x0, sums = x_distill[:2048], torch.zeros(3, dtype=torch.float64)
    for xb in x0.split(chunk):
        with autocast(device):
            xb = normalize(xb, distill_data)
            sums += torch.stack(distillation_loss(student(xb), teacher(xb))).double().cpu() * len(xb)
    ce, kl, entropy = (sums / len(x0)).tolist()   # the mean over all images, as one batch gives it
    return dict(ce=ce, kl=kl, teacher_entropy=entropy)


def input_probe(probe_data, args):
    """Table 1's input baseline: the probes of the flattened images, once per run."""
    flatten = make_encoder("flatten", img_size=probe_data["img_size"])
    return {f"input_{k}": v for k, v in probe(embed(flatten, probe_data), probe_data, args.knn_k, args.seed).items()}


def save_point(args, row, state, optimizer, metrics, segments, data_read, best):
    """The checkpoint first, then the row: metrics.jsonl never runs ahead of last.pt. Returns the best
    raw linear probe so far: its checkpoint is best.pt (the authors' selection)."""
    improved, best = row["student_linear"] > best, max(best, row["student_linear"])
    state = dict(state, best=best)
    atomic_save(dict(state, optimizer=optimizer.state_dict(), metrics=metrics, provenance=segments),
                os.path.join(args.out, "last.pt"))   # the resume point
    if improved:
        atomic_save(state, os.path.join(args.out, "best.pt"))
    append_jsonl(os.path.join(args.out, "metrics.jsonl"), row)
    write_provenance(args.out, "distill.py", data_read, segments)
    plot_curves(metrics, os.path.join(args.out, "fig1.png"), args)
    tqdm.write(f"step {row['step']:6d} | ce {row['ce']:.6f} kl {row['kl']:.3e} dist {row['dist_from_init']:.3f} "
               f"| linear student {row['student_linear']:.2%} teacher {row['teacher_linear']:.2%} "
               f"| k-NN student {row['student_knn']:.2%} teacher {row['teacher_knn']:.2%} "
               f"| embed {row['student_embed_norm']:.3g} full-lr {row.get('full_lr_frac', 0):.3f}")
    return best


def summary_line(args, metrics, seconds):
    first, final = metrics[0], metrics[-1]
    return (f"{args.arch} alpha={args.alpha:g} on {args.dataset}, step {final['step']}: linear probe "
            f"student {final['student_linear']:.2%} / teacher {final['teacher_linear']:.2%} / "
            f"input {first['input_linear']:.2%}; k-NN student {final['student_knn']:.2%} / "
            f"teacher {final['teacher_knn']:.2%} / input {first['input_knn']:.2%} ({seconds:.0f} s) -> {args.out}")


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot_sweeps(args.plot, args.out or "runs")
    if args.split_classes:
        return split_classes(args.data_root, int(args.split_classes[0]), args.split_classes[1])
    device = setup_device(args.device, args.precision, CPU_AUTO_PRECISION)
    rank, world_size = world()   # (0, 1) unless launched by torchrun
    master = rank == 0           # the one process that writes (nanoGPT's master_process)

    ckpt = open_run(args, device, master, world_size)   # the run directory and its last checkpoint, if any
    x_distill, distill_data, probe_data, data_read = distillation_data(args, device)
    steps_per_epoch = math.ceil(len(x_distill) / args.batch_size)   # the last partial batch is kept
    total = args.steps or args.epochs * steps_per_epoch

    # ============ teacher and student (§4) ============
    config = dict(arch=args.arch, out_dim=args.out_dim, bottleneck=args.bottleneck,
                  norm=args.norm, img_size=probe_data["img_size"])
    if args.teacher_ckpt:   # App. D.1: a trained student (weights and buffers) is the new teacher
        teacher_ckpt = load_checkpoint(args.teacher_ckpt)
        if teacher_ckpt["config"] != config:
            raise UserError(f"--teacher-ckpt {args.teacher_ckpt} holds {teacher_ckpt['config']}; "
                            f"this run builds {config}")
        teacher = model_from_checkpoint(teacher_ckpt, "student", args.teacher_ckpt)
    else:
        teacher = make_model(**config, generator=torch.Generator().manual_seed(args.teacher_seed))
    student = make_model(**config, generator=torch.Generator().manual_seed(args.student_seed))
    locality_init(teacher, student, args.alpha)       # theta_S = mix of theta_T and a fresh theta_R
    teacher.to(device).eval().requires_grad_(False)   # eval mode: a random teacher's BN stats stay 0/1
    if world_size > 1 and device.type == "cuda":      # BN sees the global batch, as in a 1-GPU run
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    if use_channels_last(args.channels_last, device):
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        x_distill = x_distill.contiguous(memory_format=torch.channels_last)
    theta0 = flat_params(student)                     # theta_S(0), for the distance from init (App. D)

    # ============ optimizer: AdamW, constant lr, no weight decay (App. E.4) ============
    # torch's AdamW decays every parameter by 0.01 unless told: the paper applies none (--weight-decay 0);
    # the authors' runs kept that 0.01 on biases and norm parameters only (--bias-decay 0.01)
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                                   dict(params=no_decay, weight_decay=args.bias_decay)],
                                  lr=args.lr, eps=args.adam_eps, fused=True)   # one kernel, CPU too

    # ============ resume ============
    step, best, metrics, segments = resume(ckpt, config, data_read, student, teacher, optimizer, steps_per_epoch,
                                           args.out, master)
    segments = [*segments, provenance_segment(device, f"step {step}")]
    if world_size > 1:
        dist.barrier()   # every rank has read the metrics before the master rewrites them
    if master:
        write_jsonl(os.path.join(args.out, "metrics.jsonl"), metrics)

    # ============ the loss, on the batches of the data-parallel model ============
    train_model = student
    if world_size > 1:   # torchrun: DDP averages the gradients of each rank's slice of the batch
        train_model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    # the shapes that will run: this rank's slices of the full and the last partial batch
    batch_sizes = local_batch_sizes({min(args.batch_size, len(x_distill)), len(x_distill) % args.batch_size} - {0})
    if args.compile == "all":
        train_model = compiled(train_model, [(normalize(x_distill[:b], distill_data),) for b in batch_sizes])
    loss_fn = make_loss(train_model, teacher, x_distill, distill_data, cache=not args.recompute_teacher,
                        compile_batches=batch_sizes if args.compile != "none" else ())

    # ============ distillation, probing the teacher (embedded once) and the student at each point (§3) ============
    x_diagnose = probe_data["x_test"][:512]   # fixed images for representation_stats
    probes = dict(data=probe_data, x_diagnose=x_diagnose, teacher_features=embed(teacher.encoder, probe_data),
                  teacher_stats=representation_stats(teacher, x_diagnose, probe_data))
    t0 = time.time()
    if master:
        write_args(args.out, "distill.py", vars(args))
        write_provenance(args.out, "distill.py", data_read, segments)
    bar = tqdm(total=total, initial=step, desc=f"distill {args.arch}", dynamic_ncols=True, disable=not master)
    points = probe_points(step, total, steps_per_epoch=steps_per_epoch, probe_every=args.probe_every,
                          probe_steps=args.probe_steps)
    for stop in ([0] if ckpt is None else []) + points:
        if stop == 0:   # the untrained student, and the input baseline once
            train_stats = initial_losses(student, teacher, x_distill, distill_data, device)
            row = dict(metrics_row(0, train_stats, student, theta0, probes, args, steps_per_epoch),
                       **input_probe(probe_data, args), n_distill=len(x_distill))   # n: Fig. 4's dataset size
        else:
            batches = step_batches(len(x_distill), args.batch_size, seed=args.seed, first=step, last=stop,
                                   device=device)
            try:
                train_stats = train_steps(student, optimizer, loss_fn, batches, progress=bar)
            except NonFiniteLoss as e:
                raise UserError(f"{e}; {args.out}/last.pt (step {step}) is kept") from None
            step = stop
            train_stats["ce"] = train_stats.pop("loss")
            row = metrics_row(step, {**train_stats, **adam_update_stats(optimizer)}, student, theta0, probes,
                              args, steps_per_epoch)
        metrics.append(row)
        if master:
            segments[-1]["seconds"] = round(time.time() - t0, 1)
            state = dict(config=config, args=vars(args), data=data_read, step=step, epoch=row["epoch"],
                         student=student.state_dict(), teacher=teacher.state_dict())
            best = save_point(args, row, state, optimizer, metrics, segments, data_read, best)
    bar.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if master:
        print(summary_line(args, metrics, time.time() - t0))
        release_run_dir(args.out)
    return metrics


def plot_curves(metrics, path, args):
    """Fig. 1: probing accuracy over training for teacher, student and the flattened input."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    steps = [m["step"] for m in metrics]
    for ax, probe_name, title in zip(axes, ["linear", "knn"], ["linear probe", f"k-NN probe (k={args.knn_k}, L2)"]):
        ax.plot(steps, [100 * m[f"student_{probe_name}"] for m in metrics], "o-", label="student", color="C3")
        ax.plot(steps, [100 * m[f"teacher_{probe_name}"] for m in metrics], "o-", label="teacher", color="C0")
        if metrics[0].get(f"input_{probe_name}") is not None:
            ax.axhline(100 * metrics[0][f"input_{probe_name}"], ls="--", color="gray", label="input")
        ax.set(xlabel="step", ylabel="probing accuracy (%)", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{args.arch}, alpha={args.alpha:g}, {args.dataset} ({metrics[0]['n_distill']} images, batch "
                 f"{args.batch_size}), bottleneck {args.bottleneck}")
    save_figure(fig, path)


# ============ sweep figures (Fig. 3, 4, 10, 11, 12, 17, 18) ============
# Each run's args.json says what it is; the argument that differs between runs that otherwise
# agree is the sweep variable, and it picks the figure (FIGURES, at the end).

NOT_SWEPT = RESUMABLE   # a rerun may change them: they never make another experiment, nor a sweep


def load_runs(dirs):
    runs = []
    for d in dirs:
        a = check_run_kind(d, "distill.py")
        try:
            m = read_jsonl(os.path.join(d, "metrics.jsonl"))
        except OSError as e:
            raise UserError(f"--plot {d}: not a distill.py run directory ({type(e).__name__}: args.json and "
                            f"metrics.jsonl needed)") from None
        if not a:
            raise UserError(f"--plot {d}: not a distill.py run directory (no args.json)")
        # the default made explicit, so that runs probed on the same data agree on it (Fig. 4's
        # real runs leave --probe-dataset unset, its Gaussian runs need it)
        a["probe_dataset"] = probe_dataset(a)
        # the data a run read is part of what it is: two ImageFolder trees are two datasets
        a["data"] = read_fingerprints(d) or (a.get("data_root") if "imagefolder" in (a["dataset"], a["probe_dataset"])
                                             else None)
        if m:
            runs.append(dict(dir=os.path.normpath(d), args=a, metrics=m, final=m[-1], first=m[0]))
    return runs


def read_fingerprints(run_dir):
    """{dataset: pixel fingerprint} from a run's provenance.json; None for runs older than it."""
    try:
        with open(os.path.join(run_dir, "provenance.json")) as f:
            return {k: v["fingerprint"] for k, v in json.load(f)["data"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def sweep_groups(runs, var, ignore=()):
    """Groups of runs that agree on every argument but `var` (and `ignore`) and differ in `var`."""
    keys = sorted({k for r in runs for k in r["args"]} - NOT_SWEPT - {var, *ignore})
    groups = {}
    for r in runs:
        groups.setdefault(tuple(json.dumps(r["args"].get(k)) for k in keys), []).append(r)
    return [g for g in groups.values() if len({json.dumps(r["args"][var]) for r in g}) > 1]


def final_row(r, **extra):
    """A run's last metrics row, as the sweep summaries (sweeps.json) list it."""
    f = r["final"]
    return dict(run=r["dir"], **extra, step=f["step"], epoch=f["epoch"],
                **{k: f[k] for k in ("student_linear", "student_knn", "teacher_linear", "teacher_knn", "kl",
                                     "dist_from_init") if k in f},
                input_linear=r["first"].get("input_linear"), input_knn=r["first"].get("input_knn"))


def scale(g):
    """What a panel title says of its runs' scale."""
    a, f = g[0]["args"], g[0]["final"]
    return f"{a['arch']}, {a['dataset']}, {g[0]['first'].get('n_distill', '?')} images, {f['step']} steps"


def references(ax, g, probe_name, final=True):
    """Teacher (dashed) and input (dotted) lines: the two baselines the student must beat (Table 1)."""
    ax.axhline(100 * statistics.fmean(r["final" if final else "first"][f"teacher_{probe_name}"] for r in g),
               ls="--", color="C0", label="teacher")
    if g[0]["first"].get(f"input_{probe_name}") is not None:
        ax.axhline(100 * g[0]["first"][f"input_{probe_name}"], ls=":", color="gray", label="input")


PROBES = [("linear", "linear probe (%)"), ("knn", "k-NN probe (%)")]


def plot_fig3(groups, out):
    """Fig. 3: final probing accuracy vs locality alpha; Fig. 17: final KL and distance from init."""
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    fig17, axes17 = plt.subplots(len(groups), 2, figsize=(10, 3.6 * len(groups)), squeeze=False)
    rows = []
    for j, g in enumerate(groups):
        g = sorted(g, key=lambda r: r["args"]["alpha"])
        alphas = [r["args"]["alpha"] for r in g]
        for ax, (probe_name, label) in zip(axes[j], PROBES):
            ax.plot(alphas, [100 * r["final"][f"student_{probe_name}"] for r in g], "o-", color="C3", label="student")
            references(ax, g, probe_name)
            ax.set(xlabel="locality alpha", ylabel=label, title=scale(g))
            ax.legend(fontsize=8)
        axes17[j, 0].semilogy(alphas, [max(r["final"]["kl"], 1e-12) for r in g], "o-")
        axes17[j, 1].plot(alphas, [r["final"]["dist_from_init"] for r in g], "o-")
        axes17[j, 0].set(xlabel="locality alpha", ylabel="KL(teacher || student), final", title=scale(g))
        axes17[j, 1].set(xlabel="locality alpha", ylabel="distance from init, final")
        rows += [final_row(r, alpha=r["args"]["alpha"]) for r in g]
    fig.suptitle("Fig. 3: probing accuracy vs locality of the student's init", fontsize=10)
    fig17.suptitle("Fig. 17: KL divergence and distance from init vs locality alpha", fontsize=10)
    save_figure(fig, os.path.join(out, "fig3.png"), dpi=110)
    save_figure(fig17, os.path.join(out, "fig17.png"), dpi=110)
    return rows


def plot_fig4(groups, out):
    """Fig. 4: final probing accuracy vs distillation set size, real images vs Gaussian noise."""
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    size = lambda r: r["args"]["n_samples"] or r["first"].get("n_distill", 0)
    rows = []
    for j, g in enumerate(groups):
        for ax, (probe_name, label) in zip(axes[j], PROBES):
            for noise, name in ((False, "real images"), (True, "Gaussian inputs")):
                sub = sorted((r for r in g if (r["args"]["dataset"] == NOISE) == noise), key=size)
                if sub:
                    ax.plot([size(r) for r in sub], [100 * r["final"][f"student_{probe_name}"] for r in sub], "o-",
                            label=f"student, {name}", color="C3" if not noise else "C1")
            references(ax, g, probe_name)
            ax.set(xscale="log", xlabel="distillation images", ylabel=label, title=scale(g).split(",")[0])
            ax.legend(fontsize=8)
        rows += [final_row(r, n_samples=size(r), dataset=r["args"]["dataset"]) for r in sorted(g, key=size)]
    fig.suptitle("Fig. 4: the student's features need real data (Gaussian inputs at the same sizes)", fontsize=10)
    save_figure(fig, os.path.join(out, "fig4.png"), dpi=110)
    return rows


def plot_over_training(groups, var, title, path):
    """Fig. 10-12: probing accuracy over training, one curve per value of `var`."""
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    rows = []
    for j, g in enumerate(groups):
        g = sorted(g, key=lambda r: (r["args"][var] is None, str(r["args"][var]).zfill(8)))
        for ax, (probe_name, label) in zip(axes[j], PROBES):
            for r in g:
                ax.plot([m["step"] for m in r["metrics"]], [100 * m[f"student_{probe_name}"] for m in r["metrics"]],
                        "o-", ms=3, label=str(r["args"][var] if r["args"][var] is not None else "default"))
            references(ax, g, probe_name, final=False)
            ax.set(xlabel="step", ylabel=label, title=scale(g))
            if any(r["args"].get("probe_steps") for r in g):   # early steps probed: show them
                ax.set_xscale("symlog", linthresh=10)
                ax.set_xlim(left=0)
            ax.legend(fontsize=7, title=var.replace("_", " "), ncol=2)
        rows += [final_row(r, **{var: r["args"][var]}) for r in g]
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)
    return rows


def plot_fig10(groups, out):
    return plot_over_training(groups, "out_dim", "Fig. 10: probing accuracy per output dimension m",
                              os.path.join(out, "fig10.png"))


def plot_fig11(groups, out):
    return plot_over_training(groups, "norm", "Fig. 11: probing accuracy per normalization layer",
                              os.path.join(out, "fig11.png"))


def plot_fig12(groups, out):
    return plot_over_training(groups, "bottleneck", "Fig. 12: probing accuracy per L2-bottleneck spec "
                              "(bits wn1 lin1 fn1 wn2 lin2 fn2)", os.path.join(out, "fig12.png"))


def plot_fig18(pairs, out):
    """Fig. 18: KL, distance from init and probing accuracy of a first round and of the second
    round that took its student as teacher (App. D.1)."""
    plt = pyplot()
    fig, axes = plt.subplots(3, 2 * len(pairs), figsize=(9 * len(pairs), 9), squeeze=False)
    rows = []
    for j, pair in enumerate(pairs):
        for k, r in enumerate(pair):
            col, steps = axes[:, 2 * j + k], [m["step"] for m in r["metrics"]]
            col[0].semilogy(steps, [max(m["kl"], 1e-12) for m in r["metrics"]], "o-")
            col[1].plot(steps, [m["dist_from_init"] for m in r["metrics"]], "o-")
            col[2].plot(steps, [100 * m["student_linear"] for m in r["metrics"]], "o-", color="C3", label="student")
            col[2].plot(steps, [100 * m["teacher_linear"] for m in r["metrics"]], "o-", color="C0", label="teacher")
            col[0].set(title=f"round {k + 1}" + (" (its student is the teacher of round 2)" if k == 0 else ""),
                       ylabel="KL(teacher || student)")
            col[1].set(ylabel="distance from init")
            col[2].set(xlabel="step", ylabel="linear probe (%)")
            col[2].legend(fontsize=8)
            rows.append(final_row(r, round=k + 1))
    fig.suptitle("Fig. 18: a trained student as the teacher of a second round; "
                 + "; ".join(scale(pair[:1]) for pair in pairs), fontsize=10)
    save_figure(fig, os.path.join(out, "fig18.png"), dpi=110)
    return rows


def restart_pairs(runs):
    """(first round, second round) for every run whose --teacher-ckpt is another run's checkpoint."""
    by_dir = {r["dir"]: r for r in runs}
    firsts = [(os.path.normpath(os.path.dirname(r["args"]["teacher_ckpt"])), r) for r in runs if r["args"].get("teacher_ckpt")]
    return [[by_dir[d], r] for d, r in firsts if d in by_dir]


def table5(groups, out):
    """Table 5: teacher -> student (input) per encoder, linear / k-NN probe (%) at each run's last step."""
    pct = lambda m, k: f"{100 * m[k]:.1f}" if m.get(k) is not None else "-"
    cell = lambda m, who: f"{pct(m, who + '_linear')} / {pct(m, who + '_knn')}"
    lines, rows = ["| arch | steps | teacher | student | input |", "|---|---|---|---|---|"], []
    for g in groups:
        for r in sorted(g, key=lambda r: r["args"]["arch"]):
            lines.append(f"| {r['args']['arch']} | {r['final']['step']} | {cell(r['final'], 'teacher')} | "
                         f"**{cell(r['final'], 'student')}** | {cell(r['first'], 'input')} |")
            rows.append(final_row(r, arch=r["args"]["arch"]))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table5.md"), "w") as f:
        f.write("Table 5: linear / k-NN probe (%), teacher -> student (input)\n\n" + "\n".join(lines) + "\n")
    return rows


FIGURES = {   # sweep variable: (figure, the runs' grouping, its plotting function)
    "alpha": ("fig3", lambda runs: sweep_groups(runs, "alpha", ignore=["student_seed"]), plot_fig3),
    "n_samples": ("fig4", lambda runs: sweep_groups(runs, "n_samples", ignore=["dataset"]), plot_fig4),
    "out_dim": ("fig10", lambda runs: sweep_groups(runs, "out_dim"), plot_fig10),
    "norm": ("fig11", lambda runs: sweep_groups(runs, "norm"), plot_fig11),
    "bottleneck": ("fig12", lambda runs: sweep_groups(runs, "bottleneck"), plot_fig12),
    "teacher_ckpt": ("fig18", restart_pairs, plot_fig18),
    "arch": ("table5", lambda runs: sweep_groups(runs, "arch"), table5),
}


PROBE_COLUMNS = ["linear", "linear_std", "knn", "knn_cos"]


def cells(m, who):
    """A metrics row's four probes of `who` (student / teacher / input) in percent, 'a / b / c / d'."""
    return " / ".join(f"{100 * m[f'{who}_{k}']:.1f}" if m.get(f"{who}_{k}") is not None else "-" for k in PROBE_COLUMNS)


def trajectory_table(r):
    """One run over training, a row per probe point: the student's and teacher's probes, the KL, the
    distance from init and the collapse diagnostics (RESULTS.md, "The authors' head")."""
    lines = [f"{r['dir']}: probes % (linear raw / linear standardized / k-NN L2 / k-NN cosine); input "
             f"{cells(r['first'], 'input')}", "",
             "| step | student | teacher | KL | dist. from init | embed norm | code spread | update norm |",
             "|---|---|---|---|---|---|---|---|"]
    for m in r["metrics"]:
        num = lambda k, f: format(m[k], f) if m.get(k) is not None else "-"
        lines.append(f"| {m['step']} | {cells(m, 'student')} | {cells(m, 'teacher')} | {num('kl', '.2e')} | "
                     f"{num('dist_from_init', '.2f')} | {num('student_embed_norm', '.3g')} | "
                     f"{num('student_code_std', '.2g')} | {num('update_norm', '.2g')} |")
    return "\n".join(lines) + "\n"


def runs_table(runs):
    """Every run at its last probe point and at its best one (the authors selected the best raw
    linear probe over the probe points; the last is what a run ends with)."""
    lines = ["| run | steps | student, last | student, best raw linear (step) | teacher, last | input |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        best = max(r["metrics"], key=lambda m: m.get("student_linear", -1))
        lines.append(f"| {r['dir']} | {r['final']['step']} | {cells(r['final'], 'student')} | "
                     f"{100 * best['student_linear']:.1f} ({best['step']}) | {cells(r['final'], 'teacher')} | "
                     f"{cells(r['first'], 'input')} |")
    return "\n".join(lines) + "\n"


def scales_table(runs, step=400):
    """Runs that probed at `step` and went on, at both scales side by side: a longer run's probe at
    `step` is the shorter run's last (constant lr, seeded batch order; tests/test_results.py checks
    it on results/), so one run gives the claims tables both (issue: the failing claims at 5x)."""
    lines = [f"| run | student, step {step} | teacher, step {step} | student, last (step) | teacher, last | "
             "best raw linear (step) |", "|---|---|---|---|---|---|"]
    for r in runs:
        at = next((m for m in r["metrics"] if m["step"] == step and "student_linear" in m), None)
        if at is None or r["final"]["step"] <= step:
            continue
        best = max(r["metrics"], key=lambda m: m.get("student_linear", -1))
        lines.append(f"| {r['dir']} | {cells(at, 'student')} | {cells(at, 'teacher')} | {cells(r['final'], 'student')} "
                     f"({r['final']['step']}) | {cells(r['final'], 'teacher')} | {100 * best['student_linear']:.1f} "
                     f"({best['step']}) |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else None


def plot_sweeps(dirs, out):
    """Draw every sweep figure the runs make up; returns {figure: [rows]} (also <out>/sweeps.json).
    Writes <out>/runs.md (every run, last and best probe point), <out>/scales.md (runs probed at
    step 400 and beyond: both scales side by side) and, for a single run, its
    <out>/trajectory.md: the Markdown that RESULTS.md embeds."""
    runs = load_runs(dirs)
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "runs.md"), runs_table(runs))
    if scales_table(runs):
        write_text(os.path.join(out, "scales.md"), scales_table(runs))
    if len(runs) == 1:   # one run: its curves and its trajectory, no sweep
        write_text(os.path.join(out, "trajectory.md"), trajectory_table(runs[0]))
        plot_curves(runs[0]["metrics"], os.path.join(out, "fig1.png"), argparse.Namespace(**runs[0]["args"]))
        print(f"{out}/trajectory.md, {out}/fig1.png: one run, {len(runs[0]['metrics'])} probe points")
        return {"runs": [final_row(runs[0])]}
    summary = {}
    for var, (name, group, plot) in FIGURES.items():
        groups = group(runs)
        if groups:
            summary[name] = plot(groups, out)
            print(f"{out}/{name}.{'md' if name.startswith('table') else 'png'}: {len(summary[name])} runs swept "
                  f"over --{var.replace('_', '-')}")
    if not summary:
        raise UserError("these runs form no sweep: runs of one sweep differ in exactly one of "
                        + ", ".join("--" + v.replace("_", "-") for v in FIGURES) + " and agree otherwise")
    write_json(os.path.join(out, "sweeps.json"), summary)
    return summary


if __name__ == "__main__":
    run_main(main)
