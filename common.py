"""Shared pieces of the "Random Teachers are Good Teachers" reproduction (Sarnthein et al., ICML 2023).

Models (encoders of paper Table 5 + the DINO-style projection head with its L2 bottleneck),
the locality-α student init (§4), device-resident data, the training loop, the linear and k-NN
probes (§3, App. C.1) and checkpoint I/O. Nothing here knows about any one experiment; the
scripts next to this file (distill.py, probe.py, ...) are the experiments.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


class UserError(Exception):
    """Bad input from the command line or the file system: reported in one line, exit code 2."""


def arg_parser(description):
    """argparse, but a bad flag is one line on stderr (no usage dump) and exit code 2."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message):
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    return parser


def run_main(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C one
    line with the resume hint (checkpoints are written atomically, so the last one is intact)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); the last checkpoint is intact: rerun the same command to resume from it",
              file=sys.stderr)
        sys.exit(130)


def at_least(lo, kind=int, strict=False):
    """argparse type: a finite number >= lo (> lo with `strict`), so a bad value is refused at
    parse time, naming its flag."""
    def check(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(v) and (v > lo if strict else v >= lo)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {lo:g}, got {text}")
        return v
    check.__name__ = kind.__name__   # argparse names the type in its messages
    return check


def seed_type(text):
    """argparse type of every seed flag: an integer in [0, 2^32) (torch.Generator takes at most 2^64 - 1,
    and the seeds are combined with epochs and steps)."""
    v = at_least(0)(text)
    if v >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^32), got {text}")
    return v


def positive(kind=float):
    """argparse type: a finite number > 0 (learning rates, epsilons)."""
    return at_least(0, kind, strict=True)


def add_precision_arg(p, cpu_auto="fp32"):
    """`--precision`, for every script that runs a network (see setup_device)."""
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="numerics: fp32; tf32-conv (CUDA: TF32 convolutions, fp32 matmuls, the authors' runs); "
                        "tf32 (CUDA: TF32 convolutions and matmuls); bf16 autocast; auto = tf32-conv on CUDA, "
                        f"{cpu_auto} on a CPU{' with AMX or AVX512-BF16 (else fp32)' if cpu_auto == 'bf16' else ''} "
                        "(RESULTS.md, 'Numerics'). provenance.json and args.json record what ran")


# ----------------------------------------------------------------------------------------------
# Run directories: one experiment each, locked while a process works in it, resumable.

def make_out_dir(out):
    """Create `--out` (and parents), or say in one line why it cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise UserError(f"--out {out}: cannot write a directory there ({why})") from None


_locks = {}   # run directory -> its open lock file; the OS releases the lock when the process exits

# What each script writes into its run directory: a run that predates args.json's "script" entry
# is known by these files.
RUN_FILES = {"distill.py": ("last.pt", "best.pt", "fig1.png"), "imp.py": ("state.pt", "fig8.png"),
             "lmc.py": ("copy0.pt", "summary.json", "fig9.png"), "landscape.py": ("grid.pt", "landscape.json"),
             "probe.py": ("probe.json", "probe.md")}


def read_args_json(out):
    """A run directory's args.json as a dict, or None when there is none; one line when it is not a
    JSON object (an edited or truncated file)."""
    path = os.path.join(out, "args.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (ValueError, OSError):
        raise UserError(f"{path} is not valid JSON; restore it or pick another --out") from None
    if not isinstance(old, dict):
        raise UserError(f"{path} is not a JSON object of arguments; restore it or pick another --out")
    return old


def run_script(out, old=None):
    """Which script wrote run directory `out`: its args.json's "script", else the files only that
    script writes; None for a directory that holds no run."""
    if old and isinstance(old.get("script"), str):
        return old["script"]
    files = set(os.listdir(out)) if os.path.isdir(out) else set()
    found = [s for s, names in RUN_FILES.items() if files & set(names)]
    return found[0] if len(found) == 1 else None


def check_run_kind(out, script, what="--plot"):
    """Refuse in one line a run directory that another script wrote (e.g. an IMP run given to
    distill.py --plot); returns its args.json (a dict, or {} when it has none)."""
    old = read_args_json(out) if os.path.isdir(out) else None
    other = run_script(out, old)
    if other is not None and other != script:
        raise UserError(f"{what} {out}: a run directory of {other}, not of {script}")
    return old or {}


def load_state(path):
    """A run's resume file (last.pt, state.pt, copy<i>.pt, grid.pt) as a dict, memory-mapped (only
    what is read is loaded); one line when it is unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); move it away to start over") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a resume file of this project; move it away to start over")
    return state


def open_run_dir(out, args, may_differ, script, defaults=None, state_files=(), write=True):
    """Make `out` this process's run directory, or refuse in one line: while another process holds
    it (an exclusive lock on <out>/.lock), when another script wrote it, or when it holds another
    experiment. The truth about what a run is are the arguments its resume files (`state_files`,
    e.g. last.pt) were written with, else its args.json: they must agree with `args` on every key
    outside `may_differ` (the arguments a rerun may change); a key an older run lacks is a flag
    added since, and that run had its value in `defaults`. Removes temp files that a killed write
    left behind. Writes args.json (with the script's name) unless `write` is False: a script with
    checks of its own to make first (the data, the model) then calls `write_args` after them."""
    import fcntl
    make_out_dir(out)
    lock = _locks.get(os.path.realpath(out)) or open(os.path.join(out, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # a no-op where this process holds it already
    except OSError:
        raise UserError(f"--out {out} is in use by another running process; wait for it or pick another --out") from None
    _locks[os.path.realpath(out)] = lock
    results = [f for f in os.listdir(out) if f not in (".lock", "args.json") and ".tmp" not in f]
    old = read_args_json(out)
    other = run_script(out, old) if results or old else None
    if other is not None and other != script:
        raise UserError(f"--out {out} is a run directory of {other}; {script} does not write into it: "
                        f"pick another --out")
    truth, source = old, "args.json"
    for name in state_files:   # the checkpoint is the truth: an edited args.json cannot change what it holds
        path = os.path.join(out, name)
        if os.path.exists(path):
            saved = load_state(path).get("args")
            if saved is not None:
                if not isinstance(saved, dict):
                    raise UserError(f"{path} holds no arguments dict; move it away to start over")
                truth, source = saved, name
                break
            if old is None:   # an old resume file without arguments and no args.json: nothing to check
                raise UserError(f"{out} holds {name} but no args.json: not a run of this command; pick another --out")
    if truth is not None and (results or source != "args.json"):
        defaults = defaults or {}
        diff = sorted(k for k in args if k not in may_differ and k != "script"
                      and (k in truth or k in defaults) and truth.get(k, defaults.get(k)) != args[k])
        if diff:
            was = ", ".join("--" + k.replace("_", "-") + f" {truth.get(k, defaults.get(k))}" for k in diff)
            raise UserError(f"{out} holds a run with other arguments ({was}, per its {source}); rerun with "
                            f"those or pick another --out")
    elif results and truth is None:
        raise UserError(f"{out} holds {', '.join(sorted(results)[:3])} but no args.json: not a run of this "
                        f"command; pick another --out")
    for f in os.listdir(out):   # what a kill during atomic_save / write_json leaves
        if ".tmp" in f:
            os.remove(os.path.join(out, f))
    if write:
        write_args(out, script, args)


def write_args(out, script, args):
    """<out>/args.json: the script's name, its arguments (a resume rewrites the ones it may change)
    and the precision that actually ran (`--precision auto` resolved by setup_device)."""
    write_json(os.path.join(out, "args.json"), {"script": script, **args,
                                                **({"precision_used": _precision} if _precision else {})})


def git_commit():
    """The commit of the code that is running, '+dirty' when tracked files differ from it; None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def machine_name(device):
    """The GPU's name, or the CPU model (what a timing or a float rounding depends on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def data_record(*datasets):
    """What a run read: per dataset its root, pixel fingerprint, split sizes and resolution. Keyed by
    the dataset's name, or by name:root where two share a name (two ImageFolder trees: transfer)."""
    names = [d["name"] for d in datasets]
    return {d["name"] if names.count(d["name"]) == 1 else f"{d['name']}:{d['root']}":
            dict(root=d["root"], fingerprint=d["fingerprint"], train=len(d["y_train"]), test=len(d["y_test"]),
                 img_size=d["img_size"]) for d in datasets}


def provenance_segment(device, start):
    """One stretch of a run in one process: the code, torch, machine and numerics that made it
    (`--precision auto` resolved), and where in the run it started (e.g. 'step 400'); a resumed run
    appends a segment."""
    return dict(commit=git_commit(), torch=str(torch.__version__), python=platform.python_version(),
                machine=machine_name(device), device=str(device), precision=_precision, malloc=_malloc,
                start=start, started=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=0.0)


def check_same_data(saved, data, path):
    """Refuse to resume `path` (written on the datasets `saved`, a data_record) on other pixels: the
    root may move, the fingerprints may not. A resume file older than data records passes."""
    was, now = ({k: v["fingerprint"] for k, v in d.items()} for d in (saved or data, data))
    if was != now:
        raise UserError(f"{path} was made from other data (fingerprints {was}); the data read now has {now}")


def start_provenance(out, script, data, device, start="the beginning"):
    """This process's segment appended to the ones <out>/provenance.json holds (a resumed run keeps
    its history), written at once; the caller sets segments[-1]['seconds'] and rewrites it."""
    try:
        with open(os.path.join(out, "provenance.json")) as f:
            old = json.load(f)["segments"]
        old = old if isinstance(old, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        old = []
    segments = [*old, provenance_segment(device, start)]
    write_provenance(out, script, data, segments)
    return segments


def write_provenance(out, script, data, segments):
    """<out>/provenance.json: the data a run read and every segment that ran it, with the total wall time."""
    write_json(os.path.join(out, "provenance.json"),
               dict(script=script, data=data, wall_time_s=round(sum(s["seconds"] for s in segments), 1),
                    segments=segments))


def release_run_dir(out):
    """Unlock `out` (a finished run; a process that exits releases it anyway)."""
    lock = _locks.pop(os.path.realpath(out), None)
    if lock is not None:
        lock.close()


def read_jsonl(path):
    """The rows of a JSON-lines file; a partial last line (a crash mid-write) is dropped."""
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 and any(l.strip() for l in lines[i + 1:]):
                raise UserError(f"{path}: line {i + 1} is not JSON; restore the file or pick another --out") from None
    return rows


def write_jsonl(path, rows):
    """Rewrite a JSON-lines file whole (temp file + rename): a crash leaves the old one or the new one."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path, row):
    """Append one row; a row that a crash cut short is dropped by `read_jsonl`, and the next row
    starts on a line of its own."""
    try:
        with open(path, "a+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise UserError(f"cannot append to {path} ({e.strerror}); its earlier rows are kept") from None


# ----------------------------------------------------------------------------------------------
# Encoders (paper Table 5, App. E.1). The encoder output is the embedding that gets probed.

NORMS = ["batch", "instance", "group8", "layer", "none"]


def norm_layer(norm):
    """Factory C -> module for `--norm` (App. B.1). Instance/group/layer norm are all GroupNorm."""
    return {
        "batch": nn.BatchNorm2d,
        "instance": lambda c: nn.GroupNorm(c, c),
        "group8": lambda c: nn.GroupNorm(c // 8, c),   # 8 channels per group
        "layer": lambda c: nn.GroupNorm(1, c),
        "none": lambda c: nn.Identity(),
    }[norm]


VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def vgg(cfg, norm):
    """torchvision's VGG `features` (conv bias on), no avgpool, no classifier, flattened.
    The paper removes BatchNorm from VGG11 (§4) to rule out batch-dependent signal."""
    layers, c_in = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1)]
            layers += [] if norm == "none" else [norm_layer(norm)(v)]
            layers += [nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers, nn.Flatten())


def torchvision_resnet(arch, norm):
    """torchvision ResNet with the CIFAR stem (App. E.1): 3x3 stride-1 conv1, no maxpool, no fc."""
    import torchvision   # here, not at the top: the method (VGG, CIFAR ResNets, ViTs, head, loss) runs without it
    net = getattr(torchvision.models, arch)(norm_layer=norm_layer(norm))
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class CifarBlock(nn.Module):
    """BasicBlock of He et al. (2016) CIFAR ResNets, 1x1 conv + norm projection when shape changes."""

    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm)(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm)(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          norm_layer(norm)(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(blocks_per_stage, norm):
    """ResNet20/56 (paper Table 5, 'ResNet20*'): 16/32/64 channels, global average pool."""
    layers, c_in = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm_layer(norm)(16), nn.ReLU(inplace=True)], 16
    for i, c in enumerate([16, 32, 64]):
        for j in range(blocks_per_stage):
            layers.append(CifarBlock(c_in, c, 2 if (i > 0 and j == 0) else 1, norm))
            c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ViT(nn.Module):
    """A standard pre-norm ViT with CLS-token output: 12 blocks of their own, patch 8 on 32 px (App.
    C.2's text). Not the model behind Table 5 (that is AuthorsViT, `vit_tiny` ...): `vit_tiny_std` ..."""

    def __init__(self, width, heads, depth=12, patch=8, img_size=32):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Linear(3 * patch * patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch) ** 2, width))
        layer = lambda: nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                   activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.ModuleList([layer() for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        p = self.patch
        x = F.unfold(x, p, stride=p).transpose(1, 2)              # B x patches x 3*p*p
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch_embed(x)], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


class AuthorsViT(nn.Module):
    """The ViT that Table 5 measured and counts (dinopl's models/vit.py): ONE pre-norm transformer
    block applied `depth` times (their `num_layers * [Block(...)]` repeats a single module: 594,048
    parameters for ViT-Tiny), a 16-px patch embedding (4 patches at 32 px; App. C.2's text says
    patch 8, its parameter counts say 16), a CLS token and position embeddings, a final LayerNorm,
    the CLS output. Two quirks of that code stay, since they are the model the paper ran: its
    attention softmax compares the *heads* of one token ([heads x heads] per token, not [tokens x
    tokens]) and the reshape after it interleaves tokens and heads -- the only place tokens mix; its
    MLP applies GELU after the second layer too. Init as theirs: PyTorch's default for every linear
    layer and the patch embedding (uniform +-1/sqrt(fan_in), weights and biases), N(0, 1) CLS token
    and positions, LayerNorms 1 / 0."""

    def __init__(self, width, heads, depth=12, patch=16, img_size=32):
        super().__init__()
        self.heads, self.depth = heads, depth
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch) ** 2, width))
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm = nn.LayerNorm(width)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                bound = 1 / math.sqrt(m.weight[0].numel())   # 1/sqrt(fan_in)
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, generator=generator)
        nn.init.normal_(self.pos_embed, generator=generator)

    def block(self, x):
        B, L, E = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(B, L, 3, self.heads, E // self.heads).permute(2, 0, 1, 3, 4)   # B L H E/H
        attn = (q @ k.transpose(-2, -1) * (E // self.heads) ** -0.5).softmax(-1)     # B L H H: heads vs heads
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, L, E))              # B H L E/H read as B L E
        return x + F.gelu(self.fc2(F.gelu(self.fc1(self.norm2(x)))))

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                           # B x patches x width
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for _ in range(self.depth):   # the same block every time
            x = self.block(x)
        return self.norm(x)[:, 0]


VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_medium": (512, 8), "vit_base": (768, 12)}   # Table 5's
STD_VITS = {f"{name}_std": size for name, size in VITS.items()}   # standard 12-block ViTs, patch 8
RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
CIFAR_RESNETS = {"resnet20": 3, "resnet56": 9}
ARCHS = [*VGG_CFGS, *RESNETS, *CIFAR_RESNETS, *VITS, *STD_VITS, "flatten"]
DEFAULT_NORM = {**{a: "none" for a in VGG_CFGS}, **{a: "batch" for a in [*RESNETS, *CIFAR_RESNETS]},
                **{a: "layer" for a in [*VITS, *STD_VITS]}, "flatten": "none"}


def make_encoder(arch, norm=None, generator=None, img_size=32):
    """The encoder g_psi of paper §3 with `.embed_dim`; all init randomness from `generator`."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    norm = norm or DEFAULT_NORM[arch]
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    if (arch in VITS or arch in STD_VITS) and norm != "layer":
        raise UserError(f"{arch} uses LayerNorm; --norm applies to the convnets only")
    # five 2x2 max-pools; one 16x16 / 8x8 patch
    smallest = 32 if arch in VGG_CFGS else 16 if arch in VITS else 8 if arch in STD_VITS else 1
    if img_size < smallest:
        raise UserError(f"{arch} needs images of at least {smallest}x{smallest} px, these are {img_size}x{img_size}; "
                        f"resize them first")
    if arch in VGG_CFGS:
        enc, embed = vgg(VGG_CFGS[arch], norm), 512 * (img_size // 32) ** 2
    elif arch in RESNETS:
        enc, embed = torchvision_resnet(arch, norm), RESNETS[arch]
    elif arch in CIFAR_RESNETS:
        enc, embed = cifar_resnet(CIFAR_RESNETS[arch], norm), 64
    elif arch in VITS:
        width, heads = VITS[arch]
        enc, embed = AuthorsViT(width, heads, img_size=img_size), width
    elif arch in STD_VITS:
        width, heads = STD_VITS[arch]
        enc, embed = ViT(width, heads, img_size=img_size), width
    else:  # the flattened-input baseline of Table 1 ("input")
        enc, embed = nn.Flatten(), 3 * img_size * img_size
    enc.embed_dim = embed
    if isinstance(enc, AuthorsViT):
        enc.reset_parameters(generator)
    else:
        init_weights(enc, generator)
    return enc


@torch.no_grad()
def init_weights(module, generator=None):
    """Kaiming init as torchvision does it (conv: normal, fan_out, relu; norm: 1/0), linear layers
    trunc-normal(0.02) with zero bias (DINO head, App. E.1). Every draw comes from `generator`,
    in module order, so one seed fixes one network."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(m, (nn.Linear, nn.MultiheadAttention)):
            for name, p in m.named_parameters(recurse=False):
                if p.dim() > 1:
                    nn.init.trunc_normal_(p, std=0.02, generator=generator)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
        elif isinstance(m, ViT):
            nn.init.trunc_normal_(m.cls_token, std=0.02, generator=generator)
            nn.init.trunc_normal_(m.pos_embed, std=0.02, generator=generator)
        for name, p in m.named_parameters(recurse=False):
            if "bias" in name:
                nn.init.zeros_(p)


# ----------------------------------------------------------------------------------------------
# Projection head with the L2 bottleneck (App. A, App. B.2, App. E.1).

# The bottleneck as 6 on/off fields, in the order of Fig. 12's legend.
BOTTLENECK_FIELDS = ["wn1", "lin1", "fn1", "wn2", "lin2", "fn2"]
BOTTLENECKS = {
    "paper": "011110",    # App. A as written: linear+bias -> L2 normalize -> weight-normalized linear
    "authors": "011010",  # the authors' runs: in their code the last layer's weight norm had no effect
}


def parse_bottleneck(spec):
    """'paper', 'authors' or a 6-digit bit string wn1 lin1 fn1 wn2 lin2 fn2 -> dict of bools."""
    bits = BOTTLENECKS.get(spec, spec)
    if len(bits) != 6 or set(bits) - {"0", "1"}:
        raise UserError(f"bad --bottleneck {spec!r}: use 'paper', 'authors' or 6 bits "
                        f"{'/'.join(BOTTLENECK_FIELDS)}, e.g. 011110")
    fields = dict(zip(BOTTLENECK_FIELDS, (b == "1" for b in bits)))
    for i in "12":
        if fields["wn" + i] and not fields["lin" + i]:
            raise UserError(f"bad --bottleneck {spec!r}: wn{i} needs lin{i}")
    return fields


class NormedLinear(nn.Linear):
    """Linear whose output units have unit-norm weight rows when `weight_norm` (||V_:,i|| = 1)."""

    def __init__(self, d_in, d_out, bias, weight_norm):
        super().__init__(d_in, d_out, bias=bias)
        self.weight_norm = weight_norm

    def forward(self, x):
        w = F.normalize(self.weight, dim=1) if self.weight_norm else self.weight
        return F.linear(x, w, self.bias)


class Head(nn.Module):
    """MLP embed->2048->2048 (GELU after each), then the L2 bottleneck: 2048->256 with bias,
    L2-normalize, then 256->out_dim without bias (weight-normalized in the paper's text)."""

    def __init__(self, embed_dim, out_dim=65536, bottleneck="paper", hidden=2048, bottleneck_dim=256):
        super().__init__()
        fields = parse_bottleneck(bottleneck)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        d = hidden
        self.lin1 = NormedLinear(d, bottleneck_dim, True, fields["wn1"]) if fields["lin1"] else None
        d = bottleneck_dim if fields["lin1"] else d
        self.lin2 = NormedLinear(d, out_dim, False, fields["wn2"]) if fields["lin2"] else None
        self.fn1, self.fn2 = fields["fn1"], fields["fn2"]
        self.out_dim = out_dim if fields["lin2"] else d

    def bottleneck(self, x):
        """Everything up to the last layer: the 256-d L2-normalized code z (paper default)."""
        x = self.mlp(x)
        if self.lin1 is not None:
            x = self.lin1(x)
        if self.fn1:
            x = F.normalize(x.float(), dim=-1, eps=1e-12).to(x.dtype)
        return x

    def project(self, z):
        """The last layer: code z -> out_dim logits."""
        if self.lin2 is not None:
            z = self.lin2(z)
        if self.fn2:
            z = F.normalize(z.float(), dim=-1, eps=1e-12).to(z.dtype)
        return z

    def forward(self, x):
        return self.project(self.bottleneck(x))


class Model(nn.Module):
    """f_theta = h_phi o g_psi (paper §3): `.encoder` is probed, `.head` produces the logits."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


def make_model(arch, out_dim=65536, bottleneck="paper", norm=None, img_size=32, generator=None):
    encoder = make_encoder(arch, norm, generator, img_size)
    head = Head(encoder.embed_dim, out_dim, bottleneck)
    init_weights(head, generator)
    return Model(encoder, head)


@torch.no_grad()
def locality_init(teacher, fresh, alpha):
    """Student init of §4: theta_S = ((1-a) theta_T + a theta_R) / sqrt((1-a)^2 + a^2), on every
    parameter; buffers (BN running stats) stay those of the fresh init. Modifies `fresh`.
    In float32, alpha=1e-10 is alpha=0 up to rounding, not a bit-exact copy: most weights come out equal
    to the teacher's, but e.g. VGG11 with the paper's head has 48,991 of its 31.8M parameters off by up
    to 1.8e-11 (ResNet20: 33,809, up to 5.8e-11). The student escapes from such float residue,
    amplified by Adam."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must lie in [0, 1], got {alpha}")
    delta = math.sqrt((1 - alpha) ** 2 + alpha ** 2)   # keeps the init's variance for any alpha
    for p_s, p_t in zip(fresh.parameters(), teacher.parameters()):
        p_s.copy_(((1 - alpha) * p_t + alpha * p_s) / delta)
    return fresh


def flat_params(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------------------------
# Data: each split decoded once into a uint8 tensor, cached on disk, kept on the device.

DATASETS = {
    # name: (classes, image size, mean, std)
    "cifar10": (10, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": (100, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "stl10": (10, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),        # 96 px resized to 32
    "tinyimagenet": (200, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": (None, None, None, None),   # classes, size and stats read off the data
    "fake": (10, 32, None, None),              # small synthetic set for tests and dry runs
}
NOISE = "gaussian"   # distill on x ~ N(0, 1) shaped like the probe dataset (Fig. 4)

EXPECTED_FILES = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}",
    "cifar100": "ROOT/cifar-100-python/{train,test}",
    "stl10": "ROOT/stl10_binary/{train,test}_{X,y}.bin",
    "tinyimagenet": "ROOT/tiny-imagenet-200/{train/<wnid>/images/*.JPEG,val/images/*.JPEG,"
                    "val/val_annotations.txt}",
    "imagefolder": "ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg",
}


def _missing(name, root, why=""):
    return UserError(
        f"{name} not found under {root!r}{why}: expected {EXPECTED_FILES[name].replace('ROOT', root)}. "
        f"Offline, any tree ROOT/train/<class>/* + ROOT/test/<class>/* works with --dataset imagefolder "
        f"(e.g. tar -xzf cifar10-jpeg.tar.gz, then --data-root cifar10-jpeg)")


def _torchvision_split(name, root, train):
    """CIFAR-10/100 and STL-10 through torchvision, downloaded when missing and online."""
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[name]
    kw = dict(train=train) if name != "stl10" else dict(split="train" if train else "test")
    try:
        ds = cls(root, download=False, **kw)
    except RuntimeError:
        try:
            ds = cls(root, download=True, **kw)
        except Exception as e:
            raise _missing(name, root, f" and the download failed ({type(e).__name__})") from None
    if name == "stl10":
        x, y = torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
        x = F.interpolate(x.float(), size=32, mode="bilinear", antialias=True).round().clamp(0, 255).byte()
    else:
        x, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    return x, y


def _rgb8(im, path):
    """An opened image as uint8 RGB [H, W, 3]. 16-bit grayscale (PNG's I;16, or I from older
    Pillow) is scaled to 8 bits: convert("RGB") would clip it to 255, a white image. Modes without
    a fixed range (32-bit integer or float, e.g. from TIFF) are refused."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        gray = np.asarray(im).astype(np.float64) * (255 / 65535)
        return np.repeat(gray.round().clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode in ("I", "F"):
        raise UserError(f"{path} is a {'32-bit integer' if im.mode == 'I' else 'float'} image (mode {im.mode}) "
                        f"with no fixed range; convert it to 8-bit RGB first")
    return np.asarray(im.convert("RGB"))


def _decode(files):
    """Decode image files into one uint8 [N, 3, H, W] tensor; an unreadable file or one of another
    size is refused with its path (silently dropping it would change the dataset)."""
    if not files:
        raise UserError("no image files to decode")
    imgs = []
    for f in files:
        try:
            with Image.open(f) as im:
                imgs.append(_rgb8(im, f))
        except (OSError, SyntaxError, ValueError) as e:   # empty, truncated, not an image
            raise UserError(f"cannot read image {f} ({type(e).__name__}: {str(e)[:80]}); "
                            f"remove or replace it") from None
        if imgs[-1].shape != imgs[0].shape:
            (h, w, _), (h0, w0, _) = imgs[-1].shape, imgs[0].shape
            raise UserError(f"{f} is {w}x{h}, but {files[0]} is {w0}x{h0}: all images of a dataset "
                            f"need one size; resize them first")
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _walk_images(class_dir):
    """Every file under a class folder, sorted, following symlinked folders but never one whose real
    path was already walked (a symlink loop such as `ln -s . loop` would repeat the folder ~40 deep)."""
    seen, walked = set(), []
    for dirpath, dirnames, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen]
        walked.append((dirpath, sorted(names)))
    return [os.path.join(d, n) for d, names in sorted(walked) for n in names]   # folder by folder, as before


def _imagefolder_files(root, train):
    """(files, labels, classes) of ROOT/train or ROOT/test, through torchvision's ImageFolder
    rules: class folders sorted, files by image extension (IMG_EXTENSIONS). Both splits use the
    class list of train/, so a class folder that only one split has cannot shift the other's labels.
    Files that are not images by extension (README.txt, Thumbs.db) are skipped and counted on
    stderr, as ImageFolder skips them; an image name that points nowhere (a dangling symlink) is refused."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
    split = "train" if train else "test"
    split_dir = os.path.join(root, split)
    if not os.path.isdir(os.path.join(root, "train")) or not os.path.isdir(split_dir):
        raise _missing("imagefolder", root)
    try:
        classes, class_to_idx = find_classes(os.path.join(root, "train"))
        split_classes, _ = find_classes(split_dir)
    except FileNotFoundError:
        raise _missing("imagefolder", root, " (no class folders)") from None
    extra = sorted(set(split_classes) - set(classes))
    if extra:
        raise UserError(f"{split_dir} has class folders that train/ lacks: {', '.join(extra)}; "
                        f"labels come from train/'s classes, so remove them or add them to train/")
    files, labels, skipped = [], [], []
    for c in split_classes:
        for path in _walk_images(os.path.join(split_dir, c)):
            if not has_file_allowed_extension(path, IMG_EXTENSIONS):
                skipped.append(path)
            elif not os.path.isfile(path):
                raise UserError(f"{path} is a link to nothing (or not a file); remove it or restore its target")
            else:
                files.append(path)
                labels.append(class_to_idx[c])
    if skipped:
        print(f"{split_dir}: skipped {len(skipped)} files that are not images by extension "
              f"(e.g. {skipped[0]})", file=sys.stderr)
    found = set(labels)
    empty = [c for c in classes if class_to_idx[c] not in found]
    if train and empty:
        raise UserError(f"{split_dir} has class folders without images: {', '.join(empty[:5])}; "
                        f"remove them (a class with no images cannot be learned or balanced)")
    if not files:
        raise _missing("imagefolder", root)
    return files, labels, classes


def _fingerprint(files, labels, root):
    """What a decoded cache was built from: every file's path (relative to root), label, size and
    mtime, hashed. The label is in it because it comes from train/'s class list: a class folder
    added to train/ only shifts test/'s labels without changing any test file."""
    h = hashlib.sha1()
    for f, y in zip(files, labels):
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _tinyimagenet_split(root, train):
    base = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(base):
        try:
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(
                "http://cs231n.stanford.edu/tiny-imagenet-200.zip", root)
        except Exception as e:
            raise _missing("tinyimagenet", root, f" and the download failed ({type(e).__name__})") from None
    partly = lambda what: _missing("tinyimagenet", root, f" (partly extracted? {what}); extract the whole archive")
    if not os.path.isdir(os.path.join(base, "train")):
        raise partly("no train/ folder")
    wnids = sorted(os.listdir(os.path.join(base, "train")))
    index = {w: i for i, w in enumerate(wnids)}
    if train:
        files = sorted(glob.glob(os.path.join(base, "train", "*", "images", "*.JPEG")))
        labels = [index[f.split(os.sep)[-3]] for f in files]
        empty = sorted(set(wnids) - {wnids[y] for y in labels})
        if not wnids or empty:
            raise partly(f"train/{empty[0] if empty else ''} has no images")
    else:   # the labelled val split serves as test set
        try:
            with open(os.path.join(base, "val", "val_annotations.txt")) as f:
                rows = sorted(line.split("\t")[:2] for line in f if line.strip())
        except OSError:
            raise partly("no val/val_annotations.txt") from None
        files = [os.path.join(base, "val", "images", r[0]) for r in rows]
        missing = [f for f in files if not os.path.isfile(f)] or [r[1] for r in rows if r[1] not in index]
        if missing or not files:
            raise partly(f"{missing[0] if missing else 'val/images'} missing")
        labels = [index[r[1]] for r in rows]
    return _decode(files), torch.tensor(labels)


def _fake_split(train):
    """10 classes, each a fixed smooth random template plus pixel noise: learnable, but not trivially."""
    g = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear")
    n = 512 if train else 256
    g.manual_seed(1 if train else 2)
    y = torch.arange(n) % 10
    x = 0.3 * templates[y] + 0.7 * torch.rand(n, 3, 32, 32, generator=g)
    return (x * 255).round().byte(), y


def load_split(name, root, train):
    """(x uint8 [N,3,H,W], y int64 [N]) on the CPU; decoded once and cached next to the data. An
    ImageFolder cache remembers the tree it came from (file names, sizes, mtimes) and is rebuilt
    when the tree changes; an unreadable cache is rebuilt too."""
    if name == "fake":
        return _fake_split(train)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join([*DATASETS, NOISE])}")
    root = os.path.expanduser(root)
    cache = os.path.join(root, f"{name}-{'train' if train else 'test'}.uint8.pt")
    if name == "imagefolder":
        files, labels, _ = _imagefolder_files(root, train)
        key = _fingerprint(files, labels, root)
    else:
        key = name   # torchvision's files and the Tiny ImageNet archive are not edited in place
    if os.path.exists(cache):
        try:
            d = torch.load(cache, weights_only=True)
            if d.get("key") == key:
                return d["x"], d["y"]
            print(f"{cache} was decoded from another version of the data; decoding again", file=sys.stderr)
        except Exception as e:
            print(f"{cache} is unreadable ({type(e).__name__}); decoding again", file=sys.stderr)
    if name == "imagefolder":
        x, y = _decode(files), torch.tensor(labels)
    elif name == "tinyimagenet":
        x, y = _tinyimagenet_split(root, train)
    else:
        x, y = _torchvision_split(name, root, train)
    try:
        atomic_save({"x": x, "y": y, "key": key}, cache)
    except UserError:
        pass   # a read-only or full data directory: decode again next time
    return x, y


def load_dataset(name, root, device, img_size=None):
    """The train and test splits of a labelled dataset, resident on `device`, with what it takes
    to normalize a batch. `img_size` resizes (transfer, Tables 2/4: to the distillation resolution)."""
    (x_tr, y_tr), (x_te, y_te) = load_split(name, root, True), load_split(name, root, False)
    (h, w), (h_te, w_te) = x_tr.shape[-2:], x_te.shape[-2:]
    if h != w:
        raise UserError(f"{name} under {root}: the images are {w}x{h}; the encoders take square images, "
                        f"crop or resize them first")
    if (h, w) != (h_te, w_te):
        raise UserError(f"{name} under {root}: the training images are {w}x{h} but the test images {w_te}x{h_te}; "
                        f"resize them to one size")
    fingerprint = data_fingerprint(name, x_tr, y_tr, x_te, y_te)   # before any resize: the data as read
    if img_size is not None and img_size != x_tr.shape[-1]:
        x_tr, x_te = resize(x_tr, img_size), resize(x_te, img_size)
    classes, _, mean, std = DATASETS[name]
    if mean is None:   # imagefolder / fake: statistics of the training split, in chunks
        s1, s2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for c in x_tr.split(4096):
            c = c.double() / 255
            s1, s2 = s1 + c.sum((0, 2, 3)), s2 + (c ** 2).sum((0, 2, 3))
        n = x_tr.numel() / 3
        mean, std = (s1 / n).tolist(), ((s2 / n - (s1 / n) ** 2) * n / (n - 1)).clamp_min(1e-6).sqrt().tolist()
    return dict(name=name, root=root, fingerprint=fingerprint,
                x_train=x_tr.to(device), y_train=y_tr.to(device), x_test=x_te.to(device),
                y_test=y_te.to(device), num_classes=classes or int(y_tr.max()) + 1,
                img_size=x_tr.shape[-1], mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
                std=torch.tensor(std, device=device).view(1, 3, 1, 1))


def data_fingerprint(name, *tensors):
    """What identifies a dataset whatever its path: a hash of its pixels and labels (12 hex digits).
    Two runs on different trees (or a tree edited between a run and its resume) differ here."""
    h = hashlib.sha1(name.encode())
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()[:12]


def resize(x, size):
    out = [F.interpolate(c.float(), size=size, mode="bilinear", antialias=True) for c in x.split(4096)]
    return torch.cat(out).round().clamp(0, 255).byte()


def normalize(x, data):
    """uint8 images -> normalized float; float inputs (Gaussian noise) are already normalized."""
    if x.dtype != torch.uint8:
        return x
    return (x.float() / 255 - data["mean"]) / data["std"]


def balanced_subset(y, n, generator, flag="--n-samples"):
    """Indices of n samples, n/classes per class (the first ones of a seeded shuffle)."""
    classes = int(y.max()) + 1
    if n <= 0 or n % classes or n // classes > torch.bincount(y).min():
        raise UserError(f"{flag} {n} must be a positive multiple of {classes} and at most "
                        f"{classes * int(torch.bincount(y).min())} (this dataset's balanced maximum)")
    perm = torch.randperm(len(y), generator=generator).to(y.device)
    keep = torch.cat([perm[y[perm] == c][: n // classes] for c in range(classes)])
    return keep.sort().values


def probe_subset(x, y, cap, seed):
    """A fixed class-balanced subset of at most `cap` probe images (`--probe-samples`), or all."""
    if cap is None or cap >= len(y):
        return x, y
    classes = int(y.max()) + 1
    if cap < classes:
        raise UserError(f"--probe-samples {cap} is fewer than this dataset's {classes} classes")
    idx = balanced_subset(y, max(cap - cap % classes, classes), torch.Generator().manual_seed(10_000 + seed))
    return x[idx], y[idx]


def gaussian_inputs(n, img_size, generator):
    """Pure noise x ~ N(0, 1) in normalized-input space (Fig. 4, 'random data')."""
    return torch.randn(n, 3, img_size, img_size, generator=generator)


# ----------------------------------------------------------------------------------------------
# Training loop: data on the device, batches are index slices, no DataLoader, no per-step sync.

PRECISIONS = ["auto", "fp32", "tf32-conv", "tf32", "bf16"]
_autocast_dtype = None   # set once per process by setup_device: None (full precision) or torch.bfloat16
_precision = None        # the precision in use, `auto` resolved (what provenance.json records)


MALLOPT_ENV = "DISTILL_MALLOPT"   # =0: leave glibc's allocator at its defaults
_malloc = "glibc default"


def keep_freed_memory():
    """glibc hands every freed block over its dynamic mmap threshold (a few MiB: each step's
    activations, the 2^16-wide logits) back to the kernel and faults it in again on the next step:
    ~30% system time and a third of a CPU step (RESULTS.md, Speed). mallopt raises the mmap and
    trim thresholds to 2 GiB, so freed memory stays in the process for reuse -- what README's
    GLIBC_TUNABLES did by hand; the price is a resident size that stays at its peak. Linux with glibc
    only; DISTILL_MALLOPT=0 turns it off. Returns what the allocator does now (for provenance)."""
    global _malloc
    if sys.platform == "linux" and os.environ.get(MALLOPT_ENV, "1") != "0" and _malloc == "glibc default":
        try:
            import ctypes
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, limit = -1, -3, ctypes.c_int(2**31 - 1)
            if mallopt(M_MMAP_THRESHOLD, limit) == 1 and mallopt(M_TRIM_THRESHOLD, limit) == 1:
                _malloc = "mallopt: mmap and trim thresholds 2 GiB"
        except (OSError, AttributeError):   # not glibc (musl, ...): nothing to set
            pass
    return _malloc


def setup_device(device, precision="auto", cpu_auto="fp32"):
    """Check `--device` and set the numerics of every network in this process (`--precision`):
    fp32 (no TF32 anywhere), tf32-conv (CUDA: cuDNN convolutions in TF32, matmuls fp32 -- PyTorch's
    defaults, what the authors' runs used), tf32 (CUDA: convolutions and matmuls in TF32, the head's
    Linear layers too), bf16 (autocast). `auto`: the authors' numerics, tf32-conv, on CUDA; on a CPU
    `cpu_auto` (resolve_precision). On CUDA cuDNN picks the fastest kernels; on a CPU glibc keeps
    freed memory (keep_freed_memory). Under torchrun, join the process group (NCCL on CUDA, gloo on CPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is not None:   # the current device: where synchronize() waits and new CUDA tensors go
            torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_memory()
    set_precision(precision, dev, cpu_auto)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def native_bf16():
    """Whether this CPU computes bf16 in hardware: AMX tiles (Intel Xeon 4th gen+) or AVX512-BF16
    dot products (AMD Zen 4+, Intel Cooper Lake+). Without either, oneDNN emulates bf16, slower than fp32."""
    units = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, f, lambda: False)() for f in units)


def resolve_precision(precision, device, cpu_auto="fp32"):
    """What `--precision auto` means on `device`: the authors' numerics on CUDA (TF32 convolutions);
    on a CPU `cpu_auto` -- fp32, or bf16 where the script has shown bf16 tracks fp32 (distill.py) and
    the CPU computes bf16 natively: the 1000-step numerics check passed on an AMX Xeon and on an
    avx512_bf16 AMD EPYC (RESULTS.md, 'Numerics'), where bf16 is 1.7-2.2x faster than fp32."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "tf32-conv"
    return "bf16" if cpu_auto == "bf16" and native_bf16() else "fp32"


def use_channels_last(flag, device):
    """`--channels-last auto|on|off` (after setup_device): auto is on for bf16 on a CPU, where oneDNN's
    bf16 convolutions run in NHWC (RESULTS.md, Speed: ResNet18 1.17x, VGG11 1.11x at batch 256), off
    elsewhere (unmeasured on CUDA; in fp32 on a CPU it slows VGG11 down)."""
    if flag in ("on", True):
        return True
    if flag in ("off", False, None):
        return False
    return torch.device(device).type == "cpu" and _precision == "bf16"


def resume_precision(out, precision, device, cpu_auto="fp32"):
    """The numerics a resumed run goes on in: `--precision auto` means what it meant when the run
    started (provenance.json's last segment, else args.json's precision_used, else the auto of
    before bf16: fp32 on a CPU), so a default that changed does not change a run halfway."""
    if precision != "auto":
        return precision
    try:
        with open(os.path.join(out, "provenance.json")) as f:
            ran = json.load(f)["segments"][-1]["precision"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        ran = (read_args_json(out) or {}).get("precision_used")
    ran = ran or resolve_precision("auto", device, "fp32")
    if ran not in PRECISIONS or (ran.startswith("tf32") and torch.device(device).type != "cuda"):
        return resolve_precision("auto", device, cpu_auto)   # moved to another kind of device
    return ran


def set_precision(precision, device, cpu_auto="fp32"):
    """The numerics of `--precision` for this process (see setup_device); returns the resolved name."""
    global _autocast_dtype, _precision
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    precision = resolve_precision(precision, device, cpu_auto)
    if precision.startswith("tf32") and torch.device(device).type != "cuda":
        raise UserError(f"--precision {precision} needs a CUDA device; on CPU use fp32 or bf16")
    torch.backends.cudnn.allow_tf32 = precision.startswith("tf32")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    _autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    _precision = precision
    return precision


# Data parallel (torchrun): one seeded permutation on every rank, each rank takes its slice of
# every batch, gradients are averaged by DistributedDataParallel, rank 0 writes (every rank probes
# the gathered features: the probes are cheap next to the feature extraction, which is split).

def world():
    """(rank, world size); (0, 1) for a plain `python script.py`."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard(t):
    """This rank's contiguous slice of the rows of t (all of t without a process group)."""
    rank, n = world()
    return t.tensor_split(n)[rank] if n > 1 else t


def gather_rows(t, n_rows):
    """Inverse of `shard`: every rank's rows, in order, on every rank."""
    rank, n = world()
    if n == 1:
        return t
    sizes = [len(c) for c in torch.empty(n_rows).tensor_split(n)]
    padded = torch.zeros(max(sizes), *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def local_batch_sizes(batch_sizes):
    """The batch sizes this rank runs for global `batch_sizes` (train_steps' slices; a rank left
    without images runs one with weight 0): what torch.compile should be tried on."""
    rank, n = world()
    return sorted({max(b // n + (rank < b % n), 1) for b in batch_sizes})


def activation_dtype():
    """The dtype a network's outputs have under `--precision` (bf16 under autocast, else float32)."""
    return _autocast_dtype or torch.float32


def autocast(device):
    """The autocast context of `--precision` (setup_device): bf16 autocast, or none (fp32/tf32)."""
    if _autocast_dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_autocast_dtype)


def epoch_batches(n, batch_size, seed, epoch, device):
    """Index batches of one epoch: a permutation seeded by (seed, epoch), the last partial batch
    kept (196 steps per CIFAR-10 epoch at 256). Stateless, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device).split(batch_size)


def train_steps(model, optimizer, loss_fn, batches, progress=None, after_step=None):
    """One optimizer step per index batch of `loss_fn(idx) -> (loss, stats dict)`. Returns the
    means of loss and stats over the steps (one host sync); raises on a non-finite loss.
    `after_step()` runs after every optimizer step (IMP re-applies its masks there). Under
    torchrun each rank runs its slice of every batch; the loss is reweighted so that DDP's
    gradient average equals the global batch's mean even when a batch does not split evenly."""
    model.train()
    rank, world_size = world()
    totals, steps, stats = None, 0, {}
    for idx in batches:
        weight = 1.0
        if world_size > 1:
            local = idx.tensor_split(world_size)[rank]
            # a batch with fewer images than ranks leaves some ranks none: they still run a step (DDP's
            # gradient all-reduce needs every rank) on one image with weight 0, not the NaN mean of nothing
            weight, idx = len(local) / len(idx), local if len(local) else idx[:1]
        with autocast(idx.device):
            loss, stats = loss_fn(idx)
        optimizer.zero_grad(set_to_none=True)
        (loss * (weight * world_size) if world_size > 1 else loss).backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        vals = torch.stack([loss.detach().float(), *[v.detach().float() for v in stats.values()]]) * weight
        totals = vals if totals is None else totals + vals
        steps += 1
        if progress is not None:
            progress.update(1)   # no loss in the bar: reading it would sync the device every step
    if world_size > 1:
        dist.all_reduce(totals)
    means = (totals / steps).tolist()
    if not all(math.isfinite(v) for v in means):
        raise NonFiniteLoss("the loss became non-finite; stopping (try a lower --lr)")
    return dict(zip(["loss", *stats], means))


class NonFiniteLoss(UserError):
    """The loss diverged: reported in one line; the caller says which checkpoint is kept."""


def train_epoch(model, optimizer, loss_fn, n, batch_size, seed, epoch, device, progress=None, after_step=None):
    """`train_steps` over one epoch of n samples in the seeded order of `epoch_batches`."""
    return train_steps(model, optimizer, loss_fn, epoch_batches(n, batch_size, seed, epoch, device),
                       progress, after_step)


def _rowdot(a, b):
    """Row-wise dot product through a batched matmul: no [B, m] product tensor."""
    return torch.einsum("bm,bm->b", a, b)


class SoftTargetCrossEntropy(torch.autograd.Function):
    """Per-row H(p_t, softmax(s)). Its gradient softmax(s) - p_t is written in place into the
    log-probabilities saved by the forward, so the backward allocates no [B, m] tensor (the graph
    must not be backpropagated twice)."""

    @staticmethod
    def forward(ctx, s, p_t):
        log_p_s = s.log_softmax(-1)
        ctx.save_for_backward(log_p_s, p_t)
        return -_rowdot(p_t, log_p_s)

    @staticmethod
    def backward(ctx, grad_rows):
        log_p_s, p_t = ctx.saved_tensors
        return log_p_s.exp_().sub_(p_t).mul_(grad_rows[:, None]), None


def distillation_loss(student_logits, teacher_logits):
    """The teacher-student loss of §3/§4: H(softmax(t), log_softmax(s)) over all outputs, tau = 1,
    no centering, mean over the batch. Also returns KL(p_t || p_s) and the teacher's entropy,
    both detached. The KL is computed directly: with the authors' head it is ~1e-5 next to a CE of
    ~ln(65536) = 11.09, below float32 resolution of CE - H. With d = s - t,
    KL = log(sum p_t e^d) - sum p_t d = log1p(sum p_t expm1(d)) - sum p_t d, exact for small d
    (rows where e^d overflows fall back to CE - H). At most three [B, m] tensors are alive at once
    (p_t, log p_s, d), forward or backward; bench.py measures it. Always fp32, also under bf16
    autocast (whose einsum would round the row sums, and CE ~ 11.09, to 3 digits)."""
    s, t = student_logits.float(), teacher_logits.float()
    with torch.autocast(s.device.type, enabled=False):
        p_t = t.softmax(-1)
        # the loss: ce = -(p_t * s.log_softmax(-1)).sum(-1), per image (App. A's pseudo-code, line 23);
        # SoftTargetCrossEntropy computes exactly that, with a backward that allocates no [B, m] tensor
        ce = SoftTargetCrossEntropy.apply(s, p_t)
        with torch.no_grad():
            entropy = t.logsumexp(-1) - _rowdot(p_t, t)
            d = s.detach() - t
            mean_d = _rowdot(p_t, d)
            kl = torch.log1p(_rowdot(p_t, d.expm1_())) - mean_d
            # far apart (e^d overflows: unbounded logits, raw embeddings) CE - H is exact enough
            kl = torch.where(torch.isfinite(kl), kl, ce.detach() - entropy)
    return ce.mean(), kl.mean(), entropy.mean()


def compiled(fn, examples):
    """torch.compile(fn) (a function or a module), tried forward and backward on `examples` (a list
    of argument tuples, one per input shape the run will see). Where compiling fails at any point --
    tracing, building kernels, loading a cached kernel, the backward -- `fn` itself serves the rest
    of the run, after one warning line. A compile killed mid-write can leave a broken kernel in
    inductor's cache that fails every later run compiling the same graph: the warning names the
    directory to clear. A module's buffers (BN statistics) are restored after the trial."""
    torch._dynamo.config.suppress_errors = True   # trace-time failures: dynamo falls back by itself
    fast = torch.compile(fn)
    buffers = {k: v.clone() for k, v in fn.named_buffers()} if isinstance(fn, nn.Module) else {}
    try:
        for args in examples:
            with autocast(args[0].device):   # the numerics the run will compile under
                out = fast(*args)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
    except Exception as e:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); running "
              f"eager. If this repeats, clear inductor's cache: rm -rf {cache_dir()}", file=sys.stderr)
        fast = fn
    finally:
        if buffers:
            with torch.no_grad():
                for k, v in fn.named_buffers():
                    v.copy_(buffers[k])
        for args in examples:   # the trial's gradients are not the run's
            for a in args:
                a.grad = None
        if isinstance(fn, nn.Module):
            fn.zero_grad(set_to_none=True)
    return fast


def weights_version(model):
    """Changes whenever any parameter is modified in place (optimizer step, EMA, load_state_dict)."""
    return sum(p._version for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Supervised training, the recipe of App. E.5 (Frankle et al. 2020), shared by imp.py and lmc.py.

class Classifier(nn.Module):
    """Encoder + linear classifier: the network that IMP prunes and LMC interpolates (§6)."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder, self.fc = encoder, nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, x):
        return self.fc(self.encoder(x))


def make_classifier(encoder, num_classes, generator):
    """Wrap an encoder (fresh, or a distilled student's) with a freshly initialized classifier."""
    clf = Classifier(encoder, num_classes)
    init_weights(clf.fc, generator)
    return clf


def flip_crop(x, flips, offsets, pad=4):
    """Random horizontal flip + `pad`-px zero-padded random crop (App. E.5) of a uint8 batch, as
    tensor ops on its device; `flips` [B] bool and `offsets` [B, 2] in [0, 2*pad] are the draws."""
    b, c, h, w = x.shape
    x = F.pad(torch.where(flips[:, None, None, None], x.flip(3), x), (pad, pad, pad, pad))
    ar = lambda n: torch.arange(n, device=x.device)
    rows = (offsets[:, :1] + ar(h))[:, None, :, None]
    cols = (offsets[:, 1:] + ar(w))[:, None, None, :]
    return x[ar(b)[:, None, None, None], ar(c)[None, :, None, None], rows, cols]


def supervised_loss_fn(model, data, seed, epoch):
    """loss_fn(idx) for train_epoch: cross-entropy on labelled training images with flip + 4-px
    crop (App. E.5). The augmentation draws of the whole epoch are made at once from a
    (seed, epoch)-seeded generator."""
    n, device = len(data["y_train"]), data["x_train"].device
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    flips = (torch.rand(n, generator=g) < 0.5).to(device)
    offsets = torch.randint(0, 2 * 4 + 1, (n, 2), generator=g).to(device)   # flip_crop's pad=4

    def loss_fn(idx):
        x = flip_crop(data["x_train"][idx], flips[idx], offsets[idx])
        return F.cross_entropy(model(normalize(x, data)), data["y_train"][idx]), {}
    return loss_fn


def step_lr(lr, epoch, milestones, gamma=0.1):
    """Multi-step schedule (App. E.5: x0.1 at epochs 80 and 120) as a pure function of the epoch."""
    return lr * gamma ** sum(epoch > m for m in milestones)


def supervised_epoch(model, optimizer, data, epoch, lr, milestones, batch_size, seed, progress=None,
                     after_step=None):
    """One epoch of the App. E.5 recipe (lr from the step schedule, flip + crop, cross-entropy);
    returns the test accuracy after it."""
    for group in optimizer.param_groups:
        group["lr"] = step_lr(lr, epoch - 1, milestones)
    train_epoch(model, optimizer, supervised_loss_fn(model, data, seed, epoch), len(data["y_train"]),
                batch_size, seed, epoch, data["x_train"].device, progress, after_step)
    return accuracy(model, data)


def add_supervised_args(p, figure, seed_help, out_help):
    """The flags of the App. E.5 recipe, its starting point, the run directory and `--plot`,
    shared by imp.py (Fig. 8) and lmc.py (Fig. 9)."""
    p.add_argument("--seed", type=seed_type, default=0, help=seed_help)
    p.add_argument("--out", default=None, help=f"run directory (default: {out_help}; with --plot: runs)")
    p.add_argument("--plot", nargs="+", metavar="DIR", help=f"only draw {figure} from these run directories")
    p.add_argument("--arch", default="resnet18", help=f"encoder, one of: {', '.join(ARCHS[:-1])}")
    p.add_argument("--init", default="random",
                   help="'random' (a fresh init θ_S) or 'student:CKPT' (a distilled student's encoder θ*_S)")
    p.add_argument("--dataset", default="cifar10", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--data-root", default="data")
    p.add_argument("--n-samples", type=at_least(1), default=None,
                   help="class-balanced training subset, drawn once from --seed (default: the whole split)")
    p.add_argument("--test-samples", type=at_least(1), default=None,
                   help="class-balanced test subset, the same for every --seed (default: the whole split)")
    p.add_argument("--epochs", type=at_least(1), default=160, help="App. E.5: 160")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="App. E.5: 128")
    p.add_argument("--lr", type=positive(), default=0.1, help="SGD, momentum 0.9 (App. E.5)")
    p.add_argument("--milestones", type=at_least(0), nargs="*", default=None,
                   help="epochs after which lr drops x0.1 (default: half and 3/4 of --epochs, i.e. 80 120)")
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=1e-4)
    add_precision_arg(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_supervised_args(p, args):
    """Validate the shared flags; with --plot nothing else is needed."""
    if args.plot:
        args.out = args.out or "runs"
        return
    if args.arch not in ARCHS[:-1]:   # "flatten" has nothing to train
        p.error(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS[:-1])}")
    if args.dataset not in DATASETS:
        p.error(f"unknown --dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    if args.init != "random" and not args.init.startswith("student:"):
        p.error(f"--init must be 'random' or 'student:CKPT', got {args.init!r}")
    if args.milestones is None:
        args.milestones = [args.epochs // 2, args.epochs * 3 // 4]


def recipe_captions(run_dirs):
    """The scales Fig. 8/9 runs were trained at, from their args.json, one line per distinct scale:
    'resnet20, 4 epochs, 5000 train / 2000 test images' (a CPU-scale figure is not read as the paper's)."""
    captions = set()
    for d in run_dirs:
        path = os.path.join(d, "args.json")
        if os.path.exists(path):
            a = json.load(open(path))
            train = f"{a['n_samples']} train" if a.get("n_samples") else "all train"
            test = f"{a['test_samples']} test" if a.get("test_samples") else "all test"
            captions.add(f"{a['arch']}, {a['epochs']} epochs, {train} / {test} images")
    return sorted(captions)


def supervised_start(args, device, generator):
    """The classifier at the starting point (a distilled student's encoder, buffers included, or a
    fresh init) with a fresh linear head, and the data at the encoder's resolution."""
    img_size = None
    if args.init.startswith("student:"):
        path = args.init.split(":", 1)[1]
        ckpt = load_checkpoint(path)
        if ckpt["config"]["arch"] != args.arch:
            raise UserError(f"--init {path} is a {ckpt['config']['arch']} student, not --arch {args.arch}")
        encoder, img_size = model_from_checkpoint(ckpt, "student", path).encoder, ckpt["config"]["img_size"]
    data = load_dataset(args.dataset, args.data_root, device, img_size=img_size)
    if args.n_samples:   # a shrunk recipe (README, CPU scale); normalization keeps the whole split's statistics
        keep = balanced_subset(data["y_train"], args.n_samples, torch.Generator().manual_seed(args.seed))
        data.update(x_train=data["x_train"][keep], y_train=data["y_train"][keep])
    if args.test_samples:   # fixed across seeds and runs, so that their accuracies compare on the same images
        keep = balanced_subset(data["y_test"], args.test_samples, torch.Generator().manual_seed(0), "--test-samples")
        data.update(x_test=data["x_test"][keep], y_test=data["y_test"][keep])
    if img_size is None:
        encoder = make_encoder(args.arch, generator=generator, img_size=data["img_size"])
    return make_classifier(encoder, data["num_classes"], generator).to(device), data


def sgd(model, weight_decay=1e-4):
    """App. E.5: SGD with momentum 0.9 and weight decay 1e-4 (lr set per epoch by `step_lr`)."""
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=weight_decay)


@torch.no_grad()
def accuracy(model, data, batch_size=1024):
    """Accuracy on the un-augmented test split, model in eval mode."""
    was_training = model.training
    model.eval()
    device = data["x_test"].device
    correct = torch.zeros((), device=device)
    for x, y in zip(data["x_test"].split(batch_size), data["y_test"].split(batch_size)):
        with autocast(device):
            correct += (model(normalize(x, data)).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(data["y_test"])


# ----------------------------------------------------------------------------------------------
# Probes (paper §3 and App. C.1, protocols as in the authors' code). Both run on cached features, torch only.

@torch.no_grad()
def extract_features(encoder, x, data, batch_size=512, device="cpu"):
    """Encoder outputs (pre-head) in eval mode for un-augmented images, float32 on `device`."""
    was_training = encoder.training
    encoder.eval()
    feats = []
    for xb in x.split(batch_size):
        with autocast(device):
            feats.append(encoder(normalize(xb, data)).float())
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_probe(train_f, train_y, test_f, test_y, k=20, metric="l2", num_classes=None, chunk=1024):
    """k-NN accuracy (k=20, App. C.1). 'l2': Euclidean distance, unweighted majority vote (the
    paper's); 'cosine': DINO's cosine similarity with exp(sim/0.07)-weighted vote. Vote ties go to
    the lowest class index (argmax returns the first maximum)."""
    num_classes = num_classes or int(train_y.max()) + 1
    if metric == "cosine":
        train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for f, y in zip(test_f.split(chunk), test_y.split(chunk)):
        if metric == "l2":
            sim, nn_idx = torch.cdist(f, train_f).topk(k, dim=1, largest=False)
            weight = torch.ones_like(sim)
        else:
            sim, nn_idx = (f @ train_f.T).topk(k, dim=1)
            weight = (sim / 0.07).exp()
        votes = torch.zeros(len(f), num_classes, device=f.device)
        votes.scatter_add_(1, train_y[nn_idx], weight)
        correct += (votes.argmax(1) == y).sum().item()
    return correct / len(test_y)


def linear_probe(train_f, train_y, test_f, test_y, num_classes=None, epochs=10, lr=1e-3,
                 weight_decay=0.01, batch_size=256, seed=0, standardize=False):
    """Test accuracy of a Linear(embed, classes) trained on frozen features (the authors' protocol: AdamW 1e-3,
    wd 0.01, batch 256, 10 epochs). `standardize` uses the train split's mean/std. Features [P, N, D]
    train P independent probes at once (one batched matmul per step; landscape.py's grid points),
    each exactly as a probe of its own: same init, same batches, per-probe mean loss. Returns a
    float, or a list of P floats for batched features; NaN where the test logits are not finite."""
    num_classes = num_classes or int(train_y.max()) + 1
    batched = train_f.dim() == 3
    if not batched:
        train_f, test_f = train_f[None], test_f[None]
    if standardize:
        mu, sd = train_f.mean(1, keepdim=True), train_f.std(1, keepdim=True) + 1e-6
        train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    P, _, d = train_f.shape
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(d)   # nn.Linear's default init, drawn from our generator
    weight = torch.empty(num_classes, d).uniform_(-bound, bound, generator=g)
    bias = torch.empty(num_classes).uniform_(-bound, bound, generator=g)
    weight = weight.T.expand(P, d, num_classes).contiguous().to(train_f.device).requires_grad_()
    bias = bias.expand(P, 1, num_classes).contiguous().to(train_f.device).requires_grad_()
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        for idx in epoch_batches(train_f.shape[1], batch_size, seed, epoch, train_f.device):
            logits = torch.baddbmm(bias, train_f[:, idx], weight)
            # sum over probes of each probe's mean loss: probe p's gradient is its own
            loss = F.cross_entropy(logits.flatten(0, 1), train_y[idx].repeat(P)) * P
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = torch.baddbmm(bias, test_f, weight)
        acc = (logits.argmax(-1) == test_y).float().mean(1)
        # overflowing features or a diverged probe have no accuracy (argmax of NaN logits reads as chance)
        acc = torch.where(logits.isfinite().flatten(1).all(1), acc, float("nan")).tolist()
    return acc if batched else acc[0]


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and primitives (torch.load(weights_only=True)), atomic writes.

def write_failed(path, e):
    """A failed write (a full disk, a read-only or vanished directory) as one line that says what is kept."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:100]
    kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else "nothing was written there"
    return UserError(f"cannot write {path} ({why}); {kept}")


def to_cpu(obj):
    """Every tensor in a nest of dicts, lists and tuples moved to the CPU: a checkpoint written on a GPU
    then loads anywhere with a plain torch.load(path, weights_only=True)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_save(obj, path):
    """Write (device-independent: every tensor on the CPU) to a temp file, then rename: a crash or a
    full disk mid-write never leaves a truncated checkpoint (torch.save reports a full disk as a RuntimeError)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(to_cpu(obj), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise write_failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path!r} is not a readable checkpoint ({type(e).__name__}); "
                        f"was it written by distill.py and copied whole?") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path!r} is not a checkpoint of this project (no 'config' entry)")
    c = ckpt["config"]
    if c.get("arch") not in ARCHS:
        raise UserError(f"{path!r} holds an unknown arch {c.get('arch')!r}; this project knows {', '.join(ARCHS)}")
    missing = {"out_dim", "bottleneck", "norm", "img_size"} - set(c)
    if missing:
        raise UserError(f"{path!r}: its config lacks {', '.join(sorted(missing))}; not a distill.py checkpoint")
    return ckpt


def model_from_checkpoint(ckpt, key, path="checkpoint"):
    """Rebuild the model stored under ckpt[key] ('student' or 'teacher') from its config."""
    c = ckpt["config"]
    model = make_model(c["arch"], c["out_dim"], c["bottleneck"], c["norm"], c["img_size"])
    try:
        model.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path!r}: '{key}' weights do not fit a {c['arch']} "
                        f"({str(e).splitlines()[0][:120]})") from None
    return model


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    """Lay out, write (creating the directory) and close a figure; returns its path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path, obj):
    """Write a JSON file through a temp file + rename: a crash or a full disk leaves the old file whole."""
    write_text(path, json.dumps(obj, indent=2))


def write_text(path, text):
    """Write a small text file (JSON, a Markdown table) atomically; a failure is one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
