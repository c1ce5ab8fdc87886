"""GPU runs of the launchers and CUDA-graph decode (marked; run them on the GPU machine).

Multi-GPU tests need two or more GPUs (nvidia-h100-x2 or larger); they compare NCCL runs with the
fp32 reference, tp=2 with tp=1, and torchrun with Ray.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import hf_layer_oracle, random_full_weights, rel_err, tiny_config, with_weights_rounded_to
from tp_gdn import Batch, GDNLayer, StateCache
from tp_gdn.cli import main as cli
from tp_gdn.workload import expected_outputs, mixed_workload

ROOT = Path(__file__).resolve().parents[1]
N_GPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
multigpu = pytest.mark.skipif(N_GPU < 2, reason="needs two or more GPUs")
BF16_TOL = 3e-2   # bf16 against fp32: see test_hf_oracle.TOL
JOB = ["--seqs", "4", "--prompt-len", "150", "--decode-steps", "4", "--check-layers", "all", "--device", "cuda"]


def run_job(tmp_path, name, *args):
    out, js = tmp_path / f"{name}.pt", tmp_path / f"{name}.json"
    assert cli(["run", *JOB, *args, "--save-outputs", str(out), "--json", str(js)]) == 0
    return torch.load(out)["outputs"], json.loads(js.read_text())


@pytest.mark.gpu
def test_graphed_decode_equals_eager_decode(seed):
    from tp_gdn.graphs import GraphedDecoder

    cfg = tiny_config(nk=4, nv=8, dk=32, dv=32, H=64, layers=2)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, seed), dtype=torch.bfloat16, device="cuda")
    caches = [StateCache(cfg, [0], 6, dtype=torch.bfloat16, device="cuda", tp_size=1) for _ in range(2)]
    prompt = torch.randn(50, 64, device="cuda", dtype=torch.bfloat16)
    for c in caches:
        layer(prompt, Batch([20, 30], [4, 1], [False, False]), c)
    decoder = GraphedDecoder({0: layer}, caches[1])
    for _ in range(3):
        x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
        eager = layer(x, Batch([1, 1], [4, 1], [True, True]), caches[0])
        assert torch.equal(decoder(x, [4, 1])[0], eager)
    assert torch.equal(caches[0].ssm[0], caches[1].ssm[0]) and torch.equal(caches[0].conv[0], caches[1].conv[0])


@pytest.mark.gpu
@multigpu
def test_nccl_tp2_job_matches_the_fp32_reference(tmp_path):
    _, summary = run_job(tmp_path, "tp2", "--tp", "2")
    assert summary["max_rel_err"] < BF16_TOL and summary["ranks"][1]["device"] == "cuda:1"
    _, summary32 = run_job(tmp_path, "tp2f32", "--tp", "2", "--dtype", "float32")
    assert summary32["max_rel_err"] < 1e-4


@pytest.mark.gpu
@multigpu
def test_tp2_equals_tp1_on_gpus(tmp_path):
    one, _ = run_job(tmp_path, "tp1", "--tp", "1")
    two, _ = run_job(tmp_path, "tp2", "--tp", "2")
    for i in one:
        for a, b in zip(two[i], one[i]):
            assert rel_err(a, b) < 1e-2   # the same bf16 arithmetic, split two ways (passed on H100s)


@pytest.mark.gpu
@multigpu
def test_torchrun_and_ray_give_identical_numbers_on_gpus(tmp_path):
    pytest.importorskip("ray")
    ray_out, ray_sum = run_job(tmp_path, "ray", "--tp", "2", "--launcher", "ray")
    out = tmp_path / "tr.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(ROOT / "launch" / "torchrun_job.py"), *JOB, "--save-outputs", str(out)],
                   check=True, timeout=600, cwd=tmp_path)
    tr_out = torch.load(out)["outputs"]
    for i in tr_out:
        for a, b in zip(ray_out[i], tr_out[i]):
            assert torch.equal(a, b)
    assert ray_sum["max_rel_err"] < BF16_TOL


def _hf_tp2_workload(rank, world, ckpt, steps):
    from tp_gdn import load_layers
    from tp_gdn.workload import run_steps

    layers = load_layers(ckpt, dtype=torch.bfloat16, device=f"cuda:{rank}")
    cache = StateCache(layers[0].cfg, list(layers), 8, dtype=torch.bfloat16, device=f"cuda:{rank}")
    return {i: [y.cpu() for y in ys] for i, ys in run_steps(layers, cache, steps).items()}


@pytest.mark.gpu
@multigpu
def test_nccl_tp2_prefill_then_decode_matches_hf(hf_next, seed):
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    ckpt, model = hf_next
    steps = mixed_workload(32, seed)
    results = spawn_ranks(2, _with_rank, _hf_tp2_workload, str(ckpt), steps, backend="nccl")
    oracle = with_weights_rounded_to(model, torch.bfloat16)
    for i, outs in results[0].items():
        want = expected_outputs(steps, hf_layer_oracle(oracle, i))
        for n, (got, exp) in enumerate(zip(outs, want)):
            assert torch.equal(got, results[1][i][n])
            assert rel_err(got, exp) < BF16_TOL, (i, n)
