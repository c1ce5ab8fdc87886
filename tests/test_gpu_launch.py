"""GPU runs of the launchers and CUDA-graph decode (marked; run them on the GPU machine).

Tests parametrized by tp skip where fewer GPUs are visible (run them on nvidia-h100-x4): NCCL runs
at tp = 1, 2, 4 against the fp32 reference and HF, tp = 2, 4 against tp = 1, torchrun against
Ray, prefill-then-decode against one prefill, and the symmetric-memory and copy-engine
all-reduces against NCCL's. The real-dims check under every launcher also runs at tp = 8 where
eight GPUs are visible (nvidia-h100-x8; issue 7).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (hf_layer_oracle, job_across_launchers, random_full_weights, rel_err, run_main_job,
                     tiny_config, with_weights_rounded_to)
from tp_gdn import Batch, GDNLayer, StateCache
from tp_gdn.cli import main as cli
from tp_gdn.workload import expected_outputs, mixed_workload

ROOT = Path(__file__).resolve().parents[1]
N_GPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
BF16_TOL = 3e-2   # bf16 against fp32: see test_hf_oracle.TOL
JOB = ["--seqs", "4", "--prompt-len", "150", "--decode-steps", "4", "--check-layers", "all", "--device", "cuda"]


def job_args():
    from tp_gdn.launch.job import default_checkpoint
    return [*JOB, "--checkpoint", str(default_checkpoint("cpu"))]   # tiny dims, nk 4: tp up to 4


def run_job(tmp_path, name, *args):
    return run_main_job([*job_args(), *args], tmp_path, name)


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
    for slots in ([4, 1], [4, 1], [1, 4], [1, 4], [4, 1]):   # slot buffer kept, then rewritten
        x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
        eager = layer(x, Batch([1, 1], slots, [True, True]), caches[0])
        assert torch.equal(decoder(x, slots)[0], eager)
    assert torch.equal(caches[0].ssm[0], caches[1].ssm[0]) and torch.equal(caches[0].conv[0], caches[1].conv[0])
    # the input written into the graph's own buffer: no copy, the same step
    buf = decoder.input_buffer(2)
    for slots in ([1, 4], [4, 1]):
        buf.copy_(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16))
        eager = layer(buf.clone(), Batch([1, 1], slots, [True, True]), caches[0])
        assert torch.equal(decoder(buf, slots)[0], eager)
    assert torch.equal(caches[0].ssm[0], caches[1].ssm[0]) and torch.equal(caches[0].conv[0], caches[1].conv[0])
    for bad, message in (([4, 4], "used twice"), ([4, 6], "out of range"), ([-1, 4], "slots are >= 0")):
        with pytest.raises(ValueError, match=message):
            decoder(x, bad)


@pytest.mark.gpu
def test_graphed_decode_pads_to_its_bucket_and_leaves_other_slots_alone(seed):
    """Steps of 3, 5 and 9 sequences replay the default buckets' graphs of 4, 8 and 16 (padding
    rows on the cache's padding slot): their outputs and their slots' states lie within bf16
    rounding of eager steps' (cuBLAS may pick another kernel for 4 rows than for 3), and the slots
    no step names keep their bits."""
    from tp_gdn.graphs import GraphedDecoder

    cfg = tiny_config(nk=4, nv=8, dk=32, dv=32, H=64, layers=2)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, seed), dtype=torch.bfloat16, device="cuda")
    caches = [StateCache(cfg, [0], 24, dtype=torch.bfloat16, device="cuda", tp_size=1) for _ in range(2)]
    prompt = torch.randn(12 * 20, 64, device="cuda", dtype=torch.bfloat16)
    for c in caches:
        layer(prompt, Batch([20] * 12, list(range(12)), [False] * 12), c)
    before = [t.clone() for t in (caches[1].ssm[0], caches[1].conv[0])]
    decoder = GraphedDecoder({0: layer}, caches[1])
    used = set()
    for slots in ([4, 1, 7], [4, 1, 7], [0, 2, 3, 5, 6], [9, 8, 7, 6, 5, 4, 3, 1, 0], [1, 4, 7]):
        used |= set(slots)
        x = torch.randn(len(slots), 64, device="cuda", dtype=torch.bfloat16)
        eager = layer(x, Batch([1] * len(slots), slots, [True] * len(slots)), caches[0])
        got = decoder(x, slots)[0]
        assert got.shape == eager.shape and rel_err(got, eager) < BF16_TOL, slots
    assert sorted(decoder._graphs) == [4, 8, 16]
    used, others = sorted(used), [s for s in range(24) if s not in used]
    assert rel_err(caches[1].ssm[0][used], caches[0].ssm[0][used]) < BF16_TOL
    assert rel_err(caches[1].conv[0][used].float(), caches[0].conv[0][used].float()) < BF16_TOL
    assert torch.equal(caches[1].ssm[0][others], before[0][others])
    assert torch.equal(caches[1].conv[0][others], before[1][others])


def tps(*sizes):
    return [pytest.param(tp, marks=pytest.mark.skipif(N_GPU < tp, reason=f"needs {tp} GPUs")) for tp in sizes]


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(1, 2, 4))
def test_nccl_job_matches_the_fp32_reference(tmp_path, tp):
    _, summary = run_job(tmp_path, f"tp{tp}", "--tp", str(tp))
    assert summary["max_rel_err"] < BF16_TOL and summary["ranks"][tp - 1]["device"] == f"cuda:{tp - 1}"
    _, summary32 = run_job(tmp_path, f"tp{tp}f32", "--tp", str(tp), "--dtype", "float32")
    assert summary32["max_rel_err"] < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(2, 4))
def test_tp_equals_tp1_on_gpus(tmp_path, tp):
    one, _ = run_job(tmp_path, "tp1", "--tp", "1")
    many, _ = run_job(tmp_path, f"tp{tp}", "--tp", str(tp))
    for i in one:
        for a, b in zip(many[i], one[i]):
            assert rel_err(a, b) < BF16_TOL   # the same bf16 arithmetic, split tp ways


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(2, 4))
def test_torchrun_and_ray_give_identical_numbers_on_gpus(tmp_path, monkeypatch, tp):
    pytest.importorskip("ray")
    # Ray's actors (one visible GPU each) all-reduce through NCCL; torchrun's ranks would take the
    # symmetric-memory all-reduce, which sums in another order (bits differ at tp > 2), so both use NCCL
    monkeypatch.setenv("TP_GDN_ALL_REDUCE", "nccl")
    ray_out, ray_sum = run_job(tmp_path, "ray", "--tp", str(tp), "--launcher", "ray", "--no-decode-graphs")
    out = tmp_path / "tr.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                    str(ROOT / "launch" / "torchrun_job.py"), *job_args(), "--no-decode-graphs",
                    "--save-outputs", str(out)],
                   check=True, timeout=600, cwd=tmp_path)
    tr_out = torch.load(out)["outputs"]
    for i in tr_out:
        for a, b in zip(ray_out[i], tr_out[i]):
            assert torch.equal(a, b)
    assert ray_sum["max_rel_err"] < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(2))
def test_a_ray_driver_that_sees_no_gpu_runs_its_ranks_on_the_clusters_gpus(tmp_path, monkeypatch, tp):
    """A driver on a machine without GPUs (a head node, say; here a process with
    CUDA_VISIBLE_DEVICES="") joins a Ray cluster whose node has the GPUs, with --device cuda --tp:
    its ranks run on those GPUs with the Triton backend, their outputs equal local processes'
    bits (NCCL on both), and the job's check against the unsharded fp32 layer runs on the
    driver's CPU."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("TP_GDN_ALL_REDUCE", "nccl")
    local_out, _ = run_job(tmp_path, "local", "--tp", str(tp), "--no-decode-graphs")
    out, js = tmp_path / "ray.pt", tmp_path / "ray.json"
    cluster = Cluster(initialize_head=True,
                      head_node_args=dict(num_cpus=tp + 2, num_gpus=tp, include_dashboard=False))
    try:
        r = subprocess.run([sys.executable, "-m", "tp_gdn.cli", "run", "--launcher", "ray", "--ray-address",
                            cluster.address, "--tp", str(tp), *job_args(), "--no-decode-graphs", "--save-outputs",
                            str(out), "--json", str(js)],
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    finally:
        cluster.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "so the Ray ranks run on CPUs" not in r.stderr
    summary = json.loads(js.read_text())
    assert [(x["device"], x["backend"]) for x in summary["ranks"]] == [("cuda:0", "triton")] * tp
    assert summary["spec"]["device"] == "cuda" and summary["max_rel_err"] < BF16_TOL
    ray_out = torch.load(out)["outputs"]
    assert ray_out.keys() == local_out.keys()
    for i in local_out:
        for a, b in zip(ray_out[i], local_out[i], strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(2))
def test_ray_job_replays_its_decode_steps_from_cuda_graphs(tmp_path, monkeypatch, tp):
    """The GPU default under Ray: each actor captures its decode graphs (RayExecutor.prepare_decode)
    and replays a whole step in one call (RayExecutor.decode), sent through a Ray compiled graph.
    The outputs equal the local launcher's graphed job bit for bit (NCCL on both, captured in the
    graphs), and the Ray job's with plain actor calls, and lie within bf16 rounding of the eager
    job's."""
    pytest.importorskip("ray")
    monkeypatch.setenv("TP_GDN_ALL_REDUCE", "nccl")
    local, _ = run_job(tmp_path, "local", "--tp", str(tp))                        # graphs: the GPU default
    eager, _ = run_job(tmp_path, "eager", "--tp", str(tp), "--no-decode-graphs")
    ray_out, summary = run_job(tmp_path, "ray", "--tp", str(tp), "--launcher", "ray")
    plain, plain_summary = run_job(tmp_path, "ray_plain", "--tp", str(tp), "--launcher", "ray",
                                   "--no-ray-compiled-graph")
    assert summary["ray_compiled_graph"] is True and plain_summary["ray_compiled_graph"] is False
    for s in (summary, plain_summary):
        assert [r["decode_graphs"] for r in s["ranks"]] == [True] * tp
        assert s["max_rel_err"] < BF16_TOL and s["ray_overhead_ms"] > 0 and s["ray_decode_overhead_ms"] > 0
    assert ray_out.keys() == local.keys() == plain.keys()
    for i in local:
        for n, (a, b, c, d) in enumerate(zip(ray_out[i], local[i], eager[i], plain[i], strict=True)):
            assert torch.equal(a, b), (i, n, rel_err(a, b))
            assert torch.equal(d, b), (i, n, rel_err(d, b))
            assert rel_err(a, c) < 1e-2, (i, n)      # the same kernels; cuBLAS may pick others under capture


@pytest.fixture(scope="module")
def real_dims_checkpoints(tmp_path_factory):
    from tp_gdn.loader.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("real_dims")
    return {p: write_checkpoint(root / p, p, gdn_layers=2, dtype="bfloat16", seed=7)
            for p in ("qwen3-next-80b", "qwen3.5")}


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-next-80b", "qwen3.5"])
@pytest.mark.parametrize("tp", tps(2, 4, 8))
def test_real_dims_give_the_same_numbers_under_every_launcher_on_gpus(tmp_path, monkeypatch, real_dims_checkpoints,
                                                                     preset, tp):
    """Two GDN layers at Qwen3-Next-80B dims (nk 16, nv 32: at tp=8 two key and four value heads a
    rank) or in the Qwen3.5 split layout (nk 16, nv 64), bf16: local processes, torchrun and Ray
    give bit-equal outputs, within bf16 tolerance of the one-GPU run and of the unsharded fp32
    layer (tests/helpers.job_across_launchers; the CPU runs it at tp=2 in test_launchers.py).
    Every launcher all-reduces through NCCL here, as Ray's actors do (see the test above)."""
    monkeypatch.setenv("TP_GDN_ALL_REDUCE", "nccl")
    job = ["--checkpoint", str(real_dims_checkpoints[preset]), "--device", "cuda", "--seqs", "4", "--prompt-len",
           "150", "--decode-steps", "4", "--check-layers", "all", "--no-decode-graphs"]
    summaries = job_across_launchers(tmp_path, job, tp, BF16_TOL)
    assert summaries["local"]["spec"]["dtype"] == "bfloat16" and len(summaries["local"]["ranks"]) == tp


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(1, 2))
def test_job_with_decode_graphs_matches_the_eager_job(tmp_path, tp):
    eager, eager_summary = run_job(tmp_path, f"eager{tp}", "--tp", str(tp), "--no-decode-graphs")
    graphed, summary = run_job(tmp_path, f"graphs{tp}", "--tp", str(tp))      # the GPU default
    assert not eager_summary["ranks"][0]["decode_graphs"]
    assert summary["ranks"][0]["decode_graphs"] and summary["max_rel_err"] < BF16_TOL
    for i in eager:
        for a, b in zip(graphed[i], eager[i]):
            assert rel_err(a, b) < 1e-2   # the same kernels; cuBLAS may pick others under capture


@pytest.mark.gpu
def test_main_job_runs_on_its_gpu_default_with_no_arguments(tmp_path, monkeypatch, capsys):
    """Every visible GPU, the generated 80B-dims checkpoint, bf16, checked against fp32."""
    monkeypatch.setenv("TP_GDN_CACHE", str(tmp_path / "cache"))
    js = tmp_path / "job.json"
    assert cli(["run", "--json", str(js)]) == 0
    summary = json.loads(js.read_text())
    assert summary["spec"]["tp"] == N_GPU and summary["spec"]["dtype"] == "bfloat16"
    assert "qwen3-next-80b-dims" in summary["checkpoint"] and summary["max_rel_err"] < BF16_TOL
    assert summary["ranks"][0]["decode_graphs"]
    assert "tokens/s" in capsys.readouterr().out


def _hf_workload(rank, world, ckpt, steps):
    from tp_gdn import load_layers
    from tp_gdn.workload import run_steps

    layers = load_layers(ckpt, dtype=torch.bfloat16, device=f"cuda:{rank}")
    cache = StateCache(layers[0].cfg, list(layers), 8, dtype=torch.bfloat16, device=f"cuda:{rank}")
    return {i: [y.cpu() for y in ys] for i, ys in run_steps(layers, cache, steps).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(2, 4))
def test_nccl_prefill_then_decode_matches_hf(hf_next, seed, tp):
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    ckpt, model = hf_next
    steps = mixed_workload(32, seed)
    results = spawn_ranks(tp, _with_rank, _hf_workload, str(ckpt), steps, backend="nccl")
    oracle = with_weights_rounded_to(model, torch.bfloat16)
    for i, outs in results[0].items():
        want = expected_outputs(steps, hf_layer_oracle(oracle, i))
        for n, (got, exp) in enumerate(zip(outs, want)):
            for r in range(1, tp):
                assert torch.equal(got, results[r][i][n])
            assert rel_err(got, exp) < BF16_TOL, (i, n)


def _prefill_vs_decode(rank, world, ckpt, dtype, L, k, seed):
    """One prefill of L + k tokens, against a prefill of L tokens then k single-token steps."""
    from tp_gdn import load_layers

    dev = f"cuda:{rank}"
    layers = load_layers(ckpt, dtype=dtype, device=dev)
    cfg = layers[0].cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, L + k, cfg.hidden_size, generator=g).to(dev, dtype)
    out = {}
    for i, layer in layers.items():
        one = StateCache(cfg, [i], 3, dtype=dtype, device=dev)
        whole = layer(x.reshape(-1, cfg.hidden_size), Batch([L + k] * 3, [0, 1, 2], [False] * 3), one)
        steps = StateCache(cfg, [i], 3, dtype=dtype, device=dev)
        ys = [layer(x[:, :L].reshape(-1, cfg.hidden_size), Batch([L] * 3, [2, 0, 1], [False] * 3), steps)
              .reshape(3, L, -1)]
        for t in range(L, L + k):
            ys.append(layer(x[:, t], Batch([1] * 3, [2, 0, 1], [True] * 3), steps)[:, None])
        out[i] = (whole.reshape(3, L + k, -1).cpu(), torch.cat(ys, 1).cpu(), rel_err(one.ssm[i], steps.ssm[i][[2, 0, 1]]))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("tp", tps(1, 2, 4))
def test_prefill_then_decode_equals_one_prefill_on_gpus(hf_next, seed, tp, dtype, tol):
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    ckpt, _ = hf_next
    results = spawn_ranks(tp, _with_rank, _prefill_vs_decode, str(ckpt), dtype, 130, 6, seed, backend="nccl")
    for i, (whole, stepped, state_err) in results[0].items():
        assert rel_err(stepped, whole) < tol, i
        assert state_err < tol, i


ALL_REDUCE_PATHS = {"nccl": ("nccl", "auto"), "auto": ("auto", "auto"), "push": ("auto", "push"),
                    "oneshot": ("auto", "oneshot"), "ll": ("auto", "ll")}


def _all_reduce_paths(rank, world, cfg, full, seed):
    """The same prefill and decode steps (of two sequences, then of one) with
    TP_GDN_ALL_REDUCE=nccl (all eager) and =auto with each symmetric-memory kernel (the prefill and
    the first decode step of each size eager, the rest replayed from a CUDA graph): {path: (the
    all-reduce kind for these rows, outputs)}."""
    import os

    from tp_gdn.graphs import GraphedDecoder

    dev, bf, H = f"cuda:{rank}", torch.bfloat16, cfg.hidden_size
    out = {}
    for path, (mode, kernel) in ALL_REDUCE_PATHS.items():
        os.environ["TP_GDN_ALL_REDUCE"], os.environ["TP_GDN_SYMM_KERNEL"] = mode, kernel
        layer = GDNLayer.from_full(cfg, 0, full, rank, world, dtype=bf, device=dev)
        cache = StateCache(cfg, [0], 4, dtype=bf, device=dev, tp_size=world)
        g = torch.Generator().manual_seed(seed)
        ys = [layer(torch.randn(70, H, generator=g).to(dev, bf), Batch([30, 40], [3, 1], [False, False]), cache)]
        decoder = GraphedDecoder({0: layer}, cache) if mode == "auto" else None
        for t in range(4):
            x = torch.randn(2, H, generator=g).to(dev, bf)
            if decoder is None or t == 0:
                ys.append(layer(x, Batch([1, 1], [3, 1], [True, True]), cache))
            else:
                ys.append(decoder(x, [3, 1])[0].clone())
        # one sequence: there the out_proj product pushes the flag-in-word kernel's words itself
        for t in range(3):
            x = torch.randn(1, H, generator=g).to(dev, bf)
            if decoder is None or t == 0:
                ys.append(layer(x, Batch([1], [3], [True]), cache))
            else:
                ys.append(decoder(x, [3])[0].clone())
        out[path] = (layer.out_proj.all_reduce_kind(70), [y.float().cpu() for y in ys])
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("tp", tps(2, 4))
def test_symmetric_memory_all_reduce_equals_nccl_on_gpus(seed, tp):
    """Small outputs take an all-reduce over symmetric memory by default on GPUs of one host; with
    each kernel (the default, our push and flag-in-word kernels, torch's one-shot) its outputs,
    eager and from CUDA graphs, agree with NCCL's and with the unsharded fp32 layer, and every rank
    returns the same numbers."""
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    cfg = tiny_config(nk=4, nv=8, dk=32, dv=32, H=64, layers=1)
    full = random_full_weights(cfg, seed)
    results = spawn_ranks(tp, _with_rank, _all_reduce_paths, cfg, full, seed, backend="nccl")
    ref_layer = GDNLayer.from_full(cfg, 0, full)
    cache = StateCache(cfg, [0], 4)
    g = torch.Generator().manual_seed(seed)
    want = [ref_layer(torch.randn(70, 64, generator=g).to(torch.bfloat16).float(), Batch([30, 40], [3, 1], [False, False]), cache)]
    for _ in range(4):
        want.append(ref_layer(torch.randn(2, 64, generator=g).to(torch.bfloat16).float(), Batch([1, 1], [3, 1], [True, True]), cache))
    for _ in range(3):
        want.append(ref_layer(torch.randn(1, 64, generator=g).to(torch.bfloat16).float(), Batch([1], [3], [True]), cache))
    assert [results[0][p][0] for p in ALL_REDUCE_PATHS] == ["group", "symm", "symm", "symm", "symm"]
    for r in range(tp):
        for path in ("auto", "push", "oneshot", "ll"):
            for n, (a, b, w) in enumerate(zip(results[r][path][1], results[r]["nccl"][1], want)):
                assert torch.equal(a, results[0][path][1][n]), (path, r, n)
                assert rel_err(a, b) < 1e-2, (path, r, n, rel_err(a, b))
                assert rel_err(a, w) < BF16_TOL, (path, r, n, rel_err(a, w))


def _push_back_to_back(rank, world, seed, calls, kernel):
    """`calls` all-reduces by our `kernel` ("push", "ll" or "auto", which takes both by size) of
    uneven sizes, bf16 and fp32 mixed, issued back to back (no host wait between them, so a rank
    may run ahead of its peers by a call), then the same from a CUDA graph; returns (calls that
    differ from the fp32 sum in rank order of every rank's input, rounded once)."""
    import torch.distributed as dist

    from tp_gdn.parallel.comm import LL_MAX_BYTES, SymmetricAllReduce

    dev = torch.device("cuda", rank)
    ar = SymmetricAllReduce(dist.group.WORLD, dev, kernel=kernel)
    g = torch.Generator().manual_seed(seed)
    dtypes = [(torch.bfloat16, torch.float32)[i] for i in torch.randint(0, 2, (calls,), generator=g).tolist()]
    # every other call no larger than the flag-in-word kernel takes under auto, so auto alternates
    sizes = [int(torch.randint(1, (LL_MAX_BYTES if i % 2 else ar.max_bytes) // dt.itemsize + 1, (1,), generator=g))
             for i, dt in enumerate(dtypes)]
    sizes[:4] = [1, 2048, ar.max_bytes // dtypes[2].itemsize, 1023]
    xs = [torch.randn(world, n, generator=g).to(dev, dt) for n, dt in zip(sizes, dtypes)]

    def in_rank_order(x):
        acc = x[0].float()
        for row in x[1:]:
            acc = acc + row.float()
        return acc.to(x.dtype)

    wants = [in_rank_order(x) for x in xs]

    def run(outs):
        for x, out in zip(xs, outs):
            staged = ar.staging(out.shape, out.dtype)
            staged.copy_(x[rank])
            ar.reduce_out(staged, out)

    eager = [torch.empty(n, device=dev, dtype=dt) for n, dt in zip(sizes, dtypes)]
    run(eager)
    graphed = [torch.empty(n, device=dev, dtype=dt) for n, dt in zip(sizes[:8], dtypes)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(graphed)
    bad = [i for i, (o, w) in enumerate(zip(eager, wants)) if not torch.equal(o, w)]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize(dev)
    bad += [f"graph {i}" for i, (o, w) in enumerate(zip(graphed, wants)) if not torch.equal(o, w)]
    return bad


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["push", "ll", "auto"])
@pytest.mark.parametrize("tp", tps(2, 4))
def test_push_all_reduce_back_to_back_on_gpus(seed, tp, kernel):
    """Our push and flag-in-word kernels, alone and both by size (auto, on one table of epochs),
    200 calls (bf16 and fp32 mixed) issued back to back and 20 replays of a graph of 8, on every
    rank: each output equals the fp32 sum of the ranks' inputs in rank order (so every rank's
    bits agree)."""
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    results = spawn_ranks(tp, _with_rank, _push_back_to_back, seed, 200, kernel, backend="nccl")
    assert results == [[]] * tp


# (tokens, sequences, tail) at hidden size TAIL_H: calls of growing and shrinking size (the mapped
# buffer grows four times), uneven chunks, a call whose output is small enough for the symmetric
# all-reduce (no tail: one piece), a call in one piece, one over TAIL_MIN_TOKENS with the default tail
TAIL_H = 1024
TAIL_CALLS = [(1100, 4, 3), (3000, 5, 5), (1500, 3, 2), (300, 2, 3), (2000, 2, 1), (6000, 6, 4), (3000, 4, 7),
              (8200, 2, None)]


def _copy_form(world: int, form: str) -> None:
    """Make the copy engines take `form` at this group size: "whole" or "scatter"
    (CopyEngineAllReduce's two forms), or "whole-last-on-side" (the whole form with the last
    chunk summed on the side stream like the others, LAST_ON_MAIN off)."""
    from tp_gdn.parallel import comm

    comm.CopyEngineAllReduce.SCATTER_MIN_WORLD = 2 if form == "scatter" else world + 1
    comm.CopyEngineAllReduce.LAST_ON_MAIN = form != "whole-last-on-side"


def _tail_paths(rank, world, cfg, full, seed, form):
    """TAIL_CALLS issued back to back (no host wait between them) with TP_GDN_ALL_REDUCE=nccl
    and =auto (the copy engines in `form`): {mode: (the chunked all-reduce kind, outputs, rows
    of each chunk the copy engines summed)}."""
    import os

    from tp_gdn.parallel import comm

    _copy_form(world, form)

    dev, bf, H = f"cuda:{rank}", torch.bfloat16, cfg.hidden_size
    counted = []
    reduce = comm.CopyEngineCall.reduce

    def count(self, r0, r1, out, last=False):
        counted.append(r1 - r0)
        return reduce(self, r0, r1, out, last)

    comm.CopyEngineCall.reduce = count
    comm.CopyEngineAllReduce.MIN_ROWS = 0      # every size here takes the copy engines where they apply
    out = {}
    for mode in ("nccl", "auto"):
        os.environ["TP_GDN_ALL_REDUCE"] = mode
        layer = GDNLayer.from_full(cfg, 0, full, rank, world, dtype=bf, device=dev)
        cache = StateCache(cfg, [0], 8, dtype=bf, device=dev, tp_size=world)
        g = torch.Generator().manual_seed(seed)
        counted.clear()
        ys = []
        for T, n, tail in TAIL_CALLS:
            lens = [T // n + (i < T % n) for i in range(n)]
            x = torch.randn(T, H, generator=g).to(dev, bf)
            ys.append(layer(x, Batch(lens, list(range(n)), [False] * n), cache, tail=tail))
        torch.cuda.synchronize(dev)
        out[mode] = (layer.out_proj.chunked_all_reduce_kind(1100), [y.float().cpu() for y in ys], list(counted))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["whole", "whole-last-on-side", "scatter"])
@pytest.mark.parametrize("tp", tps(2, 4))
def test_copy_engine_tail_equals_nccl_on_gpus(seed, tp, form):
    """The tail's all-reduce on copy engines (the default for row chunks on GPUs of one host),
    in each of its two forms (the whole form also with its last chunk summed on the side
    stream): calls of several sizes and chunk counts, back to back, give NCCL's
    outputs (bit for bit at tp=2, where both add the same two numbers), the unsharded fp32
    layer's within bf16 tolerance, the same bits on every rank, and every chunk went through the
    copy engines."""
    from tp_gdn.launch.local import spawn_ranks
    from tp_gdn.layer import TAIL_CHUNKS
    from tp_gdn.parallel.comm import SYMM_MAX_BYTES

    from helpers import _with_rank

    cfg = tiny_config(nk=4, nv=8, dk=32, dv=32, H=TAIL_H, layers=1)
    full = random_full_weights(cfg, seed)
    results = spawn_ranks(tp, _with_rank, _tail_paths, cfg, full, seed, form, backend="nccl")
    ref_layer = GDNLayer.from_full(cfg, 0, full)
    cache = StateCache(cfg, [0], 8)
    g = torch.Generator().manual_seed(seed)
    want, rows = [], []
    for T, n, tail in TAIL_CALLS:
        lens = [T // n + (i < T % n) for i in range(n)]
        x = torch.randn(T, TAIL_H, generator=g).to(torch.bfloat16).float()
        want.append(ref_layer(x, Batch(lens, list(range(n)), [False] * n), cache))
        c = TAIL_CHUNKS.get(("copy", tp), 1) if tail is None else tail
        if c > 1 and T * TAIL_H * 2 > SYMM_MAX_BYTES:
            rows += [(i + 1) * T // c - i * T // c for i in range(c)]
    assert len(rows) > 20
    assert results[0]["nccl"][0] == "group" and results[0]["auto"][0] == "copy"
    assert results[0]["auto"][2] == rows and results[0]["nccl"][2] == []
    for r in range(tp):
        for n, (a, b, w) in enumerate(zip(results[r]["auto"][1], results[r]["nccl"][1], want)):
            assert torch.equal(a, results[0]["auto"][1][n]), (r, n)
            if tp == 2:
                assert torch.equal(a, b), (r, n)
            assert rel_err(a, b) < 1e-2, (r, n)
            assert rel_err(a, w) < BF16_TOL, (r, n, rel_err(a, w))


def _tail_failure(rank, world, cfg, full, seed, form):
    """Calls of TAIL_H-wide rows in 4 row chunks on the copy engines, back to back: a whole call,
    a call in which the last rank's gated norm raises on the tail's third chunk, one in which it
    raises inside the first part, then the first call again (every sequence fresh, so its output
    does not depend on the calls between). Returns (first output, last output, the errors
    caught). The copy engines take `form`."""
    import os

    from tp_gdn.parallel import comm
    from workers import failing_norm

    _copy_form(world, form)
    os.environ["TP_GDN_ALL_REDUCE"] = "auto"
    comm.CopyEngineAllReduce.MIN_ROWS = 0
    dev, bf = f"cuda:{rank}", torch.bfloat16
    layer = GDNLayer.from_full(cfg, 0, full, rank, world, dtype=bf, device=dev)
    assert layer.out_proj.chunked_all_reduce_kind(3000) == "copy"
    cache = StateCache(cfg, [0], 8, dtype=bf, device=dev, tp_size=world)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, cfg.hidden_size, generator=g).to(dev, bf)
    batch = Batch([700, 800, 600, 900], [0, 1, 2, 3], [False] * 4)
    errors = []
    first = layer(x, batch, cache, tail=4)
    for fail_at in (3, 1):
        try:
            with failing_norm(layer, fail_at if rank == world - 1 else 0):
                layer(torch.randn(3000, cfg.hidden_size, generator=g).to(dev, bf), batch, cache, tail=4)
            errors.append(None)
        except RuntimeError as e:
            errors.append(str(e))
    last = layer(x, batch, cache, tail=4)
    torch.cuda.synchronize(dev)      # waits for ever where this rank's streams wait on flags no peer raised
    return first.float().cpu(), last.float().cpu(), errors


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["whole", "scatter"])
@pytest.mark.parametrize("tp", tps(2, 4))
def test_a_rank_that_fails_inside_the_copy_engine_tail_leaves_its_peers_running_on_gpus(seed, tp, form):
    """The last rank raises inside the copy engines' tail (in a later chunk, then in the first
    part) and catches the error; the other ranks' calls complete instead of waiting for ever on
    its flags, and the next call gives every rank the first call's bits, within bf16 tolerance of
    the unsharded fp32 layer."""
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    cfg = tiny_config(nk=4, nv=8, dk=32, dv=32, H=TAIL_H, layers=1)
    full = random_full_weights(cfg, seed)
    results = spawn_ranks(tp, _with_rank, _tail_failure, cfg, full, seed, form, backend="nccl", timeout_s=300)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, TAIL_H, generator=g).to(torch.bfloat16).float()
    want = GDNLayer.from_full(cfg, 0, full)(x, Batch([700, 800, 600, 900], [0, 1, 2, 3], [False] * 4),
                                           StateCache(cfg, [0], 8))
    for r, (first, last, errors) in enumerate(results):
        assert errors == ([f"injected failure in norm call {n}" for n in (3, 1)] if r == tp - 1 else [None, None])
        assert torch.equal(last, first) and torch.equal(first, results[0][0]), r
        assert rel_err(first, want) < BF16_TOL, (r, rel_err(first, want))


def _watchdog_skip(rank, world, cfg, full, seed, path):
    """Calls of one all-reduce path ("graph": graphed decode, the default symmetric-memory kernel;
    "eager": eager decode, the same; "copy": a prefill whose tail takes the copy engines) with a
    3-second watchdog: calls on every rank, then the GPU idle for 4 s (longer than the timeout:
    nothing may fire), more calls, after which the watchdog's host and GPU counts of the all-reduce
    must both equal the calls made, then the last rank skips one call that the others make and wait
    on. Returns what the last rank did; the others must not return (the watchdog ends them)."""
    import os
    import sys
    import time

    from tp_gdn.graphs import GraphedDecoder
    from tp_gdn.parallel import comm

    os.environ["TP_GDN_COLLECTIVE_TIMEOUT"] = "3"
    os.environ["TP_GDN_ALL_REDUCE"] = "auto"
    comm.CopyEngineAllReduce.MIN_ROWS = 0
    dev, bf = f"cuda:{rank}", torch.bfloat16
    layer = GDNLayer.from_full(cfg, 0, full, rank, world, dtype=bf, device=dev)
    cache = StateCache(cfg, [0], 8, dtype=bf, device=dev, tp_size=world)
    g = torch.Generator().manual_seed(seed)
    if path == "copy":
        batch = Batch([700, 800, 600, 900], [0, 1, 2, 3], [False] * 4)
        assert layer.out_proj.chunked_all_reduce_kind(3000) == "copy"
        xs = [torch.randn(3000, cfg.hidden_size, generator=g).to(dev, bf) for _ in range(3)]

        def call(i):
            return layer(xs[i % 3], batch, cache, tail=4)
    else:
        assert layer.out_proj.all_reduce_kind(3) == "symm"
        layer(torch.randn(30, cfg.hidden_size, generator=g).to(dev, bf), Batch([10, 10, 10], [0, 1, 2], [False] * 3),
              cache)
        xs = [torch.randn(3, cfg.hidden_size, generator=g).to(dev, bf) for _ in range(3)]
        decode = Batch([1, 1, 1], [0, 1, 2], [True] * 3)
        graphed = GraphedDecoder({0: layer}, cache) if path == "graph" else None

        def call(i):
            return graphed(xs[i % 3], [0, 1, 2])[0] if graphed else layer(xs[i % 3], decode, cache)
    for i in range(3):
        call(i)
    torch.cuda.synchronize(dev)
    time.sleep(4)
    for i in range(5):
        call(i)
    torch.cuda.synchronize(dev)
    # the counts agree: every call the host counted, the GPU reported (copy: 8 calls; decode: the
    # prefill, then the graph's warm-up call on its scratch cache and 8 replays, or 8 eager steps)
    progress = layer.out_proj.copy.progress if path == "copy" else layer.out_proj.symm.progress
    want = {"copy": 8, "graph": 10, "eager": 9}[path]
    assert (progress.queued, progress.finished) == (want, want), (progress.queued, progress.finished)
    if rank == world - 1:
        return "skipped the call"
    print(f"rank {rank}: the call that the last rank skips", file=sys.stderr, flush=True)
    call(0)
    torch.cuda.synchronize(dev)       # waits for ever: the watchdog ends this process
    print(f"rank {rank}: the call completed", file=sys.stderr, flush=True)
    return "the call completed"


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["graph", "eager", "copy"])
@pytest.mark.parametrize("tp", tps(2, 4))
def test_the_watchdog_ends_a_rank_whose_peer_skips_a_call_on_gpus(seed, tp, path, capfd):
    """The symmetric-memory kernels' and the copy engines' waits have no timeout. With
    TP_GDN_COLLECTIVE_TIMEOUT=3, calls on every rank and 4 s of idle GPUs end nothing; then the
    last rank skips a call, and each other rank, whose GPU waits on it for ever, ends with exit
    code 3 and the watchdog's message on stderr, naming the all-reduce. (spawn_ranks then kills
    the ranks still running: the last rank, which skipped the call, may still be ending.)"""
    from tp_gdn.launch.local import spawn_ranks

    from helpers import _with_rank

    cfg = tiny_config(nk=4, nv=8, dk=32, dv=32, H=TAIL_H, layers=1)
    full = random_full_weights(cfg, seed)
    with pytest.raises(RuntimeError, match=r"ranks exited abnormally \(rank, exit code\): .*, 3\)"):
        spawn_ranks(tp, _with_rank, _watchdog_skip, cfg, full, seed, path, backend="nccl", timeout_s=120)
    err = capfd.readouterr().err
    what = "the copy-engine all-reduce" if path == "copy" else "the decode all-reduce (TP_GDN_SYMM_KERNEL=auto)"
    assert "rank 0: the call that the last rank skips" in err, err[-3000:]
    assert f"{what}: this rank queued" in err and "ending this process (exit code 3)" in err, err[-3000:]
    assert "rank 0: the call completed" not in err
