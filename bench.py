"""Distillation throughput, measured side by side in one run: the plain style against ours.

(a) plain: what peers write, a torchvision-style dataset (PIL image -> ToTensor -> Normalize per
    item) behind a DataLoader, batches copied to the device, the teacher's full forward every step.
(b) ours: `common.train_epoch` with distill.py's `make_loss` and distill.py's defaults on this
    device: data resident on the device as uint8, batches are index slices, the frozen teacher's
    bottleneck codes cached once per run so a step runs only the teacher's last layer, the loss's
    65536-wide elementwise passes fused by torch.compile, a fused AdamW step (plain: torch's
    default AdamW), `--precision auto` and `--channels-last auto`. Modifiers name a variant of it:
    ours_fp32 / ours_bf16 (numerics), ours_cl / ours_nocl (memory format), ours_compile (the student
    compiled), ours_nocache (the teacher recomputed every step), ours_eager (the loss eager), and
    any combination (ours_bf16_cl_compile).

plain runs in PyTorch's default numerics (fp32 on CPU, TF32 convolutions on CUDA), what a peer's
loop gets without asking (plain_bf16: under bf16 autocast). All variants are built up front
and timed in turn, `--steps` steps each, `--reps` rounds; the median is reported. Also printed:
achieved FLOP/s (counted with FlopCounterMode) over the device's dense matmul peak, measured in
each variant's precision (bf16, fp32, or TF32 where convolutions run in TF32), peak memory of a
step (CUDA), and the one-off cost of the teacher cache. Ratios are over plain
(over the first variant listed when plain is not timed); the last line reads
`speedup (ours over plain): vgg11 X.XX, resnet18 Y.YY` when both are timed.

    python bench.py                               # CPU: few steps, a couple of minutes
    python bench.py --device cuda --steps 50      # GPU
    python bench.py --probe                       # a full probe against one distillation epoch
"""
import argparse
import math
import statistics
import time
import weakref

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import common
from common import (arg_parser, at_least, autocast, distillation_loss, extract_features, knn_probe, linear_probe,
                    make_model, run_main, setup_device, train_epoch)
from distill import CPU_AUTO_PRECISION, make_loss, teacher_codes

p = arg_parser(__doc__)
p.add_argument("--archs", nargs="+", default=["vgg11", "resnet18"])
VARIANTS = ["plain", "ours_nocache", "ours_eager", "ours_fp32", "ours", "ours_bf16", "ours_cl", "ours_compile"]
MODIFIERS = {"fp32": "in fp32", "bf16": "under bf16 autocast", "cl": "channels_last", "nocl": "contiguous (NCHW)",
             "compile": "the student compiled (--compile all)", "nocache": "the teacher recomputed every step",
             "eager": "the loss not compiled"}


def variant_type(v):
    """plain | ours, followed by modifiers joined with '_' (ours_bf16_cl, plain_bf16, ...)."""
    base, *mods = v.split("_")
    allowed = {"fp32", "bf16"} if base == "plain" else set(MODIFIERS)
    if (base not in ("plain", "ours") or not set(mods) <= allowed or len(set(mods)) < len(mods)
            or {"fp32", "bf16"} <= set(mods) or {"cl", "nocl"} <= set(mods)):
        raise argparse.ArgumentTypeError(f"invalid choice: {v!r} (plain or ours, then any of "
                                         + ", ".join(f"_{m}" for m in MODIFIERS) + "; plain takes _fp32/_bf16 only)")
    return v


p.add_argument("--variants", nargs="+", default=VARIANTS, type=variant_type, metavar="VARIANT",
               help="plain: the loop peers write, in PyTorch's default numerics (fp32 on CPU, TF32 convolutions "
                    "on CUDA) | ours: distill.py's defaults on this device (teacher cache, compiled loss, fused "
                    "AdamW, --precision auto and --channels-last auto); modifiers: "
                    + "; ".join(f"_{k}: {v}" for k, v in MODIFIERS.items()))
p.add_argument("--batch-size", type=at_least(1), default=256)
p.add_argument("--out-dim", type=at_least(2), default=65536)
p.add_argument("--steps", type=at_least(1), default=None, help="timed steps per repetition (default: 3 on CPU, 50 on CUDA)")
p.add_argument("--reps", type=at_least(1), default=3)
p.add_argument("--workers", type=at_least(0), default=None,
               help="DataLoader workers of the plain style (default: 0 on CPU, 8 on CUDA)")
common.add_precision_arg(p, CPU_AUTO_PRECISION)   # the numerics of 'ours' (modifiers _fp32/_bf16 override it)
p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="of 'ours', as distill.py's")
p.add_argument("--probe", action="store_true",
               help="instead: a full probe (features of 50k + 10k images, k-NN, linear) against one distillation "
                    "epoch (196 steps at batch 256) of each --archs, side by side")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


class PeerCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 -> PIL -> transform."""

    def __init__(self, x, transform):
        self.x, self.transform = x.permute(0, 2, 3, 1).numpy(), transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, precision):
    """Dense matmul FLOP/s in the numerics of `precision` (resolved): bf16 for bf16, TF32 for tf32 and
    tf32-conv (where the convolutions, most of a step's FLOPs, run in TF32), fp32 otherwise -- the
    peak that a step's achieved FLOP/s is a percentage of."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision.startswith("tf32")
    try:
        return _matmul_flops(device, n, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def _matmul_flops(device, n, dtype):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 2))
    return 2 * n ** 3 / best


def settings(variant, device, args):
    """What a variant runs: its precision (resolved), channels_last, a compiled student, the teacher
    cache, the compiled loss, fused AdamW."""
    base, *mods = variant.split("_")
    if base == "plain":   # what a peer's loop gets without asking: PyTorch's default numerics
        precision = "bf16" if "bf16" in mods else "tf32-conv" if device.type == "cuda" else "fp32"
        return dict(precision=precision, cl=False, compile=False, cache=False, compiled_loss=False, fused=False)
    precision = ("bf16" if "bf16" in mods else "fp32" if "fp32" in mods
                 else common.resolve_precision(args.precision, device, CPU_AUTO_PRECISION))
    common.set_precision(precision, device)   # build() makes the teacher cache in the variant's numerics
    cl = "cl" in mods or ("nocl" not in mods and common.use_channels_last(args.channels_last, device))
    return dict(precision=precision, cl=cl, compile="compile" in mods, cache="nocache" not in mods,
                compiled_loss="eager" not in mods, fused=True)


def build(arch, variant, data, args, device):
    """Teacher, student, optimizer and a `step_fn(n_steps)` that runs n training steps."""
    run = settings(variant, device, args)
    g = torch.Generator()
    teacher = make_model(arch, args.out_dim, generator=g.manual_seed(0)).to(device).eval().requires_grad_(False)
    student = make_model(arch, args.out_dim, generator=g.manual_seed(1)).to(device)
    student.load_state_dict(teacher.state_dict())
    if run["cl"]:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    model = student
    if run["compile"]:
        model = common.compiled(student, [(torch.randn(args.batch_size, 3, 32, 32, device=device),)])
    # ours: fused AdamW (one kernel over all parameters, CPU and CUDA); plain: torch's default
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=run["fused"])
    bs = args.batch_size

    if variant.startswith("plain"):
        tf = T.Compose([T.ToTensor(), T.Normalize(data["mean"].flatten().tolist(), data["std"].flatten().tolist())])
        loader = DataLoader(PeerCIFAR(data["x_cpu"], tf), batch_size=bs, shuffle=True, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0,
                            generator=torch.Generator().manual_seed(0))
        batches = iter(())

        def step_fn(n):
            nonlocal batches
            common.set_precision(run["precision"], device)   # variants are timed in turn: each sets its own
            for _ in range(n):
                xb = next(batches, None)
                if xb is None:
                    batches = iter(loader)
                    xb = next(batches)
                xb = xb[0].to(device, non_blocking=True)
                with autocast(device):
                    with torch.no_grad():
                        t = teacher(xb)
                    loss = distillation_loss(student(xb), t)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return step_fn, student, teacher

    x = data["x"]
    if run["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = make_loss(model, teacher, x, data, cache=run["cache"],
                        compile_batches=[bs] if run["compiled_loss"] else [])
    epoch = [0]

    def step_fn(n):   # n steps = one train_epoch over n batches of the resident data
        epoch[0] += 1
        common.set_precision(run["precision"], device)   # variants are timed in turn: each sets its own
        train_epoch(model, opt, loss_fn, n * bs, bs, 0, epoch[0], device)
    return step_fn, student, teacher


def distillation_loss_before(student_logits, teacher_logits):
    """The loss as it was before the memory pass (commit b470e17), kept to measure against."""
    s, t = student_logits.float(), teacher_logits.float()
    p_t = t.softmax(-1)
    ce = F.cross_entropy(s, p_t)
    with torch.no_grad():
        d = s - t
        d = d - (p_t * d).sum(-1, keepdim=True)
        kl = torch.log1p((p_t * torch.expm1(d)).sum(-1)) - (p_t * d).sum(-1)
        entropy = -(p_t * t.log_softmax(-1)).sum(-1)
    return ce, kl.mean(), entropy.mean()


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors the ops under it allocate and keep alive (counted per new storage,
    released when the tensor that brought it in is freed): the loss's own memory, on any device."""

    def __init__(self, *inputs):   # views of the inputs are not new memory
        super().__init__()
        self.live, self.peak = 0, 0
        self.seen = {x.untyped_storage().data_ptr() for x in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.seen.add(ptr)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, n)
        return out

    def _free(self, ptr, n):
        self.seen.discard(ptr)
        self.live -= n


def loss_peak_mib(loss, batch, out_dim, device):
    """Peak memory of the loss's forward + backward on [batch, out_dim] logits, beyond its inputs."""
    g = torch.Generator().manual_seed(0)
    t = (0.05 * torch.randn(batch, out_dim, generator=g)).to(device)
    s = (t + 1e-3 * torch.randn(batch, out_dim, generator=g).to(device)).requires_grad_()
    with PeakTensorBytes(s, t) as mode:
        ce, kl, entropy = loss(s, t)
        ce.backward()
        del ce, kl, entropy
    return mode.peak / 2**20


def flops_per_step(arch, variant, data, args, device):
    """FLOPs of one training step as FlopCounterMode counts them (forward + backward)."""
    # compiling, channels_last and bf16 change no FLOPs; the teacher cache does
    counted = "plain" if variant.startswith("plain") else "ours_fp32_nocl_eager" + ("_nocache" if "nocache" in variant else "")
    step_fn, *_ = build(arch, counted, data, args, device)
    with FlopCounterMode(display=False) as counter:
        step_fn(1)
    return counter.get_total_flops()


def probe_vs_epoch(arch, device, n_train=50_000, n_test=10_000, distill_batch=256, knn_k=20):
    """A full probe (features of 50k + 10k images, k-NN, linear) against one distillation epoch
    (196 steps at batch 256) of the same arch, timed side by side on this device. On a CPU only a
    slice of each forward-bound part is timed and scaled up (said in the output)."""
    cuda = torch.device(device).type == "cuda"
    frac = 1.0 if cuda else 1 / 20
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g).to(device)
    data = dict(mean=torch.full((1, 3, 1, 1), 0.5, device=device),
                std=torch.full((1, 3, 1, 1), 0.25, device=device))
    teacher = make_model(arch, generator=torch.Generator().manual_seed(0)).to(device).eval().requires_grad_(False)
    student = make_model(arch, generator=torch.Generator().manual_seed(1)).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)   # as distill.py

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    steps = math.ceil(n_train / distill_batch)
    n_steps = max(2, round(steps * frac))
    # as distill.py: teacher codes cached (once per run, not timed), loss compiled
    loss_fn = make_loss(student, teacher, x[:distill_batch * n_steps], data, compile_batches=[distill_batch])
    train_epoch(student, optimizer, loss_fn, distill_batch * 2, distill_batch, 0, 0, device)   # warm-up
    t_epoch, _ = timed(lambda: train_epoch(student, optimizer, loss_fn, distill_batch * n_steps,
                                           distill_batch, 0, 1, device))
    t_epoch *= steps / n_steps

    n_feat = max(1024, round((n_train + n_test) * frac))
    t_feat, feats = timed(lambda: extract_features(student.encoder, x[:n_feat], data, device=device))
    t_feat *= (n_train + n_test) / n_feat
    f = torch.randn(n_train + n_test, feats.shape[1], generator=g).to(device)   # full-size features
    t_knn, _ = timed(lambda: knn_probe(f[:n_train], y[:n_train], f[n_train:], y[n_train:],
                                       knn_k))
    t_lin, _ = timed(lambda: linear_probe(f[:n_train], y[:n_train], f[n_train:], y[n_train:], 10,
                                          epochs=10, batch_size=256))
    t_probe = t_feat + t_knn + t_lin
    scaled = "" if cuda else f" (forward-bound parts timed on {frac:.0%} and scaled)"
    print(f"{arch} on {device}, torch {torch.__version__}{scaled}")
    print(f"  distillation epoch ({steps} steps x {distill_batch}): {t_epoch:8.2f} s")
    print(f"  full probe: features {t_feat:.2f} s + k-NN {t_knn:.2f} s + linear {t_lin:.2f} s = {t_probe:8.2f} s")
    print(f"probe / epoch: {t_probe / t_epoch:.2f}")
    return t_probe / t_epoch


def main():
    args = p.parse_args()
    device = setup_device(args.device, args.precision, CPU_AUTO_PRECISION)
    if args.probe:
        return [probe_vs_epoch(arch, device) for arch in args.archs]
    args.steps = args.steps or (50 if device.type == "cuda" else 3)
    args.workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    n = max(args.steps, 4) * args.batch_size   # images the resident variants cycle through
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randint(0, 256, (max(n, 4096), 3, 32, 32), dtype=torch.uint8, generator=g)
    mean = torch.tensor([0.49, 0.48, 0.45], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26], device=device).view(1, 3, 1, 1)
    data = dict(x=x_cpu[:n].to(device), x_cpu=x_cpu, mean=mean, std=std)
    precision = {v: settings(v, device, args)["precision"] for v in args.variants}
    peaks = {p: matmul_peak(device, p) for p in sorted(set(precision.values()))}
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"out_dim {args.out_dim}, {args.steps} steps x {args.reps} reps, plain DataLoader workers "
          f"{args.workers}; dense matmul peak " + ", ".join(f"{p} {v / 1e12:.2f}" for p, v in peaks.items())
          + " TFLOP/s")
    speedups = {}
    for arch in args.archs:
        # the one-off cost of the cache, per 50k images (a CIFAR-10 epoch's worth)
        teacher = make_model(arch, args.out_dim, generator=g.manual_seed(0)).to(device).eval()
        with torch.no_grad():
            teacher_codes(teacher, data["x"][:args.batch_size], data)
            sync(device)
            t0 = time.perf_counter()
            teacher_codes(teacher, data["x"], data)
            sync(device)
        cache_s = (time.perf_counter() - t0) * 50_000 / n
        del teacher
        # all variants built up front and timed in turn, rep after rep: drift hits them alike
        built = {v: build(arch, v, data, args, device) for v in args.variants}
        times = {v: [] for v in args.variants}
        for v, (step_fn, *_) in built.items():
            step_fn(3)   # warm-up (and compilation)
        for _ in range(args.reps):
            for v, (step_fn, *_) in built.items():
                sync(device)
                t0 = time.perf_counter()
                step_fn(args.steps)
                sync(device)
                times[v].append(time.perf_counter() - t0)
        rows = {}
        for v in args.variants:
            img_s = args.steps * args.batch_size / statistics.median(times[v])
            rows[v] = img_s
            flops = flops_per_step(arch, v, data, args, device)
            print(f"{arch:9s} {v:20s} {img_s:9.1f} img/s  {50_000 / img_s:8.2f} s/epoch(50k)  "
                  f"{flops * img_s / args.batch_size / peaks[precision[v]]:6.1%} of {precision[v]} peak  "
                  f"{flops / args.batch_size / 1e9:6.2f} GFLOP/img")
        del built
        if device.type == "cuda":   # peak memory of one step of each, alone
            for v in ("plain", "ours"):
                step_fn, *_ = build(arch, v, data, args, device)
                step_fn(1)
                torch.cuda.reset_peak_memory_stats(device)
                step_fn(1)
                print(f"{arch:9s} {v:20s} peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
                del step_fn
        base = "plain" if "plain" in rows else args.variants[0]
        best = max((v for v in rows if v != "plain"), key=rows.get, default="plain")
        print(f"{arch:9s} teacher cache: {cache_s:.2f} s per 50k images, once per run; "
              f"best: {best}; ratios over {base}: "
              + ", ".join(f"{v} {rows[v] / rows[base]:.2f}" for v in rows if v != base))
        if "plain" in rows and "ours" in rows:
            speedups[arch] = rows["ours"] / rows["plain"]
    before = loss_peak_mib(distillation_loss_before, args.batch_size, args.out_dim, device)
    after = loss_peak_mib(distillation_loss, args.batch_size, args.out_dim, device)
    one = args.batch_size * args.out_dim * 4 / 2**20
    print(f"loss peak memory, forward + backward on [{args.batch_size} x {args.out_dim}] fp32 logits: before "
          f"{before:.0f} MiB ({before / one:.1f} logit-sized tensors), after {after:.0f} MiB ({after / one:.1f})")
    if speedups:
        print("speedup (ours over plain): " + ", ".join(f"{a} {r:.2f}" for a, r in speedups.items()))


if __name__ == "__main__":
    run_main(main)
