import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Tests that draw inputs from the global RNG see the same inputs on every run; every test
    starts in fp32 (a script's --precision bf16 run in this process must not leak into the next)."""
    import common
    torch.manual_seed(0)
    common.set_precision("fp32", "cpu")
    yield
    common.set_precision("fp32", "cpu")


def load_script(name):
    """Import a top-level script by path: `imp.py` would otherwise lose to the stdlib module `imp`."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Tests that take a `device` run on the CPU and, on a machine with a GPU, on CUDA as well."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
