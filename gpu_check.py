"""One command that checks a GPU end to end, in about 8 minutes, and leaves what it measured in one folder.

    python gpu_check.py --data cifar10-jpeg.tar.gz --out gpu_check_out     # one GPU
    python gpu_check.py --small --out /tmp/gpu_check                       # a CPU: fake data, stages 1-2, < 1 min

Stages, in order, each time-boxed; a failed stage does not stop the next; one verdict line per
stage (PASS / FAIL with the error) as it ends, flushed to <out>/summary.md and <out>/check.json,
and the summary table last:
  1. units on the device: the loss and its gradient against float64; the compiled loss equal to
     eager and really compiled (no silent eager fallback); one VGG11 and one ResNet18 training step
     with no host synchronization inside the step (CUDA's sync debug mode set to error), their
     ms/step, img/s, s per 50k epoch and peak memory; a checkpoint written from the device that a
     plain torch.load reads on the CPU; fused AdamW resumed from its state dict equal to an
     uninterrupted run; k-NN and linear probes on the device equal to the CPU's on the same features;
  2. bench.py on the device: plain loop vs ours, side by side;
  3. Fig. 1's VGG11 at the paper's protocol (CIFAR-10's 50k images, batch 256, 100 epochs, probes
     every 10 epochs) in the authors' exact configuration (`--bottleneck authors --bias-decay 0.01`,
     alpha = 1e-10, the authors' numerics), then the default head if time is left, until the time
     box ends; distill.py writes every probe point as it comes, so a run cut short still says where
     it got. Its files (no checkpoints) are archived as <out>/runs.tar.gz, to go to results/gpu/.
"""
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

import common
from common import (arg_parser, at_least, atomic_save, compiled, distillation_loss, knn_probe, linear_probe,
                    machine_name, make_model, run_main, setup_device, to_cpu)
from distill import make_loss

HERE = os.path.dirname(os.path.abspath(__file__))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============ stage 1: units on the device ============

def loss_against_float64(device, small):
    """The distillation loss and its gradient on the device vs the same computed in float64."""
    g = torch.Generator().manual_seed(0)
    b, m = (16, 1024) if small else (256, 65536)
    s, t = 3 * torch.randn(b, m, generator=g), 3 * torch.randn(b, m, generator=g)
    s_dev = s.clone().to(device).requires_grad_()
    ce = distillation_loss(s_dev, t.to(device))[0]
    ce.backward()
    s64 = s.double().requires_grad_()
    ce64 = -(t.double().softmax(-1) * s64.log_softmax(-1)).sum(-1).mean()
    ce64.backward()
    ce_err = abs(ce.item() - ce64.item()) / abs(ce64.item())
    grad_err = ((s_dev.grad.cpu().double() - s64.grad).abs().max() / s64.grad.abs().max()).item()
    assert ce_err < 1e-6 and grad_err < 1e-4, f"loss rel. error {ce_err:.1e}, gradient {grad_err:.1e}"
    return dict(loss_rel_err=ce_err, grad_rel_err=grad_err)


def compiled_loss_equals_eager(device, small):
    b, m = (16, 1024) if small else (256, 65536)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(b, m, generator=g).to(device), torch.randn(b, m, generator=g).to(device)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()   # a graph cached by an earlier compile (same process) would hide a failed trace
    graphs = counters["stats"]["unique_graphs"]
    fast = compiled(distillation_loss, [(s.clone().requires_grad_(), t)])
    # no fallback: compiled() kept the compiled function, and dynamo captured a graph (with its
    # errors suppressed, a failed trace would run eager inside the compiled wrapper)
    assert fast is not distillation_loss, "torch.compile fell back to eager"
    assert counters["stats"]["unique_graphs"] > graphs, "dynamo captured no graph: the loss runs eager"
    out = []
    for fn in (distillation_loss, fast):
        x = s.clone().requires_grad_()
        ce, kl, _ = fn(x, t)
        ce.backward()
        out.append((ce.detach(), kl.detach(), x.grad))
    errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*out)]
    assert max(errs) < 1e-5, f"compiled vs eager: relative differences {errs}"
    return dict(max_rel_diff=max(errs))


def training_step(arch, device, small):
    """Steps of distill.py's training (cached teacher, compiled loss, fused AdamW), the timed ones with
    CUDA's sync debug mode on 'error': a host synchronization inside a step fails the check."""
    batch, out_dim, steps = (8, 1024, 2) if small else (256, 65536, 20)
    g = torch.Generator()
    teacher = make_model(arch, out_dim, bottleneck="authors", generator=g.manual_seed(0)).to(device).eval()
    teacher.requires_grad_(False)
    student = make_model(arch, out_dim, bottleneck="authors", generator=g.manual_seed(1)).to(device)
    x = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g.manual_seed(2)).to(device)
    data = dict(mean=torch.full((1, 3, 1, 1), 0.5, device=device), std=torch.full((1, 3, 1, 1), 0.25, device=device))
    loss_fn = make_loss(student, teacher, x, data, compile_batches=() if small else (batch,))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    idx = torch.arange(batch, device=device)

    def step():
        with common.autocast(device):
            loss, _ = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):   # warm-up: compilation, cuDNN autotuning, the optimizer state
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_sync_debug_mode("error")
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            step()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return dict(batch=batch, ms_per_step=1000 * seconds, img_per_s=batch / seconds,
                s_per_50k_epoch=50_000 / batch * seconds, peak_gib=peak)


def checkpoint_loads_on_cpu(device, out):
    model = make_model("resnet20", 256, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(2, 3, 32, 32, device=device)).sum().backward()
    opt.step()
    path = os.path.join(out, "check_ckpt.pt")
    atomic_save(dict(student=model.state_dict(), optimizer=opt.state_dict()), path)
    # what README shows: a plain load, no map_location; on a CPU-only machine a CUDA tensor would fail here
    state = torch.load(path, weights_only=True)
    os.remove(path)
    devices = {v.device.type for v in [*state["student"].values(),
                                       *[t for s in state["optimizer"]["state"].values() for t in s.values()]]}
    assert devices == {"cpu"}, f"tensors on {devices}"
    return dict(devices=sorted(devices))


def adamw_resumes(device):
    """Fused AdamW: 2 steps, state dict saved and loaded into a fresh model and optimizer, 2 more
    steps -- equal to 4 uninterrupted steps."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(device)

    def fresh():   # the same init every time
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
        common.init_weights(model, torch.Generator().manual_seed(0))
        model.to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    a, opt_a = fresh()
    steps(a, opt_a, 4)
    b, opt_b = fresh()
    steps(b, opt_b, 2)
    saved = to_cpu(dict(model=b.state_dict(), opt=opt_b.state_dict()))
    c, opt_c = fresh()
    c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    steps(c, opt_c, 2)
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), c.parameters()))
    assert diff == 0, f"resumed AdamW differs by {diff:.1e}"
    return dict(max_diff=diff)


def probes_match_cpu(device):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g)
    y_tr, y_te = torch.arange(2000) % 10, torch.arange(500) % 10
    f_tr = centers[y_tr] + 2 * torch.randn(2000, 64, generator=g)
    f_te = centers[y_te] + 2 * torch.randn(500, 64, generator=g)
    on = lambda d: [t.to(d) for t in (f_tr, y_tr, f_te, y_te)]
    knn = [knn_probe(*on(d)) for d in ("cpu", device)]
    lin = [linear_probe(*on(d), num_classes=10) for d in ("cpu", device)]
    assert knn[0] == knn[1], f"k-NN {knn}"
    assert abs(lin[0] - lin[1]) <= 0.004, f"linear {lin}"   # two test images of 500: kernels round differently
    return dict(knn=knn, linear=lin)


# ============ stages 2 and 3: the scripts themselves, as subprocesses with a time box ============

def run_script(cmd, timeout, log):
    """Run a project script, its output to `log`; returns (exit code or 'timeout', the output's tail)."""
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, *cmd], cwd=HERE, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    with open(log) as f:
        return code, f.read()[-3000:]


def bench_stage(device, small, out, timeout):
    flags = (["--archs", "resnet20", "--variants", "plain", "ours_eager", "--batch-size", "8", "--out-dim", "256",
              "--steps", "1", "--reps", "1"] if small else
             ["--archs", "vgg11", "resnet18", "--variants", "plain", "ours", "--steps", "30", "--reps", "2"])
    code, tail = run_script(["bench.py", "--device", str(device), *flags], timeout, os.path.join(out, "bench.log"))
    assert code == 0, f"bench.py exit {code}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
    ratios = [line for line in tail.splitlines() if "ratios over" in line]
    return dict(ratios=ratios)


def fig1_stage(data_root, out, deadline, work):
    """VGG11 at the paper's protocol, the authors' configuration first, then the default head. The run
    directories (checkpoints of hundreds of MB) live in `work`; <out> gets their logs and an archive
    of their small files."""
    runs = {}
    for name, head in (("vgg11_authors", ["--bottleneck", "authors", "--bias-decay", "0.01"]), ("vgg11_paper", [])):
        left = deadline - time.time()
        if left < 60:
            break
        run_dir = os.path.join(work, "runs", name)
        code, _ = run_script(["distill.py", "--arch", "vgg11", "--alpha", "1e-10", *head, "--dataset", "imagefolder",
                              "--data-root", data_root, "--epochs", "100", "--batch-size", "256", "--probe-every", "10",
                              "--out", run_dir], left - 30, os.path.join(out, f"{name}.log"))
        metrics = common.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if os.path.exists(
            os.path.join(run_dir, "metrics.jsonl")) else []
        last = metrics[-1] if metrics else {}
        runs[name] = dict(exit=code, epoch=last.get("epoch"), student_linear=last.get("student_linear"),
                          teacher_linear=last.get("teacher_linear"), student_knn=last.get("student_knn"))
    os.makedirs(out, exist_ok=True)
    with tarfile.open(os.path.join(out, "runs.tar.gz"), "w:gz") as tar:   # small files only: no checkpoints
        tar.add(os.path.join(work, "runs"), arcname="runs", filter=lambda t: None if t.name.endswith(".pt") else t)
    assert runs and all(r["epoch"] for r in runs.values()), f"no probe point reached: {runs}"
    return runs


# ============ the check ============

def main(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--out", required=True, help="folder for summary.md, check.json, logs and runs.tar.gz")
    p.add_argument("--data", default=None, help="cifar10-jpeg.tar.gz (stage 3 extracts it into --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="where to extract it (default: a temporary folder; never under --out, which stays a few "
                        "small files: summary.md, check.json, the logs, runs.tar.gz)")
    p.add_argument("--small", action="store_true", help="fake data, small shapes, stages 1-2 only (a CPU check)")
    p.add_argument("--minutes", type=at_least(1.0, float), default=8.0, help="the whole check's time box")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.small and args.data is None:
        p.error("--data cifar10-jpeg.tar.gz is needed for stage 3 (or --small)")
    if args.data is not None and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    start = time.time()
    deadline = start + 60 * args.minutes
    common.make_out_dir(args.out)
    device = setup_device(args.device, "auto")
    results = dict(device=str(device), machine=machine_name(device), torch=str(torch.__version__),
                   commit=common.git_commit(), stages=[])

    def record(stage, fn, *fn_args, limit=120):
        """Run one stage within `limit` seconds (SIGALRM: a hung compile or kernel fails the stage)."""
        t0 = time.time()
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError(f"over its {limit} s time box")))
        signal.alarm(int(limit))
        try:
            row = dict(stage=stage, verdict="PASS", **fn(*fn_args))
        except Exception as e:   # a failed stage is reported and the next one runs
            row = dict(stage=stage, verdict="FAIL", error=f"{type(e).__name__}: {str(e).strip()[:300]}")
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.time() - t0, 1)
        results["stages"].append(row)
        print(f"{row['verdict']} {stage}" + (f": {row['error']}" if "error" in row else ""), flush=True)
        common.write_json(os.path.join(args.out, "check.json"), results)   # flushed as it comes
        common.write_text(os.path.join(args.out, "summary.md"), summary(results))

    record("loss and gradient vs float64", loss_against_float64, device, args.small)
    record("compiled loss = eager, really compiled", compiled_loss_equals_eager, device, args.small)
    for arch in ("vgg11", "resnet18"):
        record(f"{arch} training step, no host sync", training_step, arch, device, args.small)
    record("checkpoint from the device loads on the CPU", checkpoint_loads_on_cpu, device, args.out)
    record("fused AdamW resumed = uninterrupted", adamw_resumes, device)
    record("probes on the device = probes on the CPU", probes_match_cpu, device)
    bench_s = min(180, deadline - time.time() - (0 if args.small else 120))
    record("bench.py: plain vs ours", bench_stage, device, args.small, args.out, bench_s, limit=bench_s + 30)
    if not args.small:
        data_dir = args.data_dir or tempfile.mkdtemp(prefix="gpu_check_data")   # the runs go there too
        data_root = os.path.join(data_dir, "cifar10-jpeg")
        if not os.path.isdir(data_root):
            with tarfile.open(args.data) as tar:
                tar.extractall(data_dir, filter="data")
        record("Fig. 1 VGG11, paper protocol (authors' head, then default)", fig1_stage, data_root, args.out, deadline,
               data_dir, limit=max(deadline - time.time(), 60) + 60)
    print(summary(results))
    return results


def summary(results):
    lines = [f"GPU check on {results['machine']} ({results['device']}), torch {results['torch']}, "
             f"commit {results['commit']}", "", "| stage | verdict | seconds | measured |", "|---|---|---|---|"]
    for r in results["stages"]:
        measured = r.get("error") or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in r.items() if k not in ("stage", "verdict", "seconds"))
        lines.append(f"| {r['stage']} | {r['verdict']} | {r['seconds']} | {measured} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
