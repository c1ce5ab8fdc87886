"""The main job under each launcher (local processes, torchrun, Ray) at tp=2 with gloo, checked
against the single-process unsharded layer; Ray placement on two simulated nodes; failures."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import copy_checkpoint, job_across_launchers, rel_err, run_main_job
from tp_gdn import Batch, GDNConfig, StateCache, load_layers
from tp_gdn.cli import main as cli
from tp_gdn.loader.synthetic import write_checkpoint
from tp_gdn.workload import mixed_workload, run_steps

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--seqs", "3", "--prompt-len", "70", "--decode-steps", "3", "--check-layers", "all"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", dtype="float32", seed=3)


def test_local_launcher_matches_the_unsharded_layer(ckpt, tmp_path, capsys):
    outputs, summary = run_main_job(["--checkpoint", str(ckpt), "--tp", "2", *JOB], tmp_path, "local")
    assert summary["max_rel_err"] < 1e-5 and summary["checked_layers"] == [0, 1, 2]
    assert len(summary["ranks"]) == 2 and all(r["peak_memory_bytes"] > 0 for r in summary["ranks"])
    assert "tokens/s" in capsys.readouterr().out


def test_torchrun_gives_the_same_numbers_as_local_processes(ckpt, tmp_path):
    local, _ = run_main_job(["--checkpoint", str(ckpt), "--tp", "2", *JOB], tmp_path, "local")
    out, js = tmp_path / "tr.pt", tmp_path / "tr.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(ROOT / "launch" / "torchrun_job.py"), "--checkpoint", str(ckpt), *JOB,
                    "--save-outputs", str(out), "--json", str(js)], check=True, timeout=600, cwd=tmp_path)
    assert json.loads(js.read_text())["max_rel_err"] < 1e-5
    got = torch.load(out)["outputs"]
    for i in local:
        for a, b in zip(got[i], local[i]):
            assert torch.equal(a, b)


def test_joining_a_cpu_group_returns_only_once_every_rank_holds_it(tmp_path):
    """A gloo group's construction is no rendezvous: a rank that needs no collective can leave
    and close its sockets while a peer is still connecting, which fails the peer's init with
    "Connection closed by peer" (rank 0's init failed so once in CI, in a test whose ranks run no
    collective). Here rank 0 holds for a second right after its group is built; rank 1's
    init_distributed must not return before rank 0 is done."""
    import multiprocessing as mp

    from workers import join_and_leave

    hold_s = 1.0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=join_and_leave, args=(r, 2, str(tmp_path / "store"), str(tmp_path), hold_s))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    t0, t1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert t1["returned"] - t0["built"] >= 0.8 * hold_s, (t0, t1)


def test_a_failed_rank_is_reported_first_with_its_own_traceback(tmp_path):
    """The rank that failed first leads the error, whatever its number; peers that failed
    because it left follow."""
    from helpers import run_ranks
    from workers import fail_on_rank

    with pytest.raises(RuntimeError) as err:
        run_ranks(2, fail_on_rank, tmp_path, 1, "rank one gave up")
    text = str(err.value)
    assert text.startswith("rank1 failed:\nTraceback"), text[:300]
    assert "RuntimeError: rank one gave up" in text.split("rank0 failed:")[0]


def test_the_job_refuses_a_tp_that_does_not_divide_the_heads(ckpt, capsys):
    assert cli(["run", "--checkpoint", str(ckpt), "--tp", "3", *JOB]) == 2
    assert "tp=3 does not divide linear_num_key_heads=4" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--tp", "0"], "--tp must be >= 1, got 0"),    # --tp 0 once ran the default tp, as if no --tp had been given
    (["--tp", "-2"], "--tp must be >= 1, got -2"),
    (["--seqs", "0"], "--seqs and --prompt-len must be >= 1 and --decode-steps >= 0"),
    (["--prompt-len", "-1"], "--seqs and --prompt-len must be >= 1 and --decode-steps >= 0"),
    (["--decode-steps", "-1"], "--seqs and --prompt-len must be >= 1 and --decode-steps >= 0")])
def test_the_job_refuses_bad_sizes_in_one_line(argv, message, capsys):
    """Every refusal of `tp-gdn run` takes one form: 'tp-gdn run: error: ...' on stderr, exit code 2
    (these once ended with the bare message and exit code 1)."""
    assert cli(["run", "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err == f"tp-gdn run: error: {message}\n"


@pytest.mark.parametrize("argv,message", [(["--seqs", "0"], "--seqs and --prompt-len must be >= 1"),
                                          (["--tp", "3"], "--tp 3 but torchrun started 1 ranks")])
def test_the_torchrun_entry_refuses_bad_options_in_one_line(tmp_path, argv, message):
    """The per-rank entry (here one process, as torchrun with one rank would start it) says what is
    wrong in one line, with no traceback."""
    r = subprocess.run([sys.executable, "-m", "tp_gdn.launch.job", "--device", "cpu", *argv],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith(f"tp_gdn job: error: {message}"), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_the_job_runs_a_presharded_checkpoint_and_checks_it_against_the_joined_layer(ckpt, tmp_path, capsys):
    """The unsharded reference of a pre-sharded checkpoint is joined from every rank's file (the
    job once tried to load it at tp=1 and failed); outputs equal those from the HF checkpoint."""
    pre = tmp_path / "pre"
    assert cli(["shard", str(ckpt), "--tp", "2", "--out", str(pre)]) == 0
    hf_out, _ = run_main_job(["--checkpoint", str(ckpt), "--tp", "2", *JOB], tmp_path, "hf")
    pre_out, summary = run_main_job(["--checkpoint", str(pre), "--tp", "2", *JOB], tmp_path, "pre")
    assert summary["max_rel_err"] < 1e-5 and summary["checked_layers"] == sorted(pre_out)
    for i in hf_out:
        for a, b in zip(hf_out[i], pre_out[i]):
            assert torch.equal(a, b)
    capsys.readouterr()
    assert cli(["run", "--checkpoint", str(pre), "--tp", "1", *JOB]) == 2
    assert "is pre-sharded for tp=2, but this run has tp=1" in capsys.readouterr().err
    # started by torchrun itself: each rank says so in one line (no traceback of its own; torchrun
    # adds its report of the failed child), before loading anything
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                        str(ROOT / "launch" / "torchrun_job.py"), "--checkpoint", str(pre), *JOB],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert "tp_gdn job: error:" in r.stderr and "is pre-sharded for tp=2, but this run has tp=1" in r.stderr
    assert "CheckpointError" not in r.stderr and "load_layers" not in r.stderr


@pytest.mark.parametrize("layers,message", [(["3"], r"layers \[3\] are not linear-attention layers of "),
                                            (["0", "0"], r"layers \[0, 0\]: a layer is listed twice")])
def test_the_job_refuses_bad_layers_before_any_rank_starts(ckpt, capsys, layers, message):
    assert cli(["run", "--checkpoint", str(ckpt), "--tp", "2", "--layers", *layers, *JOB]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_job_refuses_a_backend_its_device_cannot_run_before_any_rank_starts(ckpt, tmp_path, capsys,
                                                                                monkeypatch):
    """--backend triton on the CPU (outside Triton's interpreter) once started every rank, and each
    raised the same error with its own traceback; and a model whose conv the Triton kernels do not
    run was refused only inside the ranks. Both now end the command in one line, before any rank
    starts (no rank says "loading")."""
    # the kernel modules are imported first, under the interpreter that conftest chose: a module
    # imported while TRITON_INTERPRET is unset would hold compiled kernels for the later tests
    import importlib

    importlib.import_module("tp_gdn.kernels.triton_ops")
    from tp_gdn.kernels.triton_conv import MAX_TAPS

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli(["run", "--device", "cpu", "--backend", "triton", "--checkpoint", str(ckpt), *JOB]) == 2
    err = capsys.readouterr().err
    assert "tp-gdn run: error: backend 'triton' needs a CUDA device (got cpu)" in err, err
    assert "Traceback" not in err and "loading" not in err, err
    # under the interpreter the backend runs on the CPU, but not a conv of more taps than it takes
    wide = copy_checkpoint(ckpt, tmp_path / "wide-conv")
    config = json.loads((wide / "config.json").read_text())
    config["linear_conv_kernel_dim"] = MAX_TAPS + 1
    (wide / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli(["run", "--device", "cpu", "--backend", "triton", "--checkpoint", str(wide), *JOB]) == 2
    err = capsys.readouterr().err
    assert f"runs conv kernels of 2 to {MAX_TAPS} taps, but this model's linear_conv_kernel_dim is " \
           f"{MAX_TAPS + 1}" in err, err
    assert "Traceback" not in err and "loading" not in err, err


def test_the_job_says_on_stderr_what_it_starts(ckpt, capsys, monkeypatch):
    from tp_gdn.launch import job

    summary = job.run_rank(job.JobSpec(checkpoint=str(ckpt), tp=1, seqs=2, prompt_len=20, decode_steps=2,
                                       check_layers="first"))
    cap = capsys.readouterr()
    assert cap.out == ""                      # the table (finish) is the only thing on stdout
    lines = [line for line in cap.err.splitlines() if line.startswith("tp_gdn: ")]
    assert [line.split()[1] for line in lines] == ["loading", "warming", "serving", "checking"]
    assert str(ckpt) in lines[0] and "over 1 rank (cpu, float32)" in lines[0]
    assert f"a prefill of {summary['prefill_tokens']} tokens (5 times, each from fresh sequences), then 2 decode " \
           "steps, through 3 layers" in lines[2]
    assert f"layers {summary['checked_layers']} against" in lines[3]
    assert "compile" not in lines[1]          # the kernel-compilation note is for GPUs
    assert "compile the Triton kernels" in job.warm_up_message("cuda")
    monkeypatch.setattr(job, "get_rank", lambda: 1)
    job.progress("a step")                    # ranks other than 0 say nothing
    assert capsys.readouterr().err == ""


def test_the_job_times_its_prefill_several_times_and_serves_the_same_numbers(ckpt, tmp_path):
    """prefill_repeats runs the fresh prefill step that many times before the decode steps: the
    rate is the median of those steps' times, and every output equals a run with one repeat
    (each repeat starts its sequences fresh). serve refuses to repeat a step that continues."""
    from tp_gdn.launch import job
    from tp_gdn.workload import mixed_workload

    spec = dict(checkpoint=str(ckpt), tp=1, seqs=3, prompt_len=40, decode_steps=3, check_layers="first")
    runs, saved = {}, {}
    for repeats in (1, 3):
        out = tmp_path / f"outputs{repeats}.pt"
        runs[repeats] = job.run_rank(job.JobSpec(**spec, prefill_repeats=repeats, save_outputs=str(out)))
        saved[repeats] = torch.load(out)
    once, thrice = runs[1], runs[3]
    assert len(once["prefill_ms"]) == 1 and len(thrice["prefill_ms"]) == 3
    assert thrice["prefill_tok_s"] == pytest.approx(
        thrice["prefill_tokens"] / (sorted(thrice["prefill_ms"])[1] * 1e-3), rel=1e-9)
    assert saved[1]["steps"] == saved[3]["steps"] == 4            # the prefill and 3 decode steps, once each
    (i, ys1), = saved[1]["outputs"].items()
    ys3 = saved[3]["outputs"][i]
    assert len(ys1) == len(ys3) == 4 and all(torch.equal(a, b) for a, b in zip(ys1, ys3))
    assert once["max_rel_err"] < 1e-5 and thrice["max_rel_err"] == once["max_rel_err"]
    assert "median of 3 steps" in job.format_summary(thrice) and "one step" in job.format_summary(once)
    steps = mixed_workload(8)
    with pytest.raises(ValueError, match="all start fresh"):
        job.serve(None, [], steps[1:], [], lambda: None, first_repeats=2)
    with pytest.raises(ValueError, match="first_repeats must be >= 1"):
        job.serve(None, [], steps, [], lambda: None, first_repeats=0)


def test_the_torchrun_command_carries_every_field_of_the_job(tmp_path):
    """tp-gdn run --launcher torchrun hands the job to torchrun as options: parsed back, they give
    the same JobSpec, for a spec that differs from the defaults in every field."""
    import dataclasses

    from tp_gdn.cli import torchrun_command
    from tp_gdn.launch.job import JobSpec

    spec = JobSpec(checkpoint=str(tmp_path / "ckpt"), tp=3, device="cpu", dtype="bfloat16", backend="torch", seqs=3,
                   prompt_len=17, decode_steps=2, seed=5, layers=[0, 2], check_layers="first",
                   save_outputs=str(tmp_path / "out.pt"), decode_graphs=False, prefill_repeats=2)
    default = JobSpec()
    same = [f.name for f in dataclasses.fields(JobSpec)
            if getattr(spec, f.name) == getattr(default, f.name)]
    assert same == ["device", "decode_graphs"], same      # both need CUDA to differ, and CI has none
    cmd = torchrun_command(spec, str(tmp_path / "s.json"))
    job_args = cmd[cmd.index("tp_gdn.launch.job") + 1:]
    assert f"--json={tmp_path / 's.json'}" in job_args
    assert spec_for([a for a in job_args if not a.startswith("--json")]) == spec
    assert cmd[cmd.index("-m") + 1] == "torch.distributed.run" and "--nproc-per-node=3" in cmd


def test_help_explains_every_option_and_environment_variable(capsys):
    with pytest.raises(SystemExit):
        cli(["run", "--help"])
    text = capsys.readouterr().out
    for opt in ("--checkpoint", "--tp", "--launcher", "--device", "--dtype", "--backend", "--seqs", "--prompt-len",
                "--decode-steps", "--check-layers", "--ray-address", "--json", "--decode-graphs"):
        assert opt in text
    # and every environment variable the package reads
    import re
    from pathlib import Path

    import tp_gdn
    read = {v for f in Path(tp_gdn.__file__).parent.rglob("*.py") for v in re.findall(r"TP_GDN_[A-Z_]+", f.read_text())}
    assert read and {v for v in read if v not in " ".join(text.split())} == set()


def test_decode_graphs_are_refused_without_cuda(capsys):
    assert cli(["run", "--device", "cpu", "--decode-graphs"]) == 2
    assert "tp-gdn run: error: --decode-graphs needs --device cuda" in capsys.readouterr().err


def spec_for(argv):
    import argparse

    from tp_gdn.launch.job import add_job_args, spec_from_args
    ap = argparse.ArgumentParser()
    add_job_args(ap)
    return spec_from_args(ap.parse_args(argv))


def test_decode_graphs_are_the_default_on_gpus_only(monkeypatch):
    assert not spec_for([]).decode_graphs or torch.cuda.is_available()
    assert not spec_for(["--device", "cpu"]).decode_graphs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # what the choice sees on a GPU host
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert spec_for([]).decode_graphs and spec_for([]).device == "cuda"
    assert not spec_for(["--no-decode-graphs"]).decode_graphs
    assert not spec_for(["--backend", "torch"]).decode_graphs
    with pytest.raises(ValueError, match="needs --device cuda and the triton backend"):
        spec_for(["--backend", "torch", "--decode-graphs"])


def test_ray_takes_device_cuda_from_a_machine_without_gpus(monkeypatch):
    """A Ray driver often runs on a head node without GPUs while its ranks land on the cluster's:
    --device cuda is taken there under --launcher ray (with --tp, which this machine cannot
    count), and still refused without a GPU under the other launchers."""
    from tp_gdn.cli import build_parser
    from tp_gdn.launch.job import spec_from_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    spec = spec_from_args(build_parser().parse_args(["run", "--launcher", "ray", "--device", "cuda", "--tp", "4"]))
    assert (spec.device, spec.tp, spec.dtype, spec.decode_graphs) == ("cuda", 4, "bfloat16", True)
    with pytest.raises(ValueError, match="--launcher ray on a machine without GPUs: give --tp"):
        spec_from_args(build_parser().parse_args(["run", "--launcher", "ray", "--device", "cuda"]))
    for launcher in ("local", "torchrun"):
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is visible"):
            spec_from_args(build_parser().parse_args(["run", "--launcher", launcher, "--device", "cuda", "--tp", "2"]))


def test_ray_options_are_refused_under_the_other_launchers(capsys):
    """--ray-address and --[no-]ray-compiled-graph do nothing outside Ray: said, not ignored."""
    for launcher in ("local", "torchrun"):
        for opts, flags in ((["--ray-address", "auto"], "--ray-address applies"),
                            (["--no-ray-compiled-graph"], "--\\[no-\\]ray-compiled-graph applies"),
                            (["--ray-address", "auto", "--ray-compiled-graph"],
                             "--ray-address and --\\[no-\\]ray-compiled-graph apply")):
            assert cli(["run", "--launcher", launcher, *opts]) == 2
            assert re.search(f"tp-gdn run: error: {flags} only to --launcher ray", capsys.readouterr().err)


class StaticBufferDecoder:
    """Stands in for GraphedDecoder on the CPU: runs every layer eagerly and returns the same
    output tensors each step, overwritten in place, as graph replays do."""

    def __init__(self, layers, cache):
        self.layers, self.cache, self.ys, self.calls = layers, cache, None, 0

    def __call__(self, x, slots):
        B = len(slots)
        ys = {i: layer(x, Batch([1] * B, slots, [True] * B), self.cache) for i, layer in self.layers.items()}
        if self.ys is None:
            self.ys = ys
        else:
            for i, y in ys.items():
                self.ys[i].copy_(y)
        self.calls += 1
        return self.ys


def test_job_puts_each_steps_input_in_place_before_its_timing_starts(ckpt, seed, monkeypatch):
    """serve() turns each step's x into the layers' input (put) before the step's barrier, so the
    cast and the copy to the device fall outside the step's time, and the layers get what put
    made (the job's put is job.to_layer_input, which casts on the device). The clock is the
    job's own (time.perf_counter in job.py), stepped by each event here."""
    import types

    import tp_gdn.launch.job as job
    from tp_gdn.workload import serving_workload

    layers64 = load_layers(ckpt, dtype=torch.float64)
    cfg = next(iter(layers64.values())).cfg
    ids = list(layers64)
    steps = serving_workload(cfg.hidden_size, 2, 40, 2, seed)
    cache = StateCache(cfg, ids, 2, dtype=torch.float64)
    events, clock = [], iter(range(1000))
    monkeypatch.setattr(job, "time", types.SimpleNamespace(
        perf_counter=lambda: events.append("clock") or next(clock)))

    def put(x):
        events.append("put")
        return job.to_layer_input(x, "cpu", torch.float64)

    def forward(i, x, batch):
        events.append(("layer", x.dtype))
        return layers64[i](x, batch, cache)

    times, outs = job.serve(forward, ids, steps, ids[:1], lambda: events.append("barrier"), put=put)
    layer = ("layer", torch.float64)
    one = ["put", "barrier", "clock"] + [layer] * len(ids) + ["barrier", "clock"]
    assert events == one * len(steps)
    assert len(times) == len(steps) and all(t == 1 for t in times)     # each step's clock read twice
    want = StateCache(cfg, ids, 2, dtype=torch.float64)
    for n, st in enumerate(steps):
        assert torch.equal(outs[ids[0]][n], layers64[ids[0]](st.x.double(), st.batch, want))


def test_job_serves_decode_steps_through_a_step_function_and_keeps_copies(ckpt, seed):
    from tp_gdn.launch.job import graphed_decode_step, serve
    from tp_gdn.workload import serving_workload

    layers = load_layers(ckpt)
    cfg = next(iter(layers.values())).cfg
    ids = list(layers)
    steps = serving_workload(cfg.hidden_size, 3, 70, 4, seed)

    def forward_on(cache):
        return lambda i, x, batch: layers[i](x, batch, cache)

    cache = StateCache(cfg, ids, 3)
    _, want = serve(forward_on(cache), ids, steps, ids, lambda: None)
    cache = StateCache(cfg, ids, 3)
    decoder = StaticBufferDecoder(layers, cache)
    _, got = serve(forward_on(cache), ids, steps, ids, lambda: None,
                   graphed_decode_step(decoder, ids))
    assert decoder.calls == 4                          # the four decode steps; the prefill was declined
    for i in ids:
        for n, (g, w) in enumerate(zip(got[i], want[i])):
            assert torch.equal(g, w), (i, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tensors_cross_to_and_from_ray_actors_bit_for_bit(dtype):
    """What RayExecutor sends to and from its actors (numpy arrays; 16-bit floats as their bits):
    the same values, shape and dtype back, in memory of their own, from a non-contiguous view."""
    from tp_gdn.launch.ray_executor import _from_wire, _to_wire

    x = torch.randn(5, 7, dtype=torch.float64).to(dtype)
    sent = x.t().clone()
    wire = _to_wire(x.t())                               # a non-contiguous view goes packed
    assert wire[0].flags.c_contiguous
    x.add_(1)                                            # the caller reuses its buffer: the wire keeps its own copy
    back = _from_wire(wire)
    assert back.dtype == dtype and back.shape == (7, 5) and torch.equal(back, sent)
    x = sent.t()
    wire[0].flags.writeable = False                      # as Ray hands arrays over
    again = _from_wire(wire)
    again += 1                                           # its own memory: writable, the array untouched
    assert torch.equal(_from_wire(wire), x.t())


def test_a_ray_ranks_steps_run_every_layer_in_one_call(ckpt, seed):
    """The actor side of RayExecutor.step and .decode, in this process, with the CPU stand-in for
    the graphs: one call takes a step through every layer; rank 0 returns copies of the asked
    layers' outputs (which later steps do not overwrite), the other ranks None."""
    from tp_gdn.launch.job import is_decode_step
    from tp_gdn.launch.ray_executor import _from_wire, _Rank, _to_wire
    from tp_gdn.workload import serving_workload

    cfg = GDNConfig.from_pretrained(ckpt)
    keep = cfg.linear_layer_ids[::2]
    steps = serving_workload(cfg.hidden_size, 3, 70, 3, seed)
    layers, cache = load_layers(ckpt), StateCache(cfg, cfg.linear_layer_ids, 3)
    want = [{i: layers[i](st.x, st.batch, cache) for i in keep} for st in steps]
    ranks = [_Rank(r, 2) for r in range(2)]
    for r in ranks:
        r.load(str(ckpt), "float32", False, None, "torch", 3)
        r.decoder = StaticBufferDecoder(r.layers, r.cache)
    got = []
    for st in steps:                                     # x and the outputs go as RayExecutor sends them
        x = _to_wire(st.x)
        if not is_decode_step(st.batch):                 # the prefill: every layer in one call
            assert ranks[1].step(x, st.batch, keep) is None
            ys, (start, end) = ranks[0].step(x, st.batch, keep)
        else:
            assert ranks[1].decode(x, list(st.batch.slots), keep) is None
            ys, (start, end) = ranks[0].decode(x, list(st.batch.slots), keep)
        assert set(ys) == set(keep) and end > start
        got.append({i: _from_wire(y) for i, y in ys.items()})
    assert ranks[0].decoder.calls == len(steps) - 1
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        for i in keep:
            assert torch.equal(g[i], w[i]), (n, i)


def test_real_dims_split_layout_gives_the_same_numbers_under_every_launcher(tmp_path):
    """One Qwen3.5-layout GDN layer at its real dims (H 2048, nk 16, nv 64, dk = dv 128, split
    projections) at tp=2: the CPU run of the check that tests/test_gpu_launch.py makes on GPUs
    up to tp=8."""
    ckpt = write_checkpoint(tmp_path / "qwen3.5", "qwen3.5", gdn_layers=1, dtype="bfloat16", seed=5)
    job = ["--checkpoint", str(ckpt), "--seqs", "2", "--prompt-len", "70", "--decode-steps", "2",
           "--check-layers", "all"]
    summaries = job_across_launchers(tmp_path, job, 2, 1e-5)
    assert summaries["local"]["checked_layers"] == [0]


# -- Ray ----------------------------------------------------------------------------------------
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_job_gives_the_same_numbers_as_local_processes(ckpt, tmp_path, local_ray, capsys):
    """The Ray job, with plain actor calls (the CPU default) and through a compiled graph, gives
    the local processes' numbers bit for bit."""
    local, _ = run_main_job(["--checkpoint", str(ckpt), "--tp", "2", *JOB], tmp_path, "local")
    capsys.readouterr()
    for flag, compiled in ((None, False), ("--ray-compiled-graph", True)):
        args = ["--checkpoint", str(ckpt), "--tp", "2", "--launcher", "ray", *JOB] + ([flag] if flag else [])
        got, summary = run_main_job(args, tmp_path, f"ray_{compiled}")
        assert summary["max_rel_err"] < 1e-5
        assert summary["ray_overhead_ms"] > 0 and summary["ray_decode_overhead_ms"] > 0
        assert summary["ray_compiled_graph"] is compiled
        if not torch.cuda.is_available():       # the default device is this machine's, and the job says so
            assert "no GPU is visible on this machine, so the Ray ranks run on CPUs" in capsys.readouterr().err
        for i in local:
            for a, b in zip(got[i], local[i], strict=True):
                assert torch.equal(a, b), (compiled, i)


@pytest.mark.parametrize("compiled", [False, True], ids=["actor_calls", "compiled_graph"])
def test_ray_executor_forward_equals_the_unsharded_layer(ckpt, local_ray, seed, compiled):
    from tp_gdn.launch.ray_executor import RayExecutor

    steps = mixed_workload(32, seed)
    cfg = GDNConfig.from_pretrained(ckpt)
    want = run_steps(load_layers(ckpt, tp_rank=0, tp_size=1), StateCache(cfg, cfg.linear_layer_ids, 8, tp_size=1),
                     steps)
    ids = cfg.linear_layer_ids
    ex = RayExecutor(str(ckpt), 2, num_slots=8, call_timeout_s=60, compiled_graph=compiled)
    try:
        assert ex.compiled_graph is compiled and (ex._dag is not None) is compiled
        with pytest.raises(ValueError, match=r"layer\(s\) \[99\] are not loaded here"):
            ex.step(steps[0].x, steps[0].batch, keep=[ids[0], 99])
        for n, st in enumerate(steps):     # a layer a call, and every layer in one call (step), in turn
            ys = {i: ex.forward(i, st.x, st.batch) for i in ids} if n % 2 else ex.step(st.x, st.batch)
            assert sorted(ys) == sorted(ids)
            for i in ids:
                assert rel_err(ys[i], want[i][n]) < 1e-5, (n, i)
        assert len(ex.calls) == sum(len(ids) if n % 2 else 1 for n in range(len(steps)))
        # graphed decode steps are for GPU ranks with the Triton backend: refused here, before any actor call
        x = torch.randn(2, cfg.hidden_size)
        for call in (lambda: ex.prepare_decode(2), lambda: ex.decode(x, [0, 1])):
            with pytest.raises(ValueError, match="need GPU ranks and the triton backend .*CPUs with the torch"):
                call()
    finally:
        ex.shutdown()


def test_ray_compiled_graph_names_a_failed_rank_and_one_that_gives_no_answer(ckpt, local_ray, seed):
    """Through the compiled graph: an input every rank refuses raises naming the ranks, and the
    executor goes on; a rank that gives no answer within call_timeout_s (here: one that sleeps
    before its collective) raises naming it, and the executor then refuses further calls."""
    from tp_gdn.launch.ray_executor import RayExecutor

    cfg = GDNConfig.from_pretrained(ckpt)
    st = mixed_workload(cfg.hidden_size, seed)[0]
    want = run_steps(load_layers(ckpt), StateCache(cfg, cfg.linear_layer_ids, 8), [st])
    ex = RayExecutor(str(ckpt), 2, num_slots=8, call_timeout_s=4, compiled_graph=True)
    try:
        bad = torch.randn(st.x.shape[0], cfg.hidden_size + 1)
        with pytest.raises(RuntimeError, match=r"(?s)step of \d+ tokens: rank 0 failed \(and rank\(s\) \[1\]\):.*"
                                               r"Traceback"):
            ex.step(bad, st.batch)
        ys = ex.step(st.x, st.batch)                  # the ranks failed before any collective: still usable
        for i in cfg.linear_layer_ids:
            assert rel_err(ys[i], want[i][0]) < 1e-5, i
        ray.get(ex.actors[1].stall_next.remote(6))
        t0 = time.monotonic()
        with pytest.raises((RuntimeError, TimeoutError), match=r"rank 1|rank\(s\) \[(0, )?1\]"):
            ex.step(st.x, st.batch)
        assert time.monotonic() - t0 < 30
        with pytest.raises(RuntimeError, match="refused, as an earlier call left the ranks unusable"):
            ex.step(st.x, st.batch)
    finally:
        ex.shutdown()
    assert ex.actors == [] and ex.pg is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs")
def test_ray_refuses_gpu_ranks_at_once_where_its_own_local_instance_has_no_gpus(ckpt, tmp_path):
    """A local Ray instance started by the job gains no GPUs, so its placement would wait out
    start_timeout_s (300 s) for nothing: the job says so at once instead (a fresh process, as the
    check applies where the executor starts Ray itself)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tp_gdn.cli", "run", "--launcher", "ray", "--device", "cuda", "--tp",
                        "2", "--checkpoint", str(ckpt), *JOB], capture_output=True, text=True, timeout=240,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tp-gdn run: error: the local Ray instance has 0 GPUs, and 2 ranks on GPUs need 2" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 120


@pytest.mark.parametrize("compiled", [False, True], ids=["actor_calls", "compiled_graph"])
def test_ray_dead_rank_surfaces_as_an_error_naming_it(ckpt, local_ray, compiled):
    from tp_gdn.launch.ray_executor import RayExecutor

    ex = RayExecutor(str(ckpt), 2, num_slots=4, call_timeout_s=20, compiled_graph=compiled)
    try:
        ex.actors[1].die.remote()
        time.sleep(1.0)
        st = mixed_workload(32, 0)[0]
        t0 = time.monotonic()
        with pytest.raises((RuntimeError, TimeoutError), match="rank 1"):
            ex.forward(0, st.x, st.batch)
        assert time.monotonic() - t0 < 60
    finally:
        ex.shutdown()
    assert ex.actors == [] and ex.pg is None


def test_ray_packs_ranks_per_node_on_two_simulated_nodes(ckpt, seed):
    """Two ranks a node, and a compiled graph that spans both nodes (and a driver on a third, the
    head) gives the unsharded layer's numbers."""
    from ray.cluster_utils import Cluster

    from tp_gdn.launch.ray_executor import RayExecutor

    cfg = GDNConfig.from_pretrained(ckpt)
    steps = mixed_workload(cfg.hidden_size, seed)[:2]
    want = run_steps(load_layers(ckpt), StateCache(cfg, cfg.linear_layer_ids, 8), steps)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False))
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        ex = RayExecutor(str(ckpt), 4, num_slots=8, call_timeout_s=60, compiled_graph=True)
        try:
            placed = ex.placement()
            for n, st in enumerate(steps):
                ys = ex.step(st.x, st.batch)
                for i in cfg.linear_layer_ids:
                    assert rel_err(ys[i], want[i][n]) < 1e-5, (n, i)
        finally:
            ex.shutdown()
        assert placed[0] == placed[1] and placed[2] == placed[3] and placed[0] != placed[2]
        assert set(placed) == {n.node_id for n in nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()
