"""Lottery tickets from the distilled student: iterative magnitude pruning with rewinding
(Sarnthein et al., ICML 2023, §6 "Lottery Tickets" / "IMP from the Student", Fig. 8, App. E.5).

Train encoder + linear classifier on CIFAR-10 (SGD, App. E.5), prune the globally smallest 20% of
the remaining weights, rewind the survivors to the starting point θ(ℓ) and train again; repeat.
A starting point "contains a lottery ticket" when accuracy survives strong sparsity. Fig. 8: the
distilled student at ℓ = 0 behaves like a fresh init rewound to ℓ = 1-2 epochs of supervised training.

    python imp.py --arch resnet18 --init student:runs/resnet18_a1e-10_cifar10/best.pt   # θ*_S, ℓ = 0
    for l in 0 1 2 5; do python imp.py --arch resnet18 --init random --rewind-epochs $l; done
    python imp.py --plot runs/imp_*                                                      # Fig. 8
    python imp.py --arch resnet20 --dataset fake --epochs 2 --rounds 2 --out runs/dry    # CPU dry run

Rerunning the same command resumes at the round and epoch it reached.
"""
import os
import time

import torch
from tqdm import tqdm

from common import (add_supervised_args, arg_parser, at_least, atomic_save, check_run_kind, check_same_data,
                    check_supervised_args, data_record, open_run_dir, pyplot, read_jsonl, recipe_captions,
                    release_run_dir, run_main, save_figure, setup_device, sgd, start_provenance, supervised_epoch,
                    supervised_start, UserError, write_args, write_jsonl, write_provenance, write_text)


def parse_args(argv=None):
    p = arg_parser(__doc__)
    add_supervised_args(p, "Fig. 8", "classifier init, fresh init, data order, augmentation",
                        "runs/imp_<arch>_<init>_l<rewind>")
    p.add_argument("--rewind-epochs", type=at_least(0), default=0,
                   help="ℓ: every round restarts from the weights after ℓ dense epochs (Fig. 8: 0, 1, 2, 5)")
    p.add_argument("--rounds", type=at_least(0), default=15, help="pruning rounds; density 0.8^k after round k")
    p.add_argument("--prune-fraction", type=float, default=0.2, help="of the remaining weights, per round")
    p.add_argument("--prune-all", action="store_true",
                   help="prune every parameter (the authors' runs) instead of conv/linear weights only")
    args = p.parse_args(argv)
    check_supervised_args(p, args)
    if args.plot:
        return args
    if not 0 < args.prune_fraction < 1:
        p.error("--prune-fraction must lie in (0, 1)")
    if not 0 <= args.rewind_epochs < args.epochs:
        p.error(f"--rewind-epochs must lie in [0, --epochs), got {args.rewind_epochs}")
    init_name = "student" if args.init.startswith("student:") else "random"
    args.out = args.out or f"runs/imp_{args.arch}_{init_name}_l{args.rewind_epochs}"
    return args


# ---------------------------------------------------------------------------------------------
# Global magnitude pruning (Frankle & Carbin 2018): one threshold across all prunable tensors.

def prunable(model, prune_all=False):
    """Names of the tensors IMP prunes: conv and linear weights (open_lth), or every parameter."""
    return [n for n, p in model.named_parameters() if prune_all or p.dim() > 1]


def prune(model, masks, n_keep):
    """New masks keeping the `n_keep` largest-magnitude surviving weights, ranked globally across
    all prunable tensors (so a tensor of large weights keeps more than one of small weights)."""
    params = dict(model.named_parameters())
    alive = torch.cat([params[n].detach().abs().flatten()[masks[n].flatten()] for n in masks])
    keep = torch.zeros(len(alive), dtype=torch.bool, device=alive.device)
    keep[alive.argsort(descending=True)[:n_keep]] = True
    new, offset = {}, 0
    for n, m in masks.items():
        flat, k = m.clone().flatten(), int(m.sum())
        flat[flat.nonzero().flatten()] = keep[offset:offset + k]
        new[n], offset = flat.view_as(m), offset + k
    return new


@torch.no_grad()
def apply_masks(model, masks):
    params = dict(model.named_parameters())
    for n, m in masks.items():
        params[n].mul_(m)


def density(masks):
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


# A rerun may change these and still resume; any other difference means another experiment.
RESUMABLE = {"device", "out", "plot", "rounds"}   # more rounds extend the same IMP run


def train_epoch(model, optimizer, data, epoch, masks, bar, args):
    """One epoch of the App. E.5 schedule, masks re-applied after every step; returns the test accuracy."""
    return supervised_epoch(model, optimizer, data, epoch, args.lr, args.milestones, args.batch_size,
                            args.seed, bar, after_step=lambda: apply_masks(model, masks))


def main(argv=None):
    args = parse_args(argv)
    if args.plot:   # save_figure creates --out
        return plot_fig8(args.plot, args.out)
    device = setup_device(args.device, args.precision)
    open_run_dir(args.out, vars(args), RESUMABLE, "imp.py", defaults=vars(parse_args([])), state_files=["state.pt"],
                 write=False)   # args.json once the state is known to fit the model
    state_path, metrics_path = os.path.join(args.out, "state.pt"), os.path.join(args.out, "metrics.jsonl")

    state = None
    if os.path.exists(state_path):
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{state_path} is not readable ({type(e).__name__}); move it away to start over") from None

    # ------------------------------------------------------------------ data and the starting point
    model, data = supervised_start(args, device, torch.Generator().manual_seed(args.seed))
    optimizer = sgd(model, args.weight_decay)
    steps_per_epoch = -(-len(data["y_train"]) // args.batch_size)

    # ------------------------------------------------------------------ IMP with rewinding (Fig. 6)
    params = dict(model.named_parameters())
    total = sum(params[nm].numel() for nm in prunable(model, args.prune_all))
    if state is None:
        masks = {nm: torch.ones_like(params[nm], dtype=torch.bool) for nm in prunable(model, args.prune_all)}
        if args.rewind_epochs:   # θ(ℓ): ℓ epochs of dense supervised training
            with tqdm(total=args.rewind_epochs * steps_per_epoch, desc="rewind point", dynamic_ncols=True) as bar:
                for epoch in range(1, args.rewind_epochs + 1):
                    train_epoch(model, optimizer, data, epoch, masks, bar, args)
        state = dict(args=vars(args), round=0, epoch=args.rewind_epochs, accs=[], masks=masks, rows=[],
                     rewind={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                     model=None, optimizer=None)
    data_read = data_record(data)
    check_same_data(state.get("data"), data_read, state_path)
    state["data"] = data_read
    own = {k: v.shape for k, v in model.state_dict().items()}
    if {k: v.shape for k, v in state["rewind"].items()} != own or set(state["masks"]) != set(prunable(model, args.prune_all)):
        raise UserError(f"{state_path} holds another model than this --arch {args.arch}; move it away to start over")
    write_args(args.out, "imp.py", vars(args))
    t0, segments = time.time(), start_provenance(args.out, "imp.py", data_read, device,
                                                 f"round {state['round']}, epoch {state['epoch']}")
    if "rows" not in state:   # a state file written before rows were kept in it
        state["rows"] = read_jsonl(metrics_path)[:state["round"]] if os.path.exists(metrics_path) else []
    write_jsonl(metrics_path, state["rows"])   # the rounds the state has finished, no more, no fewer
    masks = {k: v.to(device) for k, v in state["masks"].items()}
    if state["model"] is None:   # the start of a round: rewind the survivors (Frankle et al. 2019)
        model.load_state_dict(state["rewind"])
        apply_masks(model, masks)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    epochs_per_round = args.epochs - args.rewind_epochs
    epochs_left = (args.rounds + 1 - state["round"]) * epochs_per_round - (state["epoch"] - args.rewind_epochs)
    bar = tqdm(total=max(epochs_left, 0) * steps_per_epoch, dynamic_ncols=True)
    for rnd in range(state["round"], args.rounds + 1):
        bar.set_description(f"round {rnd}, {density(masks):.1%} weights")
        for epoch in range(state["epoch"] + 1, args.epochs + 1):
            state["accs"].append(train_epoch(model, optimizer, data, epoch, masks, bar, args))
            state.update(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict())
            atomic_save(state, state_path)   # resume point: this round, this epoch
        row = dict(round=rnd, density=density(masks), final_acc=state["accs"][-1], best_acc=max(state["accs"]),
                   rewind_epochs=args.rewind_epochs, init=args.init.split(":")[0])
        tqdm.write(f"round {rnd}: {row['density']:.2%} weights remaining, test acc {row['final_acc']:.2%} "
                   f"(best {row['best_acc']:.2%})")
        atomic_save(dict(arch=args.arch, round=rnd, density=row["density"], model=model.state_dict(), masks=masks),
                    os.path.join(args.out, f"round{rnd}.pt"))
        # prune by the trained weights' magnitudes, then rewind the survivors to θ(ℓ)
        masks = prune(model, masks, round(total * (1 - args.prune_fraction) ** (rnd + 1)))
        model.load_state_dict(state["rewind"])
        apply_masks(model, masks)
        optimizer.state.clear()   # fresh momentum for the next round
        # the row and the next round's state advance together: a kill in between repeats neither
        state.update(round=rnd + 1, epoch=args.rewind_epochs, accs=[], masks=masks, model=None, optimizer=None,
                     rows=[*state["rows"], row])
        atomic_save(state, state_path)
        write_jsonl(metrics_path, state["rows"])
        segments[-1]["seconds"] = round(time.time() - t0, 1)
        write_provenance(args.out, "imp.py", data_read, segments)
    bar.close()
    rows = state["rows"]
    plot_fig8([args.out], args.out)
    release_run_dir(args.out)
    print(f"IMP {args.arch} init={args.init} rewind={args.rewind_epochs}: "
          + ", ".join(f"{r['density']:.1%}: {r['final_acc']:.2%}" for r in rows) + f" -> {args.out}")
    return rows


def plot_fig8(run_dirs, out):
    """Fig. 8: test accuracy vs weights remaining (log x), one curve per init / rewind point, as
    <out>/fig8.png and the same numbers as <out>/fig8.md. Each round reports the accuracy after its
    last epoch (solid) and the best over its epochs (dashed): the authors select the best."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = []
    for d in run_dirs:
        check_run_kind(d, "imp.py")
        rows = read_jsonl(os.path.join(d, "metrics.jsonl")) if os.path.exists(os.path.join(d, "metrics.jsonl")) else []
        if not rows:
            continue
        label = f"init θ*_S (student), ℓ={rows[0]['rewind_epochs']}" if rows[0]["init"] == "student" \
            else f"init θ_S (random), ℓ={rows[0]['rewind_epochs']}"
        runs.append((d, label, rows))
        x = [100 * r["density"] for r in rows]
        line, = ax.plot(x, [100 * r["final_acc"] for r in rows], "o-", label=f"{label}, last epoch")
        ax.plot(x, [100 * r["best_acc"] for r in rows], "--", color=line.get_color(), alpha=0.6,
                label=f"{label}, best epoch")
    ax.set_xscale("log")
    ax.invert_xaxis()
    captions = recipe_captions(run_dirs)
    ax.set(xlabel="weights remaining (%)", ylabel="test accuracy (%)",
           title="IMP with rewinding (Fig. 8)" + "".join(f"\n{c}" for c in captions))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    path = save_figure(fig, os.path.join(out, "fig8.png"))
    write_text(os.path.join(out, "fig8.md"), fig8_table(runs))
    return path


def fig8_table(runs):
    """Test accuracy (%) per round as 'last epoch / best epoch', one row per run, one column per density."""
    rounds = max((len(rows) for _, _, rows in runs), default=0)
    dens = next((rows for _, _, rows in runs if len(rows) == rounds), [])
    lines = ["| run | start | " + " | ".join(f"{100 * r['density']:.3g}%" for r in dens) + " |",
             "|---|---|" + "---|" * len(dens)]
    for d, label, rows in runs:
        cells = [f"{100 * r['final_acc']:.1f} / {100 * r['best_acc']:.1f}" for r in rows] + ["-"] * (rounds - len(rows))
        lines.append(f"| {os.path.normpath(d)} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
