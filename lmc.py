"""Linear mode connectivity from the distilled student (Sarnthein et al., ICML 2023, §6, Fig. 7 and 9).

From one starting point, train K supervised copies that differ only in data order and
augmentation draws (the App. E.5 recipe), then walk the straight line between every pair,
θ(γ) = γ θ_i + (1 − γ) θ_j, and measure test error. Two copies are linearly mode-connected when
the error along the path does not rise above its endpoints: the barrier is
max_γ err(θ(γ)) − (err(θ_i) + err(θ_j)) / 2. Fig. 9: copies started at the distilled student θ*_S
share a basin; copies started at the random init θ_S (the teacher's location) do not.

    python lmc.py --arch resnet18 --init student:runs/resnet18_a1e-10_cifar10/best.pt --out runs/lmc_student
    python lmc.py --arch resnet18 --init random --out runs/lmc_random
    python lmc.py --plot runs/lmc_random runs/lmc_student --out runs        # Fig. 9: fig9.png, fig9.md
    python lmc.py --arch resnet20 --dataset fake --epochs 1 --copies 2 --points 5 --out runs/dry

Batch norm along the path (`--bn`): `interpolate` treats running statistics like weights (every
float tensor of the state dict is interpolated); `recompute` interpolates the parameters only and
re-estimates the statistics at each γ on a fixed subset of un-augmented training images.
Rerunning the same command resumes at the copy it reached; trained copies are kept as copy<i>.pt.
"""
import itertools
import json
import os
import statistics
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from common import (accuracy, add_supervised_args, arg_parser, at_least, atomic_save, autocast, check_run_kind,
                    check_same_data, check_supervised_args, data_record, start_provenance, write_provenance, normalize, open_run_dir, pyplot, read_jsonl, recipe_captions,
                    release_run_dir, run_main, save_figure, seed_type, setup_device, sgd, supervised_epoch, supervised_start,
                    UserError, write_json, write_jsonl, write_text)


def parse_args(argv=None):
    p = arg_parser(__doc__)
    add_supervised_args(p, "Fig. 9", "copy i uses seed + i for data order and augmentation",
                        "runs/lmc_<arch>_<init>")
    p.add_argument("--init-seed", type=seed_type, default=0, help="seed of the random init and of the classifier")
    p.add_argument("--copies", type=at_least(2), default=5, help="K supervised copies (paper: 5)")
    p.add_argument("--points", type=at_least(2), default=50, help="evenly spaced γ in [0, 1] per path (paper: 50)")
    p.add_argument("--bn", default="interpolate", choices=["interpolate", "recompute"],
                   help="BN statistics along the path: interpolated with the weights, or re-estimated")
    p.add_argument("--bn-samples", type=at_least(1), default=2048, help="train images for --bn recompute")
    args = p.parse_args(argv)
    check_supervised_args(p, args)
    if args.plot:
        return args
    args.out = args.out or f"runs/lmc_{args.arch}_{args.init.split(':')[0]}"
    return args


# ---------------------------------------------------------------------------------------------
# The linear path between two copies (Frankle et al. 2020).

def interpolate(state_i, state_j, gamma, keys=None):
    """γ θ_i + (1 − γ) θ_j for every float tensor of the state dicts, or for `keys` only (the
    other entries are θ_j's). γ = 0 and γ = 1 give θ_j and θ_i exactly."""
    keys = keys or {k for k, v in state_i.items() if v.is_floating_point()}
    return {k: gamma * v + (1 - gamma) * state_j[k] if k in keys else state_j[k] for k, v in state_i.items()}


@torch.no_grad()
def recompute_bn(model, x, data, batch_size=256):
    """Reset every BN layer and re-estimate its running statistics as an exact average over x."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # cumulative moving average: every batch weighs the same
    model.train()
    for xb in x.split(batch_size):
        with autocast(x.device):
            model(normalize(xb, data))
    model.eval()


def path_errors(model, state_i, state_j, gammas, data, bn="interpolate", bn_x=None):
    """Test error at each γ on the path from θ_j (γ = 0) to θ_i (γ = 1)."""
    params = {n for n, _ in model.named_parameters()} if bn == "recompute" else None
    errors = []
    for gamma in gammas:
        model.load_state_dict(interpolate(state_i, state_j, gamma, params))
        if bn == "recompute":
            recompute_bn(model, bn_x, data)
        errors.append(1 - accuracy(model, data))
    return errors


def barrier(errors):
    """The error barrier of Frankle et al. (2020): the path's peak above the endpoints' mean."""
    return max(errors) - (errors[0] + errors[-1]) / 2


# ---------------------------------------------------------------------------------------------

# A rerun may change these and keep the trained copies (they only change the evaluation of the paths).
RESUMABLE = {"device", "out", "plot", "points", "bn", "bn_samples"}


def main(argv=None):
    args = parse_args(argv)
    if args.plot:   # save_figure creates --out
        return plot_fig9(args.plot, os.path.join(args.out, "fig9.png"))
    device = setup_device(args.device, args.precision)
    open_run_dir(args.out, vars(args), RESUMABLE, "lmc.py", defaults=vars(parse_args([])),   # trained copies
                 state_files=[f"copy{i}.pt" for i in range(args.copies)])                    # belong to these arguments

    # ------------------------------------------------------------------ the shared starting point
    model, data = supervised_start(args, device, torch.Generator().manual_seed(args.init_seed))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data_read = data_record(data)
    done = sum(os.path.exists(os.path.join(args.out, f"copy{i}.pt")) for i in range(args.copies))
    t0, segments = time.time(), start_provenance(args.out, "lmc.py", data_read, device, f"{done} copies trained")

    # ------------------------------------------------------------------ K copies, different SGD noise
    states, own_errors = [], []
    for i in range(args.copies):
        path = os.path.join(args.out, f"copy{i}.pt")
        if os.path.exists(path):   # resume: this copy is done
            try:
                saved = torch.load(path, map_location=device, weights_only=True)
                states.append(saved["model"])
            except Exception as e:
                raise UserError(f"{path} is not readable ({type(e).__name__}); delete it to train copy {i} "
                                f"again") from None
            check_same_data(saved.get("data"), data_read, path)
            if {k: v.shape for k, v in states[-1].items()} != {k: v.shape for k, v in start.items()}:
                raise UserError(f"{path} holds another model than this --arch {args.arch}; delete it to train "
                                f"copy {i} again")
        else:
            model.load_state_dict(start)
            optimizer = sgd(model, args.weight_decay)
            steps = args.epochs * -(-len(data["y_train"]) // args.batch_size)
            with tqdm(total=steps, desc=f"copy {i}", dynamic_ncols=True) as bar:
                for epoch in range(1, args.epochs + 1):
                    supervised_epoch(model, optimizer, data, epoch, args.lr, args.milestones,
                                     args.batch_size, args.seed + i, bar)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            atomic_save(dict(arch=args.arch, seed=args.seed + i, args=vars(args), data=data_read, model=states[-1]), path)
        model.load_state_dict(states[-1])
        own_errors.append(1 - accuracy(model, data))
        print(f"copy {i}: test error {own_errors[-1]:.2%}")

    # ------------------------------------------------------------------ every pair's path (Fig. 9)
    gammas = torch.linspace(0, 1, args.points).tolist()
    order = torch.randperm(len(data["y_train"]), generator=torch.Generator().manual_seed(args.seed))
    bn_x = data["x_train"][order[:args.bn_samples].to(device)]   # fixed, un-augmented
    rows = []
    for i, j in itertools.combinations(range(args.copies), 2):
        errors = path_errors(model, states[i], states[j], gammas, data, args.bn, bn_x)
        rows.append(dict(i=i, j=j, gammas=gammas, errors=errors, barrier=barrier(errors)))
        print(f"copies {i}-{j}: barrier {rows[-1]['barrier']:.2%}")
    write_jsonl(os.path.join(args.out, "metrics.jsonl"), rows)
    barriers = [r["barrier"] for r in rows]
    summary = dict(init=args.init.split(":")[0], bn=args.bn, copy_errors=own_errors,
                   barrier_mean=statistics.fmean(barriers),
                   barrier_std=statistics.stdev(barriers) if len(barriers) > 1 else 0.0)
    write_json(os.path.join(args.out, "summary.json"), summary)
    segments[-1]["seconds"] = round(time.time() - t0, 1)
    write_provenance(args.out, "lmc.py", data_read, segments)
    plot_fig9([args.out], os.path.join(args.out, "fig9.png"))
    release_run_dir(args.out)
    print(f"LMC {args.arch} init={summary['init']} bn={args.bn}: barrier {summary['barrier_mean']:.2%} "
          f"± {summary['barrier_std']:.2%} over {len(rows)} pairs -> {args.out}")
    return rows, summary


def plot_fig9(run_dirs, path):
    """Fig. 9: test error along the linear paths, one panel per run (init); pairs thin, mean bold.
    The same numbers go to fig9.md beside the figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4.5 * len(run_dirs), 3.8), squeeze=False, sharey=True)
    runs = []
    for ax, d in zip(axes[0], run_dirs):
        check_run_kind(d, "lmc.py")
        try:
            rows = read_jsonl(os.path.join(d, "metrics.jsonl"))
            with open(os.path.join(d, "summary.json")) as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--plot {d}: not a finished lmc.py run ({type(e).__name__}: metrics.jsonl and "
                            f"summary.json needed)") from None
        runs.append((d, rows, summary))
        for r in rows:
            ax.plot(r["gammas"], [100 * e for e in r["errors"]], color="C0", lw=0.8, alpha=0.5)
        mean = [100 * statistics.fmean(es) for es in zip(*(r["errors"] for r in rows))]
        ax.plot(rows[0]["gammas"], mean, color="C0", lw=2.5)
        name = "finetune θ*_S (student)" if summary["init"] == "student" else "train from θ_S (random init)"
        ax.set(xlabel="interpolation γ", title=f"{name}\nbarrier {100 * summary['barrier_mean']:.1f} "
               f"± {100 * summary['barrier_std']:.1f}%, BN {summary['bn']}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test error (%)")
    captions = recipe_captions(run_dirs)
    if captions:
        fig.suptitle("linear mode connectivity (Fig. 9): " + "; ".join(captions), fontsize=10)
    path = save_figure(fig, path)
    write_text(os.path.join(os.path.dirname(path), "fig9.md"), fig9_table(runs))
    return path


def fig9_table(runs):
    """One row per run: its copies' own test errors, each pair's barrier and their mean ± std (%)."""
    lines = ["| run | start | BN along the path | copy test errors | barrier per pair | barrier, mean ± std |",
             "|---|---|---|---|---|---|"]
    for d, rows, summary in runs:
        errors = " / ".join(f"{100 * e:.1f}" for e in summary["copy_errors"])
        pairs = " / ".join(f"{100 * r['barrier']:.1f} ({r['i']}-{r['j']})" for r in rows)
        lines.append(f"| {os.path.normpath(d)} | {summary['init']} | {summary['bn']} | {errors} | {pairs} | "
                     f"**{100 * summary['barrier_mean']:.1f} ± {100 * summary['barrier_std']:.1f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
