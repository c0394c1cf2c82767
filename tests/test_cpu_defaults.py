"""The CPU's fast defaults (RESULTS.md, Speed and Numerics): distill.py's `--precision auto` is bf16
on a CPU that computes bf16 natively (AMX or AVX512-BF16), channels_last follows it, glibc keeps
freed memory -- and `--precision fp32` still runs the fp32 path bit for bit, a resumed run keeps the
numerics it started with."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_BF16 = common.native_bf16()
SMALL = ["--dataset", "fake", "--arch", "vgg11", "--out-dim", "256", "--batch-size", "64", "--steps", "3",
         "--probe-steps", "3", "--probe-samples", "128", "64", "--compile", "none", "--device", "cpu"]


def bf16_units(monkeypatch, amx, avx512_bf16=None):
    """Pretend the CPU has (or lacks) AMX tiles and AVX512-BF16 (the latter follows AMX unless given)."""
    avx512_bf16 = amx if avx512_bf16 is None else avx512_bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


def test_auto_resolves_per_device_and_per_script(monkeypatch):
    bf16_units(monkeypatch, True)
    assert common.resolve_precision("auto", "cpu", distill.CPU_AUTO_PRECISION) == "bf16"
    assert common.resolve_precision("auto", "cpu") == "fp32"   # the other scripts: no bf16 evidence for them
    assert common.resolve_precision("auto", "cuda", distill.CPU_AUTO_PRECISION) == "tf32-conv"   # the authors'
    assert common.resolve_precision("fp32", "cpu", distill.CPU_AUTO_PRECISION) == "fp32"
    bf16_units(monkeypatch, False, avx512_bf16=True)   # the AMD EPYC: bf16 dot products, no AMX tiles
    assert common.resolve_precision("auto", "cpu", distill.CPU_AUTO_PRECISION) == "bf16"
    assert common.resolve_precision("auto", "cpu") == "fp32"
    bf16_units(monkeypatch, False)   # emulated bf16 is slower than fp32: no bf16 without bf16 units
    assert common.resolve_precision("auto", "cpu", distill.CPU_AUTO_PRECISION) == "fp32"


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no bf16 units: distill.py's auto is fp32 here")
def test_distill_default_on_this_cpu_is_bf16_activations_in_channels_last(tmp_path):
    rows = distill.main([*SMALL, "--out", str(tmp_path)])
    assert common.activation_dtype() == torch.bfloat16
    assert common.use_channels_last("auto", "cpu") and not common.use_channels_last("off", "cpu")
    model = common.make_model("vgg11", 256, generator=torch.Generator().manual_seed(0))
    with common.autocast("cpu"):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16   # what bf16 autocast promises
    args = json.loads((tmp_path / "args.json").read_text())
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert args["precision"] == "auto" and args["precision_used"] == "bf16"
    assert prov["segments"][-1]["precision"] == "bf16"
    assert rows[-1]["step"] == 3 and rows[-1]["kl"] > 0


def test_fp32_flag_reproduces_the_fp32_path_exactly(tmp_path, monkeypatch):
    explicit = distill.main([*SMALL, "--alpha", "0.5", "--precision", "fp32", "--out", str(tmp_path / "a")])
    bf16_units(monkeypatch, False)   # auto without bf16 units: the fp32 path as it ran before bf16 became the default
    before = distill.main([*SMALL, "--alpha", "0.5", "--out", str(tmp_path / "b")])
    assert common.activation_dtype() == torch.float32 and not common.use_channels_last("auto", "cpu")
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in explicit] == \
           [{k: v for k, v in r.items() if k not in drop} for r in before]


def test_a_resumed_run_keeps_the_numerics_it_started_with(tmp_path, monkeypatch):
    bf16_units(monkeypatch, False)   # started when auto meant fp32 here
    distill.main([*SMALL, "--out", str(tmp_path)])
    bf16_units(monkeypatch, True)    # resumed where auto means bf16: it goes on in fp32
    longer = " ".join(SMALL).replace("--steps 3 --probe-steps 3", "--steps 5 --probe-steps 3 5").split()
    rows = distill.main([*longer, "--out", str(tmp_path)])
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert [s["precision"] for s in prov["segments"]] == ["fp32", "fp32"]
    assert rows[-1]["step"] == 5 and common.activation_dtype() == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_glibc_keeps_freed_memory_unless_turned_off():
    code = "import common; print(common.setup_device('cpu') and common.keep_freed_memory())"
    on = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    off = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, DISTILL_MALLOPT="0"))
    assert on.stdout.strip() == "mallopt: mmap and trim thresholds 2 GiB", on.stderr
    assert off.stdout.strip() == "glibc default", off.stderr
    common.setup_device("cpu", "fp32")   # in this process too, and provenance says which ran
    assert common.provenance_segment("cpu", "step 0")["malloc"] == on.stdout.strip()
