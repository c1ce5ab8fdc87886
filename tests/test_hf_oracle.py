"""Every linear-attention layer against HF transformers' own Qwen3NextGatedDeltaNet and
Qwen3_5GatedDeltaNet, on tiny random checkpoints saved over several files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import hf_layer_oracle, rel_err, run_ranks, with_weights_rounded_to
from tp_gdn import Batch, GDNConfig, StateCache, load_layers
from tp_gdn.workload import WorkloadBuilder, expected_outputs, mixed_workload, run_steps
from workers import checkpoint_workload

# Against HF in fp32 (for bf16 runs, with the same bf16-rounded weights). A bf16 run rounds its
# activations about five times in sequence (projection, conv, core output, norm, out_proj), each
# by up to 2^-8: per-output relative errors of 1-2e-2 are its arithmetic (1.03e-2 seen on an
# H100, 1.66e-2 for the torch backend's bf16 main job on the CPU); bugs give errors near 1.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# (backend, device, dtype): the torch backend everywhere; the Triton kernels on a GPU
BACKENDS = [("torch", "cpu", torch.float32)]
if torch.cuda.is_available():
    BACKENDS += [("triton", "cuda", torch.float32), ("triton", "cuda", torch.bfloat16)]


@pytest.fixture(params=["qwen3_next", "qwen3_5"])
def hf(request):
    return request.getfixturevalue("hf_next" if request.param == "qwen3_next" else "hf_35")


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b[0]}-{str(b[2])[6:]}")
def backend(request):
    return request.param


def check_against_hf(model, steps, outputs_by_layer, dtype=torch.float32):
    if dtype != torch.float32:
        model = with_weights_rounded_to(model, dtype)
    for i, outs in outputs_by_layer.items():
        want = expected_outputs(steps, hf_layer_oracle(model, i))
        for n, (got, exp) in enumerate(zip(outs, want)):
            err = rel_err(got.cpu(), exp)
            assert err < TOL[dtype], f"layer {i}, step {n} ({steps[n].batch}): relative error {err:.2e}"


def run_local(ckpt, steps, backend=("torch", "cpu", torch.float32), num_slots=8):
    name, device, dtype = backend
    layers = load_layers(ckpt, dtype=dtype, device=device, backend=name, tp_rank=0, tp_size=1)
    cfg = GDNConfig.from_pretrained(ckpt)
    return run_steps(layers, StateCache(cfg, list(layers), num_slots, dtype=dtype, device=device, tp_size=1), steps)


def test_packed_prefill_across_chunk_boundaries_matches_hf(hf, backend, seed):
    ckpt, model = hf
    w = WorkloadBuilder(32, seed)
    w.step([(0, 1, False), (1, 63, False), (2, 64, False), (3, 65, False), (4, 130, False)])
    check_against_hf(model, w.steps, run_local(ckpt, w.steps, backend), backend[2])


def test_prefill_then_token_by_token_decode_matches_one_long_prefill(hf, backend, seed):
    ckpt, model = hf
    w = WorkloadBuilder(32, seed)
    w.step([(0, 65, False), (1, 3, False)])
    for _ in range(6):
        w.step([(0, 1, True), (1, 1, True)])
    check_against_hf(model, w.steps, run_local(ckpt, w.steps, backend), backend[2])


def test_continued_prefill_matches_one_long_prefill(hf, backend, seed):
    ckpt, model = hf
    w = WorkloadBuilder(32, seed)
    w.step([(2, 70, False)])
    w.step([(2, 64, True)])
    w.step([(2, 2, True)])
    check_against_hf(model, w.steps, run_local(ckpt, w.steps, backend), backend[2])


def test_fresh_prefills_mixed_with_decodes_in_one_batch_match_hf(hf, backend, seed):
    ckpt, model = hf
    steps = mixed_workload(32, seed)
    check_against_hf(model, steps, run_local(ckpt, steps, backend), backend[2])


def test_many_sequences_in_one_packed_batch_match_hf(hf, backend, seed):
    ckpt, model = hf
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 90, (24,), generator=g).tolist()
    w = WorkloadBuilder(32, seed)
    w.step([(s, n, False) for s, n in enumerate(lens)])
    w.step([(s, 1, True) for s in range(24)])
    check_against_hf(model, w.steps, run_local(ckpt, w.steps, backend, num_slots=24), backend[2])


def test_slot_holds_state_after_last_token(hf_next, seed):
    """After a prefill, decoding from the slot equals HF; and the state of an unused slot stays."""
    ckpt, model = hf_next
    cfg = GDNConfig.from_pretrained(ckpt)
    layers = load_layers(ckpt, layer_ids=[0], tp_rank=0, tp_size=1)
    cache = StateCache(cfg, [0], 4, tp_size=1)
    x = torch.randn(40, 32)
    layers[0](x[:39], Batch([39], [2], [False]), cache)
    assert cache.ssm[0][[0, 1, 3]].abs().sum() == 0 and cache.ssm[0][2].abs().sum() > 0
    y = layers[0](x[39:], Batch([1], [2], [True]), cache)
    assert rel_err(y, hf_layer_oracle(model, 0)(x)[39:]) < TOL[torch.float32]


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_ranks_match_hf(hf, tmp_path, tp, seed):
    ckpt, model = hf
    steps = mixed_workload(32, seed)
    results = run_ranks(tp, checkpoint_workload, tmp_path, str(ckpt), steps, 8)
    for r in range(1, tp):
        for i in results[0]:
            for a, b in zip(results[0][i], results[r][i]):
                assert torch.equal(a, b), f"rank {r} differs from rank 0 on layer {i}"
    check_against_hf(model, steps, results[0])


def test_hf_oracle_runs_transformers_torch_code_where_fla_is_installed(tmp_path):
    """transformers binds fla-core's kernels in place of its own code when fla is importable (as
    on the GPU machine); the oracle must stay transformers' torch code, and say so when it cannot."""
    pytest.importorskip("transformers")
    fake = tmp_path / "fla"
    (fake / "ops").mkdir(parents=True)
    body = "def chunk_gated_delta_rule(*a, **k):\n    raise RuntimeError('fake fla ran')\n" \
           "fused_recurrent_gated_delta_rule = chunk_gated_delta_rule\n"
    for f in (fake / "__init__.py", fake / "ops" / "__init__.py", fake / "ops" / "gated_delta_rule.py"):
        f.write_text(body)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tests), os.environ.get("PYTHONPATH", "")])}
    run = lambda code: subprocess.run([sys.executable, "-c", code], env=env, cwd=tests, capture_output=True, text=True)
    ok = run("import fla, torch, helpers\n"
             "m = helpers.build_hf_model('qwen3_next')\n"
             "print(tuple(m.model.layers[0].linear_attn(torch.randn(1, 70, 32)).shape))")
    assert ok.returncode == 0 and ok.stdout.strip() == "(1, 70, 32)", ok.stderr[-2000:]
    late = run("import transformers.models.qwen3_next.modeling_qwen3_next, helpers\n"
               "helpers.build_hf_model('qwen3_next')")
    assert late.returncode != 0 and "runs fla, not transformers' torch code" in late.stderr, late.stderr[-2000:]
