"""Loss and probing landscapes in the plane through three checkpoints (Sarnthein et al., ICML
2023, §5 Fig. 5; App. C.3 Fig. 13-16).

Three parameter vectors span a plane; on a grid in it we evaluate the teacher-student KL on a
fixed training subset (the loss landscape), the linear-probe accuracy of the encoder (the probing
landscape) and, with --encoder, the KL between teacher and student *embeddings* (Fig. 15).
Parameters only are combined; buffers (BN statistics) are those of the first point (or, with
--buffers interpolate, combined with the same weights: means linearly, variances in log space).

    # non-local view (Fig. 5 left): teacher, the alpha=1 student's init, the trained alpha=1 student
    python landscape.py --points teacher:runs/A1 init:runs/A1 student:runs/A1 --out runs/land_nonlocal
    # shared view (Fig. 5 right): teacher, the trained alpha~0 and alpha=1 students
    python landscape.py --points teacher:runs/A0 student:runs/A0 student:runs/A1 --out runs/land_shared
    # the same plane in distance-preserving coordinates (Fig. 13), a zoomed crop (Fig. 14)
    python landscape.py --points ... --frame ortho --out runs/land_shared_ortho
    python landscape.py --points ... --frame ortho --xlim -5 5 --ylim -5 5 --resolution 41 --out ...

A point is KIND:PATH with KIND one of teacher (the run's random teacher theta_T), init (the
student's initialization theta_S(alpha), rebuilt from the run's seeds and alpha) or student (the
trained student theta*_S), and PATH a distill.py run directory (its last.pt) or a checkpoint. The
KL is always against the teacher of the first point's run. Rerunning resumes the grid.
"""
import json
import math
import os
import time

import torch
from torch.func import functional_call, vmap

from common import (DATASETS, add_precision_arg, arg_parser, at_least, atomic_save, autocast, balanced_subset,
                    check_same_data, data_record, distillation_loss, linear_probe, load_checkpoint, load_dataset,
                    locality_init, make_model, model_from_checkpoint, normalize, open_run_dir, positive, probe_subset,
                    pyplot, release_run_dir, run_main, save_figure, seed_type, setup_device, start_provenance,
                    UserError, check_run_kind, write_json, write_provenance, write_text)

KINDS = ["teacher", "init", "student"]


def parse_args(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--points", nargs=3, metavar="KIND:PATH",
                   help=f"three points, KIND one of {', '.join(KINDS)}; the first is the origin of the interp frame")
    p.add_argument("--frame", default="interp", choices=["interp", "ortho"],
                   help="interp: theta = p0 + l1 (p1-p0) + l2 (p2-p0) (Fig. 5); ortho: orthonormal, "
                        "distance-preserving axes, origin at the plane's minimum-norm point (Fig. 13)")
    p.add_argument("--resolution", type=at_least(2), default=21, help="grid points per axis")
    p.add_argument("--xlim", type=float, nargs=2, default=None, help="default: the three points plus a margin")
    p.add_argument("--ylim", type=float, nargs=2, default=None)
    p.add_argument("--encoder", action="store_true", help="also the KL between embeddings (Fig. 15)")
    p.add_argument("--buffers", default="first", choices=["first", "interpolate"],
                   help="BN statistics at a grid point: the first point's (the authors'), or combined with the "
                        "same weights as the parameters, variances in log space (every anchor is exactly its "
                        "checkpoint)")
    p.add_argument("--arch", default=None, help="checked against the checkpoints (default: theirs)")
    p.add_argument("--dataset", default="cifar10", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--data-root", default="data")
    p.add_argument("--eval-samples", type=at_least(1), default=2048,
                   help="the fixed training subset of the KL (at most the dataset's balanced maximum)")
    p.add_argument("--probe-samples", type=at_least(10), nargs=2, default=[10000, 2000], metavar=("N_TRAIN", "N_TEST"),
                   help="probe train/test subsets (class-balanced, fixed)")
    p.add_argument("--epochs", type=at_least(1), default=10,
                   help="linear-probe epochs (the authors': 10, on 50k images; on ~1000 probe images 10 epochs "
                        "are ~40 steps and leave the raw probe at chance: use ~100)")
    p.add_argument("--lr", type=positive(), default=1e-3, help="linear-probe AdamW learning rate")
    p.add_argument("--batch-size", type=at_least(1), default=256, help="images per forward (and linear-probe batch)")
    p.add_argument("--points-per-batch", type=at_least(1), default=None,
                   help="grid points evaluated together in one vmapped forward (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--seed", type=seed_type, default=0, help="probe seed and subsets")
    p.add_argument("--out", default=None, help="run directory (default: runs/landscape; with --plot: runs)")
    p.add_argument("--plot", nargs="+", metavar="DIR",
                   help="only redraw these finished grids from their grid.json / landscape.json (no checkpoints "
                        "needed) and write their anchor values as <out>/landscape.md")
    add_precision_arg(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.plot:
        args.out = args.out or "runs"
        return args
    if not args.points:
        p.error("--points KIND:PATH KIND:PATH KIND:PATH is required (or --plot DIR...)")
    args.out = args.out or "runs/landscape"
    for spec in args.points:
        if spec.split(":", 1)[0] not in KINDS or ":" not in spec:
            p.error(f"bad point {spec!r}: use KIND:PATH with KIND one of {', '.join(KINDS)}")
    if args.dataset not in DATASETS:
        p.error(f"unknown --dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    for flag, lim in (("--xlim", args.xlim), ("--ylim", args.ylim)):
        if lim is not None and not (math.isfinite(lim[0]) and math.isfinite(lim[1]) and lim[0] < lim[1]):
            p.error(f"{flag} takes two finite numbers LOW HIGH with LOW < HIGH, got {lim[0]:g} {lim[1]:g}")
    return args


def load_point(spec):
    """(label, checkpoint, model) for KIND:PATH."""
    kind, path = spec.split(":", 1)
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    ckpt = load_checkpoint(path)
    a = ckpt.get("args")
    if not isinstance(a, dict) or not {"alpha", "student_seed"} <= set(a):
        raise UserError(f"point {spec}: {path} does not record the run's arguments (alpha, seeds); "
                        f"use a distill.py run directory or its last.pt / best.pt")
    if kind == "init":   # theta_S(alpha) of §4, rebuilt exactly as distill.py built it
        teacher = model_from_checkpoint(ckpt, "teacher", path)
        model = make_model(**ckpt["config"], generator=torch.Generator().manual_seed(a["student_seed"]))
        locality_init(teacher, model, a["alpha"])
    else:
        model = model_from_checkpoint(ckpt, kind, path)
    label = {"teacher": r"$\theta_T$", "init": r"$\theta_S(\alpha={alpha:g})$",
             "student": r"$\theta^*_S(\alpha={alpha:g})$"}[kind]
    return label.format(alpha=a["alpha"]), ckpt, model


# ----------------------------------------------------------------------------------------------
# The plane. A grid point is stored by its weights (w0, w1, w2) on the three points, theta =
# sum_i w_i p_i: at an anchor the weights are exactly one-hot, so theta is that checkpoint, bit for bit.

def stack_points(points, device):
    """{name: [3, ...] tensor on `device`} from three {name: tensor} dicts, wherever each tensor lives:
    the first model has been moved to the device, the other two have not (on CUDA a plain stack of
    them raised 'Expected all tensors to be on the same device')."""
    return {k: torch.stack([pts[k].detach().to(device) for pts in points]) for k in points[0]}


def plane_geometry(points):
    """Gram matrix of p0, p1, p2 (float64), from which every distance and norm in the plane follows."""
    flat = [torch.cat([p.detach().double().cpu().flatten() for p in pts.values()]) for pts in points]
    return torch.stack([torch.stack([a @ b for b in flat]) for a in flat])


def ortho_frame(gram):
    """Coordinates of the three points in an orthonormal basis (e1 along p1-p0, e2 Gram-Schmidt)
    of the plane, origin at its minimum-norm point: returns the 3x2 anchor coordinates."""
    # with v1 = p1 - p0, v2 = p2 - p0: <va, vb> and <p0, va> from the Gram matrix
    g = gram
    vv = torch.tensor([[g[a, b] - g[a, 0] - g[0, b] + g[0, 0] for b in (1, 2)] for a in (1, 2)], dtype=torch.float64)
    pv = torch.tensor([g[0, a] - g[0, 0] for a in (1, 2)], dtype=torch.float64)
    # e1 = v1 / |v1|, e2 = (v2 - <v2,e1> e1) / |...|, written as E = C V with C lower-triangular
    c11 = 1 / vv[0, 0].sqrt()
    r = vv[1, 0] * c11                      # <v2, e1>
    n2 = (vv[1, 1] - r * r).clamp_min(0).sqrt()
    if n2 < 1e-12 * vv[1, 1].sqrt():
        raise UserError("the three points are (nearly) collinear: they span no plane")
    C = torch.tensor([[c11, 0.0], [-r * c11 / n2, 1 / n2]], dtype=torch.float64)
    # coordinates of p_i: <p_i, e_k> = <p0, e_k> + <p_i - p0, e_k>
    p0e = C @ pv
    ve = torch.stack([C @ vv[:, 0], C @ vv[:, 1]])   # row a: <v_a, e_k>
    return torch.stack([p0e, p0e + ve[0], p0e + ve[1]])


def grid_weights(frame, anchors, xs, ys):
    """Barycentric weights [len(ys) * len(xs), 3] of the grid points (x fastest)."""
    X, Y = torch.meshgrid(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64), indexing="xy")
    X, Y = X.flatten(), Y.flatten()
    if frame == "interp":
        w = torch.stack([1 - X - Y, X, Y], 1)
    else:   # solve (x, y) = sum_i w_i c_i with sum_i w_i = 1
        A = torch.cat([anchors.T, torch.ones(1, 3, dtype=torch.float64)])
        w = torch.linalg.solve(A, torch.stack([X, Y, torch.ones_like(X)])).T
    # snap float64 dust so that grid points on an anchor are exactly that checkpoint
    for v in (0.0, 1.0):
        w = torch.where((w - v).abs() < 1e-9, torch.full_like(w, v), w)
    return w


def default_lims(frame, anchors):
    if frame == "interp":   # at 21 points (step 0.1) the anchors are grid points
        return [-0.5, 1.5], [-0.5, 1.5]
    # a square window (ortho is drawn with equal aspect) around the three points, 20% margin
    lo, hi = anchors.min(0).values, anchors.max(0).values
    center, half = (lo + hi) / 2, 0.7 * (hi - lo).max()
    return [(center[0] - half).item(), (center[0] + half).item()], [(center[1] - half).item(), (center[1] + half).item()]


def combine_bn_statistics(weights, buffers):
    """BN statistics at grid points `weights` [P, 3] from the three points' stacked buffers [3, ...]
    (--buffers interpolate). Means combine like the parameters; variances combine in log space
    (a weighted geometric mean): off the triangle some weights are negative, and a linearly combined
    variance went negative (clamped at 0, BN then scales by 1/sqrt(eps) ~ 316 per layer) at 36 of 121
    points of the real ortho grid, whose activations overflowed to inf; the geometric one is positive
    everywhere and, computed in float64, exactly each anchor's variance at its one-hot weights."""
    out = {}
    for k, v in buffers.items():
        if k.endswith("running_var"):
            log_var = torch.einsum("pi,i...->p...", weights.double(), v.double().clamp_min(1e-30).log())
            out[k] = log_var.exp().to(v.dtype)
        else:
            out[k] = torch.einsum("pi,i...->p...", weights.to(v.dtype), v)
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation: several grid points per forward, their parameters stacked and the model vmapped over them.

def evaluate_batch(model, stacked, weights, eval_data, args):
    """KL, probe accuracy (and embedding KL) at the grid points `weights` [P, 3]."""
    w = weights.float().to(eval_data["device"])
    params = {k: torch.einsum("pi,i...->p...", w, v) for k, v in stacked.items()}   # one-hot w: exact
    enc = {k[len("encoder."):]: v for k, v in params.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in params.items() if k.startswith("head.")}
    # BN statistics: the first point's for every grid point, or (--buffers interpolate) combined with the same weights
    fixed = {k[len("encoder."):]: v for k, v in model.named_buffers() if k.startswith("encoder.")}
    mixed = combine_bn_statistics(weights.to(w.device), eval_data["buffers"])
    fixed = {k: v for k, v in fixed.items() if k not in mixed}
    embed = vmap(lambda p, b, x: functional_call(model.encoder, (p, b, fixed), (x,)), in_dims=(0, 0, None))
    project = vmap(lambda p, e: functional_call(model.head, (p,), (e,)))

    kl, embed_kl = torch.zeros(len(w), device=w.device), torch.zeros(len(w), device=w.device)   # synced once
    for xb, t_logits, t_embed in zip(eval_data["x_eval"].split(args.batch_size), eval_data["t_logits"], eval_data["t_embed"]):
        with torch.no_grad(), autocast(eval_data["device"]):
            e = embed(enc, mixed, normalize(xb, eval_data["data"]))
            s = project(head, e)
        for i in range(len(w)):   # batch means, weighted back into the subset's mean
            kl[i] += distillation_loss(s[i], t_logits)[1] * len(xb)
            if args.encoder:
                embed_kl[i] += distillation_loss(e[i], t_embed)[1] * len(xb)

    def features(x):   # [P, N, D]: every point's encoder on the probe images
        with torch.no_grad(), autocast(eval_data["device"]):
            return torch.cat([embed(enc, mixed, normalize(xb, eval_data["data"])).float() for xb in x.split(args.batch_size)], 1)
    f_train, f_test = features(eval_data["x_probe_train"]), features(eval_data["x_probe_test"])
    probe = linear_probe(f_train, eval_data["y_probe_train"], f_test, eval_data["y_probe_test"], eval_data["classes"],
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    kl, embed_kl = (kl.double() / len(eval_data["x_eval"])).tolist(), (embed_kl.double() / len(eval_data["x_eval"])).tolist()
    return [dict(kl=kl[i], probe=probe[i], **({"embed_kl": embed_kl[i]} if args.encoder else {})) for i in range(len(w))]


def fixed_data(args, ckpt, device):
    """The preloaded evaluation data: a class-balanced training subset for the KL with the teacher's
    logits and embeddings on it (per batch, computed once), and the fixed probe subsets."""
    data = load_dataset(args.dataset, args.data_root, device, img_size=ckpt["config"]["img_size"])
    c = data["num_classes"]
    n_eval = max(args.eval_samples - args.eval_samples % c, c)   # class-balanced: a multiple of the classes
    x_eval = data["x_train"][balanced_subset(data["y_train"], n_eval, torch.Generator().manual_seed(args.seed),
                                             flag="--eval-samples")]
    x_probe_train, y_probe_train = probe_subset(data["x_train"], data["y_train"], args.probe_samples[0], args.seed)
    x_probe_test, y_probe_test = probe_subset(data["x_test"], data["y_test"], args.probe_samples[1], args.seed)
    teacher = model_from_checkpoint(ckpt, "teacher").to(device).eval()
    with torch.no_grad(), autocast(device):
        t_embed = [teacher.encoder(normalize(x, data)) for x in x_eval.split(args.batch_size)]
        t_logits = [teacher.head(e) for e in t_embed]
    return dict(device=device, data=data, x_eval=x_eval, x_probe_train=x_probe_train, y_probe_train=y_probe_train, x_probe_test=x_probe_test, y_probe_test=y_probe_test,
                classes=c, t_logits=t_logits, t_embed=t_embed)


# A rerun may change these and still resume the grid; any other difference means another experiment.
RESUMABLE = {"out", "device", "points_per_batch", "plot"}


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot_runs(args.plot, args.out)
    device = setup_device(args.device, args.precision)
    open_run_dir(args.out, vars(args), RESUMABLE, "landscape.py", state_files=["grid.pt"],
                 defaults=vars(parse_args(["--points", *args.points])))
    points_per_batch = args.points_per_batch or (8 if device.type == "cuda" else 1)

    # ------------------------------------------------------------------ the three points
    loaded = [load_point(s) for s in args.points]
    labels, ckpts, models = zip(*loaded)
    config = ckpts[0]["config"]
    for spec, c in zip(args.points, ckpts):
        if c["config"] != config:
            raise UserError(f"point {spec} is a {c['config']}, the first point a {config}: "
                            f"a plane needs three points of one architecture")
    if args.arch and args.arch != config["arch"]:
        raise UserError(f"--arch {args.arch}, but the checkpoints hold a {config['arch']}")
    model = models[0].to(device).eval()                  # its buffers serve every grid point
    points = [dict(m.named_parameters()) for m in models]
    stacked = stack_points(points, device)
    buffers = [dict(m.named_buffers()) for m in models] if args.buffers == "interpolate" else [{}]
    stacked_buffers = {k[len("encoder."):]: v for k, v in stack_points(buffers, device).items()
                       if k.startswith("encoder.") and v.is_floating_point()}
    gram = plane_geometry(points)
    for i, j in [(0, 1), (0, 2), (1, 2)]:   # e.g. teacher and init of an alpha=1e-10 run
        if gram[i, i] + gram[j, j] - 2 * gram[i, j] <= 1e-12 * gram[i, i]:   # |pi - pj| < 1e-6 |pi|
            raise UserError(f"points {args.points[i]} and {args.points[j]} are the same parameters: "
                            f"a plane needs three distinct points")
    anchors = ortho_frame(gram) if args.frame == "ortho" else torch.eye(3, dtype=torch.float64)[:, 1:]
    xlim, ylim = default_lims(args.frame, anchors)
    xlim, ylim = args.xlim or xlim, args.ylim or ylim
    xs = torch.linspace(*xlim, args.resolution, dtype=torch.float64).tolist()
    ys = torch.linspace(*ylim, args.resolution, dtype=torch.float64).tolist()
    weights = grid_weights(args.frame, anchors, xs, ys)

    # ------------------------------------------------------------------ fixed data, teacher outputs once
    eval_data = fixed_data(args, ckpts[0], device)
    data_read = data_record(eval_data["data"])
    eval_data["buffers"] = stacked_buffers

    # ------------------------------------------------------------------ the grid, resumable
    grid_path = os.path.join(args.out, "grid.pt")
    keys = ["kl", "probe", *(["embed_kl"] if args.encoder else [])]
    key_args = {k: v for k, v in vars(args).items() if k not in RESUMABLE}
    grid = dict(args=key_args, data=data_read, xs=xs, ys=ys, weights=weights, done=torch.zeros(len(weights), dtype=torch.bool),
                **{k: torch.full((len(weights),), float("nan"), dtype=torch.float64) for k in keys})
    if os.path.exists(grid_path):
        try:
            old = torch.load(grid_path, weights_only=True)
        except Exception as e:
            raise UserError(f"{grid_path} is not readable ({type(e).__name__}); delete it to compute the grid "
                            f"again") from None
        if old.get("args") != key_args:
            raise UserError(f"{grid_path} holds a grid with other arguments; rerun with those or pick another --out")
        check_same_data(old.get("data"), data_read, grid_path)
        grid = old
        print(f"resuming {grid_path}: {int(grid['done'].sum())}/{len(weights)} points done")

    t_grid, n_new = time.time(), 0
    segments = start_provenance(args.out, "landscape.py", data_read, device, f"{int(grid['done'].sum())} points done")
    for start in range(0, len(weights), points_per_batch):   # fixed chunks: a resumed run batches points as the first did
        chunk = slice(start, start + points_per_batch)
        if grid["done"][chunk].all():
            continue
        for j, row in enumerate(evaluate_batch(model, stacked, weights[chunk], eval_data, args)):
            for k in keys:
                grid[k][start + j] = row[k]
        grid["done"][chunk] = True
        n_new += len(weights[chunk])
        atomic_save(grid, grid_path)
        print(f"\r{int(grid['done'].sum())}/{len(weights)} points", end="", flush=True)
    print()

    # ------------------------------------------------------------------ results and figure
    coords = [[round(v, 6) for v in c] for c in anchors.tolist()]
    summary = dict(points=list(args.points), view=view_name(args.points), labels=list(labels), frame=args.frame,
                   arch=config["arch"], buffers=args.buffers, eval_samples=args.eval_samples,
                   probe_samples=args.probe_samples, anchor_coords=coords, gram=gram.tolist(),
                   distances={f"{i}-{j}": math.sqrt(max(gram[i, i] + gram[j, j] - 2 * gram[i, j], 0))
                              for i, j in [(0, 1), (0, 2), (1, 2)]},
                   seconds_per_point=(time.time() - t_grid) / n_new if n_new else None)
    write_json(os.path.join(args.out, "landscape.json"), summary)
    # the grid's values as JSON (NaN as null): what --plot and results/ read, no checkpoint needed
    write_json(os.path.join(args.out, "grid.json"),
               dict(xs=grid["xs"], ys=grid["ys"], weights=grid["weights"].tolist(),
                    **{k: [None if math.isnan(v) else v for v in grid[k].tolist()] for k in keys}))
    segments[-1]["seconds"] = round(time.time() - t_grid, 1)
    write_provenance(args.out, "landscape.py", data_read, segments)
    plot_landscape(*read_grid(args.out), os.path.join(args.out, "landscape.png"))
    release_run_dir(args.out)
    print(f"-> {args.out}/landscape.png")
    return grid


def view_name(points):
    """The paper's name for a plane from the kinds of its three points (Fig. 5)."""
    kinds = [spec.split(":", 1)[0] for spec in points]
    return {("teacher", "init", "student"): "non-local view", ("teacher", "student", "student"): "shared view"}.get(
        tuple(kinds), "plane through " + ", ".join(kinds))


def read_grid(run_dir):
    """(grid, summary) of a finished landscape run from its grid.json and landscape.json."""
    check_run_kind(run_dir, "landscape.py")
    try:
        with open(os.path.join(run_dir, "grid.json")) as f:
            g = json.load(f)
        with open(os.path.join(run_dir, "landscape.json")) as f:
            summary = json.load(f)
        grid = dict(xs=g["xs"], ys=g["ys"], weights=torch.tensor(g["weights"], dtype=torch.float64),
                    **{k: torch.tensor([math.nan if v is None else v for v in g[k]], dtype=torch.float64)
                       for k in ("kl", "probe", "embed_kl") if k in g})
        summary["gram"], summary["anchor_coords"]   # written by every run that has a grid.json
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--plot {run_dir}: not a finished landscape.py run ({type(e).__name__}: grid.json and "
                        f"landscape.json needed)") from None
    return grid, summary


def anchor_table(run_dirs):
    """Per plane: the value at the grid point nearest each of its three points (KL, probe, embedding KL)."""
    lines = ["| run | view, frame, BN statistics | point | nearest grid point (distance) | KL | probe % | embedding KL |",
             "|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        grid, s = read_grid(d)
        n = len(grid["xs"])
        X, Y = torch.meshgrid(torch.tensor(grid["xs"]), torch.tensor(grid["ys"]), indexing="xy")
        for spec, (cx, cy) in zip(s["points"], s["anchor_coords"]):
            dist = ((X.flatten() - cx) ** 2 + (Y.flatten() - cy) ** 2).sqrt()
            i = int(dist.argmin())
            val = lambda k, f, x=1: format(x * grid[k][i].item(), f) if k in grid and not math.isnan(grid[k][i]) else "-"
            lines.append(f"| {os.path.normpath(d)} | {s['view']}, {s['frame']}, {s.get('buffers', 'first')} | {spec} | "
                         f"({grid['xs'][i % n]:.3g}, {grid['ys'][i // n]:.3g}) ({dist[i]:.2g}) | {val('kl', '.2e')} | "
                         f"{val('probe', '.2f', 100)} | {val('embed_kl', '.2e')} |")
    return "\n".join(lines) + "\n"


def plot_runs(run_dirs, out):
    """--plot: redraw each grid as <out>/<run>.png and write <out>/landscape.md (the anchor values)."""
    os.makedirs(out, exist_ok=True)
    for d in run_dirs:
        plot_landscape(*read_grid(d), os.path.join(out, os.path.basename(os.path.normpath(d)) + ".png"))
    write_text(os.path.join(out, "landscape.md"), anchor_table(run_dirs))
    print(f"{out}/landscape.md: {len(run_dirs)} planes")
    return run_dirs


def plot_landscape(grid, summary, path):
    """Loss (log color), probing (and embedding-KL) landscapes as filled contours with ||theta||_2
    contours and the three points labelled (Fig. 5/13/15), from a run's grid and landscape.json."""
    plt = pyplot()
    anchors, labels, gram = summary["anchor_coords"], summary["labels"], torch.tensor(summary["gram"], dtype=torch.float64)
    import numpy as np
    from matplotlib.colors import LogNorm
    xs, ys, n = np.array(grid["xs"]), np.array(grid["ys"]), len(grid["xs"])
    weights = grid["weights"]
    norm = torch.einsum("pi,ij,pj->p", weights, gram, weights).clamp_min(0).sqrt().view(n, n).numpy()
    panels = [("kl", "loss landscape: KL(teacher || student)"), ("probe", "probing landscape: linear probe (%)")]
    panels += [("embed_kl", "embedding KL (encoder)")] if "embed_kl" in grid else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6))
    for ax, (key, title) in zip(axes, panels):
        z = np.ma.masked_invalid(grid[key].view(n, n).numpy())   # non-finite points stay blank
        if key == "probe":
            im = ax.contourf(xs, ys, 100 * z, levels=16, cmap="viridis")
        else:   # log color; a KL of exactly 0 (the teacher itself) gets the lowest level
            positive = z[z > 0].compressed()
            lo = positive.min() if positive.size else 1e-12
            z = z.clip(min=lo)
            levels = np.geomspace(lo, max(z.max(), lo * 10), 17)
            im = ax.contourf(xs, ys, z, levels=levels, cmap="magma_r", norm=LogNorm())
        fig.colorbar(im, ax=ax, format="%.3g")
        cs = ax.contour(xs, ys, norm, levels=6, colors="white", linewidths=0.6, alpha=0.8)
        ax.clabel(cs, fontsize=6, fmt="‖θ‖=%.0f")
        for (cx, cy), label in zip(anchors, labels):
            ax.plot(cx, cy, "o", color="cyan", markeredgecolor="black", zorder=3)
            ax.annotate(label, (cx, cy), textcoords="offset points", xytext=(5, 5), color="black", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0))
        ax.set(title=title, xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]))
        if summary["frame"] == "ortho":
            ax.set_aspect("equal")
            ax.set(xlabel="distance in parameter space", ylabel="distance in parameter space")
        else:
            ax.set(xlabel=f"λ1 (towards {labels[1]})", ylabel=f"λ2 (towards {labels[2]})")
    train, test = summary["probe_samples"]
    fig.suptitle(f"{summary['view']}, {summary['frame']} frame ({summary['arch']}, KL on {summary['eval_samples']} "
                 f"training images, probe {train}/{test})", fontsize=10)
    save_figure(fig, path)


if __name__ == "__main__":
    run_main(main)
