import os
import random
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before any
# kernel module is imported (the choice is made when @triton.jit decorates a kernel).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interp_bounds  # noqa: E402   every interpreted load and store must stay inside its arguments
    interp_bounds.install()

from helpers import build_hf_model, save_hf  # noqa: E402

# Fresh random inputs every run; TP_GDN_TEST_SEED=<n> replays a run (the header prints the seed).
SESSION_SEED = int(os.environ.get("TP_GDN_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"tp_gdn test seed: {SESSION_SEED} (replay with TP_GDN_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the session seed and the test's id."""
    return (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture(autouse=True)
def _seed_torch(seed):
    torch.manual_seed(seed)


def _hf(kind, tmp_path_factory):
    pytest.importorskip("transformers")
    model = build_hf_model(kind, seed=SESSION_SEED + (1 if kind == "qwen3_5" else 0))
    path = save_hf(model, tmp_path_factory.mktemp(kind))
    return path, model


@pytest.fixture(scope="session")
def hf_next(tmp_path_factory):
    """(checkpoint dir, model) of a tiny random Qwen3-Next saved over several files."""
    return _hf("qwen3_next", tmp_path_factory)


@pytest.fixture(scope="session")
def hf_35(tmp_path_factory):
    """(checkpoint dir, model) of a tiny random Qwen3.5 (text) saved over several files."""
    return _hf("qwen3_5", tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
