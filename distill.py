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
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (ARCHS, BOTTLENECKS, DATASETS, NOISE, NORMS, arg_parser, atomic_save, balanced_subset,
                    distill_loss_fn, distillation_loss, extract_features, flat_params, gather_rows,
                    gaussian_inputs, knn_probe, linear_probe, load_checkpoint, load_dataset, locality_init,
                    make_encoder, make_model, model_from_checkpoint, normalize, parse_bottleneck,
                    probe_subset, pyplot, run_main, save_figure, setup_device, shard, train_epoch, UserError,
                    world, write_json)


def parse_args(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--arch", default="vgg11", help=f"encoder, one of: {', '.join(ARCHS)}")
    p.add_argument("--alpha", type=float, default=1e-10,
                   help="locality of the student init (§4): 0 = the teacher's weights, 1 = an independent "
                        "init. The paper uses 1e-10, which float32 rounds to 0")
    p.add_argument("--dataset", default="cifar10",
                   help=f"distillation data, one of: {', '.join([*DATASETS, NOISE])} "
                        f"('{NOISE}': N(0,1) noise shaped like --probe-dataset, Fig. 4)")
    p.add_argument("--probe-dataset", default=None,
                   help="labelled data for probing (default: --dataset, or cifar10 for gaussian); "
                        "resized to the distillation resolution (transfer, Tables 2/4)")
    p.add_argument("--data-root", default="data", help="where datasets live / are downloaded to")
    p.add_argument("--epochs", type=int, default=100, help="paper: 100 (its curves run to 150)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW, constant (App. E.4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="on >=2-D weights; paper: none (App. E.4)")
    p.add_argument("--bias-decay", type=float, default=0.0,
                   help="on biases and norm params; the authors' runs kept AdamW's default 0.01 here")
    p.add_argument("--n-samples", type=int, default=None,
                   help="class-balanced subset of the distillation set (Fig. 4); probing uses the full sets")
    p.add_argument("--out-dim", type=int, default=65536, help="softmax width m (Fig. 10); paper: 2^16")
    p.add_argument("--bottleneck", default="paper",
                   help="L2 bottleneck as bits wn1 lin1 fn1 wn2 lin2 fn2 (Fig. 12), or 'paper' (=011110, "
                        "weight-normalized last layer as App. A writes it) or 'authors' (=011010, what "
                        "produced the paper's tables: the last layer's weight norm had no effect)")
    p.add_argument("--norm", default=None, choices=NORMS,
                   help="swap the encoder's norm layers (Fig. 11); default: the arch's own")
    p.add_argument("--teacher-seed", type=int, default=0, help="seed of the random teacher theta_T")
    p.add_argument("--student-seed", type=int, default=1, help="seed of the fresh init theta_R mixed in by alpha")
    p.add_argument("--seed", type=int, default=0, help="data order, subsets and probe seeds")
    p.add_argument("--teacher-ckpt", default=None,
                   help="restart (App. D.1): this run's trained student becomes the frozen teacher")
    p.add_argument("--probe-every", type=int, default=5, help="probe every N epochs (and at the last)")
    p.add_argument("--knn-k", type=int, default=20, help="k of the k-NN probe (App. C.1)")
    p.add_argument("--probe-samples", type=int, nargs="+", default=None, metavar=("N_TRAIN", "N_TEST"),
                   help="cap the probe train (and test, default the same) splits, for quick CPU runs")
    p.add_argument("--out", default=None, help="run directory (default: runs/<arch>_a<alpha>_<dataset>; "
                                               "with --plot: runs)")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="only draw the sweep summaries (Fig. 3, 4, 10, 11, 12, 17, 18) of these finished runs")
    p.add_argument("--compile", default="loss", choices=["none", "loss", "all"],
                   help="torch.compile the loss (fuses its 65536-wide passes: 1.04-1.15x on CPU, bench.py) "
                        "or also the student (ResNet18 on CPU: 1.3x more; VGG11: slower)")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for networks and images (ResNet18 on CPU: 1.2x, VGG11: slower; bench.py)")
    p.add_argument("--recompute-teacher", action="store_true",
                   help="run the teacher's forward every step instead of caching its codes once (same loss)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.plot:
        return args
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
    args.out = args.out or f"runs/{args.arch}_a{args.alpha:g}_{args.dataset}"
    return args


# A rerun may change these and still resume; any other difference means another experiment.
RESUMABLE = {"epochs", "device", "probe_every", "out", "data_root", "compile", "channels_last",
             "recompute_teacher"}


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot_sweeps(args.plot, args.out or "runs")
    device = setup_device(args.device)
    rank, world_size = world()   # (0, 1) unless launched by torchrun
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")

    # ------------------------------------------------------------------ resume or start
    ckpt = load_checkpoint(last_path) if os.path.exists(last_path) else None
    if ckpt is not None:
        old = ckpt["args"]
        diff = {k for k in vars(args) if k not in RESUMABLE and old.get(k) != vars(args)[k]}
        if diff:
            was = ", ".join("--" + k.replace("_", "-") + f" {old.get(k)}" for k in sorted(diff))
            raise UserError(f"{args.out} holds a run with other arguments ({was}); "
                            f"rerun with those or pick another --out")

    # ------------------------------------------------------------------ data (on the device)
    probe_name = args.probe_dataset or (args.dataset if args.dataset != NOISE else "cifar10")
    distill_size = None if args.dataset in (NOISE, probe_name) else DATASETS[args.dataset][1]
    data = load_dataset(probe_name, args.data_root, device, img_size=distill_size)
    img_size = data["img_size"]
    distill_data = data   # whose normalization the distillation inputs get
    if args.dataset == NOISE:
        g = torch.Generator().manual_seed(args.seed)
        x_distill = gaussian_inputs(args.n_samples or len(data["x_train"]), img_size, g).to(device)
    else:
        if args.dataset != probe_name:   # distill on one dataset, probe on another (Tables 2/4)
            distill_data = load_dataset(args.dataset, args.data_root, device)
        x_distill = distill_data["x_train"]
        if args.n_samples:
            g = torch.Generator().manual_seed(args.seed)
            x_distill = x_distill[balanced_subset(distill_data["y_train"], args.n_samples, g)]

    caps = args.probe_samples or [None]
    x_ptr, y_ptr = probe_subset(data["x_train"], data["y_train"], caps[0], args.seed)
    x_pte, y_pte = probe_subset(data["x_test"], data["y_test"], caps[-1], args.seed)

    # ------------------------------------------------------------------ teacher and student
    config = dict(arch=args.arch, out_dim=args.out_dim, bottleneck=args.bottleneck,
                  norm=args.norm, img_size=img_size)
    if args.teacher_ckpt:   # App. D.1: a trained student (weights and buffers) is the new teacher
        tckpt = load_checkpoint(args.teacher_ckpt)
        if tckpt["config"] != config:
            raise UserError(f"--teacher-ckpt {args.teacher_ckpt} holds {tckpt['config']}; "
                            f"this run builds {config}")
        teacher = model_from_checkpoint(tckpt, "student", args.teacher_ckpt)
    else:
        teacher = make_model(**config, generator=torch.Generator().manual_seed(args.teacher_seed))
    student = make_model(**config, generator=torch.Generator().manual_seed(args.student_seed))
    locality_init(teacher, student, args.alpha)
    teacher.to(device).eval().requires_grad_(False)   # eval mode: a random teacher's BN stats stay 0/1
    if world_size > 1 and device.type == "cuda":      # BN sees the global batch, as in a 1-GPU run
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    if args.channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        x_distill = x_distill.contiguous(memory_format=torch.channels_last)
    theta0 = flat_params(student)                     # theta_S(0), for the distance from init (App. D)

    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                                   dict(params=no_decay, weight_decay=args.bias_decay)],
                                  lr=args.lr, fused=True)   # one kernel for all parameters, CPU too

    start_epoch, best, metrics = 0, -1.0, []
    if ckpt is not None:
        if ckpt["config"] != config:
            raise UserError(f"{last_path} is a {ckpt['config']}, this run builds {config}")
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        if not os.path.exists(metrics_path):
            raise UserError(f"{last_path} exists but {metrics_path} does not; restore it or pick another --out")
        with open(metrics_path) as f:   # lines past the checkpoint belong to the killed tail
            metrics = [m for m in map(json.loads, f) if m["epoch"] <= start_epoch]
        if rank == 0:
            print(f"resuming {args.out} from epoch {start_epoch}")
    if world_size > 1:
        dist.barrier()   # every rank has read the metrics before rank 0 rewrites them
    if rank == 0:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)

    # ------------------------------------------------------------------ the teacher-student loss
    train_model = student
    if world_size > 1:   # torchrun: DDP averages the gradients of each rank's slice of the batch
        train_model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile == "all":
        train_model = torch.compile(train_model)
    # the frozen teacher sees un-augmented images: its codes are computed once, here (common.py)
    loss_fn = distill_loss_fn(train_model, teacher, x_distill, distill_data, cache=not args.recompute_teacher,
                              compile=args.compile != "none")

    # ------------------------------------------------------------------ probes (§3, App. C.1)
    def features(encoder):   # under torchrun each rank embeds its slice; all get all features
        return tuple(gather_rows(extract_features(encoder, shard(x), data, device=device), len(x))
                     for x in (x_ptr, x_pte))

    def probe(feats, seed):
        (f_tr, f_te), c = feats, data["num_classes"]
        # raw features are the paper's probe; standardized ones (train mean/std) were probed too by the authors
        return dict(linear=linear_probe(f_tr, y_ptr, f_te, y_pte, c, seed=seed),
                    linear_std=linear_probe(f_tr, y_ptr, f_te, y_pte, c, seed=seed, standardize=True),
                    knn=knn_probe(f_tr, y_ptr, f_te, y_pte, args.knn_k, "l2", c),
                    knn_cos=knn_probe(f_tr, y_ptr, f_te, y_pte, args.knn_k, "cosine", c))

    teacher_feats = features(teacher.encoder)         # the teacher never changes: extract once
    steps_per_epoch = math.ceil(len(x_distill) / args.batch_size)

    def evaluate(epoch, train_stats):
        """The metrics row on rank 0 (None on the others, which only help embed)."""
        student_feats = features(student.encoder)
        input_feats = features(make_encoder("flatten", img_size=img_size)) if epoch == 0 else None
        if rank != 0:
            return None
        # the teacher is re-probed with each point's seed: its curve shows the probe's own noise (Fig. 1)
        row = dict(epoch=epoch, step=epoch * steps_per_epoch, **train_stats,
                   dist_from_init=(flat_params(student) - theta0).norm().item())
        row.update({f"student_{k}": v for k, v in probe(student_feats, args.seed + epoch).items()})
        row.update({f"teacher_{k}": v for k, v in probe(teacher_feats, args.seed + epoch).items()})
        if epoch == 0:   # the flattened-input baseline of Table 1, once per run
            row.update({f"input_{k}": v for k, v in probe(input_feats, args.seed).items()})
            row["n_distill"] = len(x_distill)   # the dataset size of Fig. 4
        return row

    def checkpoint(epoch, path, with_optimizer):
        if rank != 0:
            return
        state = dict(config=config, args=vars(args), epoch=epoch, best=best,
                     student=student.state_dict(), teacher=teacher.state_dict())
        if with_optimizer:
            state["optimizer"] = optimizer.state_dict()
        atomic_save(state, path)

    def log(row):
        nonlocal best
        if row is None:   # not rank 0
            return
        metrics.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["student_linear"] > best:
            best = row["student_linear"]
            checkpoint(row["epoch"], best_path, with_optimizer=False)
        plot_curves(metrics, os.path.join(args.out, "fig1.png"), args)
        tqdm.write(f"epoch {row['epoch']:4d} | ce {row['ce']:.6f} kl {row['kl']:.3e} "
                   f"dist {row['dist_from_init']:.3f} | linear student {row['student_linear']:.2%} "
                   f"teacher {row['teacher_linear']:.2%} | k-NN student {row['student_knn']:.2%} "
                   f"teacher {row['teacher_knn']:.2%}")

    if rank == 0:   # written once the inputs checked out
        write_json(os.path.join(args.out, "args.json"), vars(args))
    if ckpt is None:   # epoch 0: the untrained student on the first 2048 distillation images
        student.eval()
        with torch.no_grad():
            x0 = normalize(x_distill[:2048], distill_data)
            ce, kl, ent = (v.item() for v in distillation_loss(student(x0), teacher(x0)))
        log(evaluate(0, dict(ce=ce, kl=kl, teacher_entropy=ent)))
        checkpoint(0, last_path, with_optimizer=True)

    # ------------------------------------------------------------------ distillation
    t0 = time.time()
    bar = tqdm(total=args.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=f"distill {args.arch}", dynamic_ncols=True, disable=rank != 0)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        stats = train_epoch(student, optimizer, loss_fn, len(x_distill), args.batch_size,
                            args.seed, epoch, device, bar)
        stats["ce"] = stats.pop("loss")
        if epoch % args.probe_every == 0 or epoch == args.epochs:
            log(evaluate(epoch, stats))
            checkpoint(epoch, last_path, with_optimizer=True)
    bar.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return []

    final = metrics[-1]
    print(f"{args.arch} alpha={args.alpha:g} on {args.dataset}, epoch {final['epoch']}: linear probe "
          f"student {final['student_linear']:.2%} / teacher {final['teacher_linear']:.2%} / "
          f"input {metrics[0]['input_linear']:.2%}; k-NN student {final['student_knn']:.2%} / "
          f"teacher {final['teacher_knn']:.2%} / input {metrics[0]['input_knn']:.2%} "
          f"({time.time() - t0:.0f} s) -> {args.out}")
    return metrics


def plot_curves(metrics, path, args):
    """Fig. 1: probing accuracy over training for teacher, student and the flattened input."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    epochs = [m["epoch"] for m in metrics]
    titles = ["linear probe", f"k-NN probe (k={args.knn_k}, L2)"]
    for ax, probe_name, title in zip(axes, ["linear", "knn"], titles):
        ax.plot(epochs, [m[f"student_{probe_name}"] for m in metrics], "o-", label="student", color="C3")
        ax.plot(epochs, [m[f"teacher_{probe_name}"] for m in metrics], "o-", label="teacher", color="C0")
        ax.axhline(metrics[0][f"input_{probe_name}"], ls="--", color="gray", label="input")
        ax.set(xlabel="epoch", ylabel="probing accuracy", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{args.arch}, alpha={args.alpha:g}, {args.dataset}, bottleneck {args.bottleneck}")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Sweep summaries. Each run's args.json says what it is; the argument that differs between runs
# that otherwise agree is the sweep variable, and it picks the figure.

SWEEPS = {   # variable: (figure, what it shows)
    "alpha": ("fig3", "final probing accuracy vs locality alpha, teacher dashed (Fig. 3; and fig17.png)"),
    "n_samples": ("fig4", "final probing accuracy vs dataset size, real vs Gaussian inputs (Fig. 4)"),
    "out_dim": ("fig10", "probing accuracy over training per output dim m (Fig. 10)"),
    "norm": ("fig11", "probing accuracy over training per normalization layer (Fig. 11)"),
    "bottleneck": ("fig12", "probing accuracy over training per L2-bottleneck spec (Fig. 12)"),
    "teacher_ckpt": ("fig18", "KL, distance from init and probing accuracy, first vs second round (Fig. 18)"),
}
NOT_SWEPT = {"out", "device", "epochs", "probe_every", "data_root", "compile", "channels_last",
             "recompute_teacher", "plot"}


def load_runs(dirs):
    runs = []
    for d in dirs:
        try:
            with open(os.path.join(d, "args.json")) as f:
                a = json.load(f)
            with open(os.path.join(d, "metrics.jsonl")) as f:
                m = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:
            raise UserError(f"{d}: not a distill.py run directory ({type(e).__name__}: args.json and "
                            f"metrics.jsonl needed)") from None
        if m:
            runs.append(dict(dir=os.path.normpath(d), args=a, metrics=m, final=m[-1], first=m[0]))
    return runs


def sweep_groups(runs, var):
    """Runs that agree on every argument but `var` (and, for Fig. 4, the input kind), grouped."""
    keys = sorted({k for r in runs for k in r["args"]} - NOT_SWEPT - {var})
    if var == "n_samples":
        keys.remove("dataset")
    if var == "alpha":   # the student's seed only matters through alpha
        keys.remove("student_seed")
    groups = {}
    for r in runs:
        groups.setdefault(tuple(json.dumps(r["args"].get(k)) for k in keys), []).append(r)
    label = lambda r: ", ".join(f"{k}={r['args'].get(k)}" for k in ("arch", "dataset") if k in keys)
    return [(label(g[0]), g) for g in groups.values() if len({json.dumps(r["args"][var]) for r in g}) > 1]


def plot_sweeps(dirs, out):
    """Draw every sweep figure the runs make up; returns {figure: [rows]} (also <out>/sweeps.json)."""
    plt = pyplot()
    runs = load_runs(dirs)
    summary = {}
    for var, (fig_name, what) in SWEEPS.items():
        groups = [(label, g) for label, g in sweep_groups(runs, var)]
        if var == "teacher_ckpt":   # pair each second round with the first round it restarted from
            by_dir = {r["dir"]: r for r in runs}
            groups = [(f"{r['args']['arch']}", [by_dir[first], r]) for r in runs if r["args"].get("teacher_ckpt")
                      for first in [os.path.normpath(os.path.dirname(r["args"]["teacher_ckpt"]))] if first in by_dir]
        if not groups:
            continue
        rows = []
        if var == "teacher_ckpt":
            fig, axes = plt.subplots(3, 2 * len(groups), figsize=(4.5 * 2 * len(groups), 9), squeeze=False)
            for j, (label, (first, second)) in enumerate(groups):
                for k, (r, title) in enumerate([(first, "first round"), (second, "second round")]):
                    col = axes[:, 2 * j + k]
                    ep = [m["epoch"] for m in r["metrics"]]
                    col[0].semilogy(ep, [max(m["kl"], 1e-12) for m in r["metrics"]], "o-")
                    col[1].plot(ep, [m["dist_from_init"] for m in r["metrics"]], "o-")
                    col[2].plot(ep, [m["student_linear"] for m in r["metrics"]], "o-", color="C3", label="student")
                    col[2].plot(ep, [m["teacher_linear"] for m in r["metrics"]], "o-", color="C0", label="teacher")
                    col[0].set(title=f"{label}: {title}", ylabel="kl divergence")
                    col[1].set(ylabel="distance from init")
                    col[2].set(xlabel="epoch", ylabel="probing accuracy")
                    rows.append(dict(run=r["dir"], round=k + 1, kl=r["final"]["kl"],
                                     dist_from_init=r["final"]["dist_from_init"],
                                     student_linear=r["final"]["student_linear"],
                                     teacher_linear=r["final"]["teacher_linear"]))
                col[2].legend()
        elif var in ("alpha", "n_samples"):
            fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
            if var == "alpha":   # Fig. 17: the optimization metrics of the same runs
                fig17, axes17 = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
            for j, (label, g) in enumerate(groups):
                kinds = sorted({r["args"]["dataset"] == NOISE for r in g}) if var == "n_samples" else [False]
                for noise in kinds:
                    size = lambda r: r["args"][var] if r["args"][var] is not None else r["first"].get("n_distill", 0)
                    sub = sorted((r for r in g if var != "n_samples" or (r["args"]["dataset"] == NOISE) == noise),
                                 key=size)
                    x = [size(r) for r in sub]
                    name = ("Gaussian inputs" if noise else "real data") if var == "n_samples" else "student"
                    axes[0, j].plot(x, [r["final"]["student_linear"] for r in sub], "o-", label=name)
                    if var == "alpha":
                        axes17[0, j].semilogy(x, [max(r["final"]["kl"], 1e-12) for r in sub], "o-")
                        axes17[1, j].plot(x, [r["final"]["dist_from_init"] for r in sub], "o-")
                    rows += [dict(run=r["dir"], **{var: size(r)}, dataset=r["args"]["dataset"],
                                  epoch=r["final"]["epoch"], student_linear=r["final"]["student_linear"],
                                  student_knn=r["final"]["student_knn"], teacher_linear=r["final"]["teacher_linear"],
                                  kl=r["final"]["kl"], dist_from_init=r["final"]["dist_from_init"]) for r in sub]
                teacher = sum(r["final"]["teacher_linear"] for r in g) / len(g)
                axes[0, j].axhline(teacher, ls="--", color="C0", label="teacher")
                axes[0, j].axhline(g[0]["first"]["input_linear"], ls=":", color="gray", label="input")
                axes[0, j].set(title=label, ylabel="probing accuracy (linear)")
                if var == "n_samples":
                    axes[0, j].set_xscale("log")
                    axes[0, j].set_xlabel("dataset size")
                else:
                    axes[0, j].set_xlabel("alpha")
                    axes17[0, j].set(title=label, ylabel="kl divergence (final)")
                    axes17[1, j].set(ylabel="distance from init (final)", xlabel="alpha")
                axes[0, j].legend(fontsize=8)
        else:   # curves over training, one per value
            fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
            for j, (label, g) in enumerate(groups):
                for r in sorted(g, key=lambda r: str(r["args"][var])):
                    ep = [m["epoch"] for m in r["metrics"]]
                    axes[0, j].plot(ep, [m["student_linear"] for m in r["metrics"]], "o-", ms=3,
                                    label=str(r["args"][var] or "default"))
                    rows.append(dict(run=r["dir"], **{var: r["args"][var]}, epoch=r["final"]["epoch"],
                                     student_linear=r["final"]["student_linear"],
                                     student_knn=r["final"]["student_knn"]))
                axes[0, j].axhline(g[0]["first"]["teacher_linear"], ls="--", color="gray", label="teacher")
                axes[0, j].set(title=label, xlabel="epoch", ylabel="probing accuracy (linear)")
                axes[0, j].legend(fontsize=7, title=var)
        fig.suptitle(what, fontsize=9)
        save_figure(fig, os.path.join(out, f"{fig_name}.png"), dpi=110)
        if var == "alpha":
            fig17.suptitle("KL divergence and distance from init vs locality alpha (Fig. 17)", fontsize=9)
            save_figure(fig17, os.path.join(out, "fig17.png"), dpi=110)
            print(f"{out}/fig17.png: KL and distance from init vs alpha")
        summary[fig_name] = rows
        print(f"{out}/{fig_name}.png: {what}, {len(rows)} runs")
    if not summary:
        raise UserError("these runs form no sweep: runs of one sweep differ in exactly one of "
                        + ", ".join("--" + v.replace("_", "-") for v in SWEEPS) + " and agree otherwise")
    write_json(os.path.join(out, "sweeps.json"), summary)
    return summary


if __name__ == "__main__":
    run_main(main)
