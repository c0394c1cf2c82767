"""Linear and k-NN probing of distilled students, their random teachers and the raw input
(Sarnthein et al., ICML 2023, §3 "Probing", Tables 1-4, App. C.1).

The encoder is frozen; a linear classifier (or a k-NN vote) on its features measures how much
class information they hold. The paper reports three subjects per row: the random teacher, the
distilled student and the flattened input image.

    python probe.py runs/vgg11_a1e-10_cifar10 --dataset cifar10 --repeats 3   # Table 1 (+ Table 3)
    python probe.py RUN_VGG RUN_RESNET --dataset cifar10 cifar100 stl10         # rows dataset x model
    python probe.py runs/vgg11_a1e-10_tinyimagenet --dataset cifar10           # transfer, Tables 2/4
    python probe.py --arch vgg11 --random --dataset cifar10                    # a fresh network only

A run directory stands for its best.pt (the checkpoint with the best raw student linear probe, the
authors' selection; `--which last` for last.pt). For transfer, images are resized to the
checkpoint's resolution and normalized with the probe dataset's statistics.
"""
import hashlib
import os
import statistics
import time

import torch

from common import (ARCHS, DATASETS, add_precision_arg, arg_parser, at_least, data_record, extract_features,
                    knn_probe, linear_probe, load_checkpoint, load_dataset, make_encoder, model_from_checkpoint,
                    open_run_dir, probe_subset, release_run_dir, run_main, seed_type, setup_device,
                    start_provenance, write_json, write_provenance, write_text)


def parse_args(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("paths", nargs="*", help="distill.py run directories or .pt checkpoints")
    p.add_argument("--which", default="best", choices=["best", "last"],
                   help="checkpoint of a run directory")
    p.add_argument("--arch", default=None, help=f"with --random: one of {', '.join(ARCHS)}")
    p.add_argument("--random", action="store_true",
                   help="also probe a freshly initialized --arch (seed --init-seed)")
    p.add_argument("--init-seed", type=seed_type, default=0,
                   help="seed of the --random network (= distill.py's --teacher-seed)")
    p.add_argument("--dataset", nargs="+", default=["cifar10"],
                   help=f"probe data, one or more of: {', '.join(DATASETS)}")
    p.add_argument("--data-root", default="data")
    p.add_argument("--batch-size", type=at_least(1), default=256, help="linear-probe batch (the authors': 256)")
    p.add_argument("--probe-epochs", type=at_least(1), default=10, help="linear-probe epochs (the authors': 10)")
    p.add_argument("--features", default="raw", choices=["raw", "standardized", "both"],
                   help="linear probe on raw features (the paper's numbers) or train-standardized ones")
    p.add_argument("--knn-k", type=at_least(1), default=20, help="k of the k-NN probe (App. C.1)")
    p.add_argument("--knn-metric", default="l2", choices=["l2", "cosine"],
                   help="l2: Euclidean majority vote (the paper's); cosine: DINO's T=0.07 weighted vote")
    p.add_argument("--repeats", type=at_least(1), default=1, help="linear-probe seeds; the paper reports 3 (mean ± std)")
    p.add_argument("--seed", type=seed_type, default=0, help="first linear-probe seed (and the probe subsets)")
    p.add_argument("--probe-samples", type=at_least(10), nargs="+", default=None, metavar=("N_TRAIN", "N_TEST"),
                   help="cap the probe train (and test, default the same) splits, for quick CPU runs")
    p.add_argument("--out", default=None, help="where probe.md/probe.json go (default: runs/probe_<datasets>_<probed "
                                               "runs>); never a distill.py run directory")
    add_precision_arg(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name in args.dataset:
        if name not in DATASETS:
            p.error(f"unknown --dataset {name!r}; choose from {', '.join(DATASETS)}")
    if args.arch is not None and args.arch not in ARCHS:
        p.error(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    if args.random and args.arch is None:
        p.error("--random needs --arch")
    if not (args.paths or args.random):
        p.error("give run directories / checkpoints, or --arch ARCH --random")
    if args.probe_samples is not None and len(args.probe_samples) > 2:
        p.error("--probe-samples takes N_TRAIN [N_TEST]")
    args.out = args.out or default_out(args)
    return args


def default_out(args):
    """runs/probe_<datasets>_<what was probed>: probes of different runs keep their own tables."""
    names = [os.path.basename(os.path.normpath(p)) for p in args.paths]
    names += [f"random-{args.arch}-s{args.init_seed}"] if args.random else []
    name = f"probe_{'_'.join(args.dataset)}_{'+'.join(names)}"
    if len(name) > 120:   # many runs: a short name that still differs per set of runs
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return os.path.join("runs", name)


def probe(encoder, data, args, device):
    """Features once per (model, split), then every probe on them (§3; App. C.1): the linear probe
    once per seed (--repeats) on raw and/or standardized features, the k-NN probe once."""
    encoder.to(device)
    f_tr, f_te = (extract_features(encoder, data[f"x_{s}"], data, device=device) for s in ("train", "test"))
    result = {}
    for std in {"raw": [False], "standardized": [True], "both": [False, True]}[args.features]:
        result["linear_std" if std else "linear"] = [
            linear_probe(f_tr, data["y_train"], f_te, data["y_test"], data["num_classes"], epochs=args.probe_epochs,
                         batch_size=args.batch_size, seed=args.seed + i, standardize=std) for i in range(args.repeats)]
    result["knn"] = [knn_probe(f_tr, data["y_train"], f_te, data["y_test"], args.knn_k,
                               args.knn_metric, data["num_classes"])]
    encoder.cpu()
    return result


def probe_data(datasets, read, name, img_size, args, device):
    """Dataset `name` at `img_size` (None: its own resolution) with its probe subsets, loaded once:
    `datasets` caches it per resolution, `read` lists what was read (provenance)."""
    if img_size not in datasets:
        data = load_dataset(name, args.data_root, device, img_size=img_size)
        n_train, n_test = (args.probe_samples or [None])[0], (args.probe_samples or [None])[-1]
        for split, cap in (("train", n_train), ("test", n_test)):
            data[f"x_{split}"], data[f"y_{split}"] = probe_subset(data[f"x_{split}"], data[f"y_{split}"], cap,
                                                                  args.seed)
        datasets[img_size] = data
        read.append(data)
    return datasets[img_size]


def main(argv=None):
    args = parse_args(argv)
    device = setup_device(args.device, args.precision)
    # before the probing: a bad --out fails now, not after an hour; a run directory of another
    # script (a distillation run) is refused, a probe with other arguments too (never overwritten)
    open_run_dir(args.out, vars(args), {"device", "out"}, "probe.py")

    # ------------------------------------------------------------------ the encoders to probe
    models = []   # (source, arch, img_size, {subject: encoder})
    for path in args.paths:
        file = os.path.join(path, f"{args.which}.pt") if os.path.isdir(path) else path
        ckpt = load_checkpoint(file)
        c = ckpt["config"]
        models.append((path, c["arch"], c["img_size"],
                       {s: model_from_checkpoint(ckpt, s, file).encoder for s in ("teacher", "student")}))

    rows, read, t0 = [], [], time.time()
    for name in args.dataset:   # rows: dataset x model, as in Tables 1-4
        datasets, inputs = {}, {}   # this dataset at each checkpoint's resolution (None: its own)
        todo = list(models)
        if args.random:   # the encoder is drawn first, so this is distill.py's teacher for that seed
            img_size = probe_data(datasets, read, name, None, args, device)["img_size"]
            g = torch.Generator().manual_seed(args.init_seed)
            encoder = make_encoder(args.arch, generator=g, img_size=img_size)
            todo.append((f"random (seed {args.init_seed})", args.arch, img_size, {"teacher": encoder}))
        for source, arch, img_size, encoders in todo:
            data = probe_data(datasets, read, name, img_size, args, device)
            if img_size not in inputs:   # the flattened-input baseline, once per resolution
                inputs[img_size] = probe(make_encoder("flatten", img_size=img_size), data, args, device)
            rows.append(dict(source=source, arch=arch, dataset=name, img_size=img_size,
                             embed_dim=encoders["teacher"].embed_dim, input_dim=3 * img_size ** 2,
                             **{s: probe(e, data, args, device) for s, e in encoders.items()},
                             input=inputs[img_size]))
            print(f"probed {source} on {name}")

    # ------------------------------------------------------------------ Tables 1-4
    write_json(os.path.join(args.out, "probe.json"), rows)
    segments = start_provenance(args.out, "probe.py", data_record(*read), device)
    segments[-1]["seconds"] = round(time.time() - t0, 1)
    write_provenance(args.out, "probe.py", data_record(*read), segments)
    table = format_tables(rows, args)
    write_text(os.path.join(args.out, "probe.md"), table)
    release_run_dir(args.out)
    print(table)
    return rows


def fmt(accs):
    """Accuracy in percent; mean ± std over probe seeds when there are several."""
    if not accs:
        return "—"
    mean = 100 * statistics.fmean(accs)
    return f"{mean:.2f}" if len(accs) == 1 else f"{mean:.2f} ± {100 * statistics.stdev(accs):.2f}"


def format_tables(rows, args):
    names = {"linear": "Linear probe (raw features)", "linear_std": "Linear probe (standardized features)",
             "knn": f"k-NN probe (k={args.knn_k}, {args.knn_metric})"}
    out = []
    for probe_name in [k for k in names if k in rows[0]["input"]]:
        repeated = args.repeats > 1 and probe_name != "knn"   # k-NN has no randomness
        seeds = f", mean ± std over {args.repeats} probe seeds" if repeated else ""
        out += [f"### {names[probe_name]}, accuracy %{seeds}", "",
                "| dataset | model | source | teacher | student | input |", "|---|---|---|---|---|---|"]
        for r in rows:
            cells = [fmt(r.get(s, {}).get(probe_name, [])) for s in ("teacher", "student", "input")]
            out.append(f"| {r['dataset']} | {r['arch']} | {r['source']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    run_main(main)
