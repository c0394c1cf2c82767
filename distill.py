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

Offline, point an ImageFolder tree at it: `--dataset imagefolder --data-root cifar10-jpeg`.
Rerunning the same command resumes from `<out>/last.pt`.
"""
import json
import math
import os
import time

import torch
from tqdm import tqdm

from common import (ARCHS, BOTTLENECKS, DATASETS, NOISE, NORMS, UserError, arg_parser, atomic_save,
                    balanced_subset, distill_loss_fn, distillation_loss, extract_features, flat_params,
                    gaussian_inputs, knn_probe, linear_probe, load_checkpoint, load_dataset, locality_init,
                    make_encoder, make_model, model_from_checkpoint, normalize, parse_bottleneck,
                    probe_subset, run_main, setup_device, train_epoch, write_json)


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
    p.add_argument("--out", default=None, help="run directory (default: runs/<arch>_a<alpha>_<dataset>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
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
RESUMABLE = {"epochs", "device", "probe_every", "out", "data_root"}


def main(argv=None):
    args = parse_args(argv)
    device = setup_device(args.device)
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
    student.to(device)
    theta0 = flat_params(student)                     # theta_S(0), for the distance from init (App. D)

    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                                   dict(params=no_decay, weight_decay=args.bias_decay)],
                                  lr=args.lr, fused=torch.device(device).type == "cuda")

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
        print(f"resuming {args.out} from epoch {start_epoch}")
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)

    # ------------------------------------------------------------------ the teacher-student loss
    loss_fn = distill_loss_fn(student, teacher, x_distill, distill_data)

    # ------------------------------------------------------------------ probes (§3, App. C.1)
    def features(encoder):
        return tuple(extract_features(encoder, x, data, device=device) for x in (x_ptr, x_pte))

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
        # the teacher is re-probed with each point's seed: its curve shows the probe's own noise (Fig. 1)
        row = dict(epoch=epoch, step=epoch * steps_per_epoch, **train_stats,
                   dist_from_init=(flat_params(student) - theta0).norm().item())
        row.update({f"student_{k}": v for k, v in probe(features(student.encoder), args.seed + epoch).items()})
        row.update({f"teacher_{k}": v for k, v in probe(teacher_feats, args.seed + epoch).items()})
        if epoch == 0:   # the flattened-input baseline of Table 1, once per run
            flat = make_encoder("flatten", img_size=img_size)
            row.update({f"input_{k}": v for k, v in probe(features(flat), args.seed).items()})
        return row

    def checkpoint(epoch, path, with_optimizer):
        state = dict(config=config, args=vars(args), epoch=epoch, best=best,
                     student=student.state_dict(), teacher=teacher.state_dict())
        if with_optimizer:
            state["optimizer"] = optimizer.state_dict()
        atomic_save(state, path)

    def log(row):
        nonlocal best
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

    write_json(os.path.join(args.out, "args.json"), vars(args))   # written once the inputs checked out
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
               desc=f"distill {args.arch}", dynamic_ncols=True)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        stats = train_epoch(student, optimizer, loss_fn, len(x_distill), args.batch_size,
                            args.seed, epoch, device, bar)
        stats["ce"] = stats.pop("loss")
        if epoch % args.probe_every == 0 or epoch == args.epochs:
            log(evaluate(epoch, stats))
            checkpoint(epoch, last_path, with_optimizer=True)
    bar.close()

    final = metrics[-1]
    print(f"{args.arch} alpha={args.alpha:g} on {args.dataset}, epoch {final['epoch']}: linear probe "
          f"student {final['student_linear']:.2%} / teacher {final['teacher_linear']:.2%} / "
          f"input {metrics[0]['input_linear']:.2%}; k-NN student {final['student_knn']:.2%} / "
          f"teacher {final['teacher_knn']:.2%} / input {metrics[0]['input_knn']:.2%} "
          f"({time.time() - t0:.0f} s) -> {args.out}")
    return metrics


def plot_curves(metrics, path, args):
    """Fig. 1: probing accuracy over training for teacher, student and the flattened input."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
