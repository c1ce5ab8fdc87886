"""The main job: load a checkpoint sharded over the ranks, serve a workload of packed prefills
followed by decode steps through every GDN layer, check it against the unsharded fp32 layer,
and report throughput, error and memory.

Each rank runs `run_rank`; `torchrun ... -m tp_gdn.launch.job` (or launch/torchrun_job.py)
starts it under torchrun, `tp_gdn.launch.local` in local processes, and the Ray executor drives
the same workload from its driver.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import GDNConfig, StateCache, load_layers
from ..parallel import destroy_distributed, get_rank, get_world_size, init_distributed, local_device
from ..workload import Step, serving_workload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class JobSpec:
    checkpoint: str | None = None     # None: the embedded default for the device (default_checkpoint)
    tp: int = 2
    device: str = "cpu"               # "cpu" (gloo, torch kernels) or "cuda" (nccl, Triton kernels)
    dtype: str = "float32"
    backend: str = "auto"
    seqs: int = 4
    prompt_len: int = 96
    decode_steps: int = 8
    seed: int = 0
    layers: list[int] | None = None   # GDN layers to run (default: all)
    check_layers: str = "all"         # "all", "first" or "none": layers compared with the reference
    save_outputs: str | None = None   # rank 0 writes the checked layers' outputs here (torch.save)
    decode_graphs: bool = False       # decode steps replayed from CUDA graphs (CUDA, Triton backend);
                                      # the command line turns it on by default on GPUs
    prefill_repeats: int = 5          # the prefill step is timed this many times (serve's first_repeats)


# the embedded defaults: (directory name, write_checkpoint arguments) per device type
DEFAULT_CHECKPOINTS = {
    "cpu": ("tiny-qwen3-next-v2", dict(preset="tiny", dtype="float32")),
    "cuda": ("qwen3-next-80b-dims-4gdn-v2", dict(preset="qwen3-next-80b", gdn_layers=4, dtype="bfloat16",
                                                  max_file_bytes=100 << 20)),
}


def default_checkpoint(device: str = "cpu") -> Path:
    """The embedded default, generated once into the user's cache directory (TP_GDN_CACHE
    overrides where): on the CPU a tiny random Qwen3-Next-layout checkpoint; on GPUs four GDN
    layers with the real Qwen3-Next-80B-A3B GDN dims (H 2048, nk 16, nv 32, dk = dv 128), bf16,
    in two files (about 270 MB)."""
    import os
    import shutil
    import sys

    from ..loader.synthetic import write_checkpoint

    name, kw = DEFAULT_CHECKPOINTS["cuda" if str(device).startswith("cuda") else "cpu"]
    root = Path(os.environ.get("TP_GDN_CACHE", Path.home() / ".cache" / "tp_gdn"))
    path = root / name
    if not (path / "config.json").is_file():
        tmp = root / f".{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)   # left by an earlier process of this pid that did not finish
        if kw["preset"] != "tiny":
            print(f"tp_gdn: writing the default checkpoint ({kw['preset']} dims, {kw['gdn_layers']} GDN layers) "
                  f"to {path} once", file=sys.stderr, flush=True)
        write_checkpoint(tmp, seed=0, **kw)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_spec(spec: JobSpec) -> None:
    """Refuse, before any rank starts, a job that cannot run as asked: a backend the device cannot
    run (each rank would raise the same error, each with its own traceback), or a checkpoint
    whose model that backend does not run, whose heads the tp does not divide, whose pre-sharded
    tp differs, or whose GDN layers --layers does not name or names twice. (The default checkpoint
    is generated later, and always fits.)"""
    from ..kernels import get_ops, resolve_backend
    from ..loader.presharded import check_presharded_tp

    backend = resolve_backend(spec.backend, spec.device)
    if spec.checkpoint is None:
        return
    cfg = GDNConfig.from_pretrained(spec.checkpoint)
    try:
        ops = get_ops(backend)
    except ImportError:     # a Ray driver without Triton, its ranks on GPUs elsewhere: they check the model
        pass
    else:
        ops.check_config(cfg)
    cfg.check_tp(spec.tp)
    check_presharded_tp(spec.checkpoint, spec.tp)
    if spec.layers:
        cfg.check_layer_ids(spec.layers, spec.checkpoint)


def progress(message: str) -> None:
    """Say on stderr what the job starts now (rank 0, or the driver under Ray), so that its long
    steps do not pass in silence: the first calls on GPUs compile the Triton kernels, and the check
    runs the unsharded fp32 layers on the CPU. The table stays alone on stdout."""
    if get_rank() == 0:
        print(f"tp_gdn: {message}", file=sys.stderr, flush=True)


def warm_up_message(device: str) -> str:
    return "warming up on the first two steps" + (
        " (the first calls compile the Triton kernels, once per machine and shape)" if device == "cuda" else "")


def serving_message(steps: list[Step], layer_ids: list[int], prefill_repeats: int = 1) -> str:
    times = f" ({prefill_repeats} times, each from fresh sequences)" if prefill_repeats > 1 else ""
    return (f"serving a prefill of {steps[0].batch.num_tokens} tokens{times}, then {len(steps) - 1} decode steps, "
            f"through {len(layer_ids)} layers")


def checked_layers(spec: JobSpec, layer_ids: list[int]) -> list[int]:
    return {"all": layer_ids, "first": layer_ids[:1], "none": []}[spec.check_layers]


def reference_outputs(ckpt: Path, layer_ids: list[int], steps: list[Step], dtype: torch.dtype = torch.float32
                      ) -> dict[int, list[torch.Tensor]]:
    """The unsharded layers computed in fp32 with the torch kernels on the CPU, over the same steps,
    from the weights a run in `dtype` holds (rounded to `dtype`, then widened): the error then
    measures the run's arithmetic, not the rounding of its checkpoint."""
    from ..layer import GDNLayer
    from ..loader.presharded import presharded_tp
    from ..parallel import gather_full
    from ..workload import run_steps

    # a pre-sharded checkpoint holds no unsharded tensor: read every rank's file and join them
    tp = presharded_tp(ckpt) or 1
    held = [load_layers(ckpt, dtype=dtype, device="cpu", layer_ids=layer_ids, backend="torch", tp_rank=r, tp_size=tp)
            for r in range(tp)]
    cfg = GDNConfig.from_pretrained(ckpt)
    layers = {i: GDNLayer.from_full(cfg, i, {n: t.float() for n, t in gather_full([h[i] for h in held]).items()},
                                    backend="torch")
              for i in layer_ids}
    num_slots = max(s for st in steps for s in st.batch.slots) + 1
    cache = StateCache(cfg, layer_ids, num_slots, tp_size=1)
    return run_steps(layers, cache, steps, device="cpu")


def compare(outputs: dict[int, list[torch.Tensor]], reference: dict[int, list[torch.Tensor]]) -> dict:
    worst_rel, worst_abs = 0.0, 0.0
    for i, ref in reference.items():
        for got, want in zip(outputs[i], ref):
            got, want = got.double().cpu(), want.double()
            worst_rel = max(worst_rel, ((got - want).norm() / want.norm()).item())
            worst_abs = max(worst_abs, (got - want).abs().max().item())
    return dict(max_rel_err=worst_rel, max_abs_err=worst_abs)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def serve(forward, layer_ids: list[int], steps: list[Step], keep: list[int], barrier, step=None, put=None,
          first_repeats: int = 1) -> tuple[list, dict]:
    """Feed every step through every layer with `forward(layer_id, x, batch)`; return the wall
    time of each step and the outputs of the layers in `keep` (on the CPU). `step(x, batch)`, if
    given, may take a whole step instead: it returns {layer id: output} or None to decline.
    `put(x)`, if given, turns each step's x into what the layers take (their device and dtype)
    before the step's barrier, outside its time: a serving engine's layers find their input on
    the device, left there by the layer before. `first_repeats` > 1 runs the first step that
    many times, back to back (every rank the same count), so that its time is more than one
    sample; it must start every sequence fresh, so each repeat leaves the slots as one run does.
    The times then hold first_repeats + len(steps) - 1 entries, the outputs the last repeat's."""
    if first_repeats < 1:
        raise ValueError(f"first_repeats must be >= 1, got {first_repeats}")
    if first_repeats > 1 and any(steps[0].batch.has_state):
        raise ValueError("only a first step whose sequences all start fresh (has_state False) can be repeated")
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in keep}
    times = []
    for n, st in enumerate(itertools.chain([steps[0]] * first_repeats, steps[1:])):
        x = st.x if put is None else put(st.x)
        barrier()
        t = time.perf_counter()
        ys = step(x, st.batch) if step is not None else None
        kept = n >= first_repeats - 1       # the first step's earlier repeats keep nothing
        if ys is None:
            for i in layer_ids:
                y = forward(i, x, st.batch)
                if i in outputs and kept:
                    outputs[i].append(y)
        elif kept:
            for i in outputs:
                outputs[i].append(ys[i])
        barrier()
        times.append(time.perf_counter() - t)
    return times, {i: [y.cpu() for y in ys] for i, ys in outputs.items()}


def is_decode_step(batch) -> bool:
    """Whether every sequence of `batch` is one token continuing from its slot (what a decode
    graph replays)."""
    return all(n == 1 for n in batch.seq_lens) and all(batch.has_state)


def to_layer_input(x: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """x on `device` in `dtype`, cast there. torch casts a copy from the CPU to a GPU that also
    changes the dtype on the CPU, on its intra-op thread pool. The local job at tp=2 on a host of
    2 H200s (32 cores), with that cast inside every layer's call, timed its prefill step (398
    tokens, 4 layers) at 47.5 and 52.5 ms; with OMP_NUM_THREADS=1 (a pool of one) at 6.0; with x
    put on the device by this, once per step and outside the timing, at 1.5-3.0. A 16,698-token
    step: 114.2 ms against 6.4 (benchmarks/results/job_input_h200x2_s36b_summary.log)."""
    return x.to(device).to(dtype)


def graphed_decode_step(decoder, keep: list[int]):
    """A `serve` step that replays decode-only steps (is_decode_step) from `decoder` (a
    GraphedDecoder over all the job's layers; x comes on its device, in its dtype) and declines
    the rest. The kept outputs are copied, since the graph overwrites its buffers on the next
    replay."""
    def step(x, batch):
        if not is_decode_step(batch):
            return None
        ys = decoder(x, list(batch.slots))
        return {i: ys[i].clone() for i in keep}
    return step


def summarize(spec: JobSpec, ckpt: Path, steps: list[Step], times: list[float], outputs: dict, ranks: list) -> dict:
    """Throughput, error against the unsharded fp32 layer, and per-rank facts, for the table.
    `times` as serve returns them with first_repeats=spec.prefill_repeats: the prefill rate is
    the median of those repeats'."""
    prefill_tokens = steps[0].batch.num_tokens
    decode_tokens = sum(st.batch.num_tokens for st in steps[1:])
    prefill, decode = times[:spec.prefill_repeats], times[spec.prefill_repeats:]
    summary = dict(spec=asdict(spec), checkpoint=str(ckpt), ranks=ranks, prefill_tokens=prefill_tokens,
                   prefill_tok_s=prefill_tokens / statistics.median(prefill),
                   prefill_ms=[1e3 * t for t in prefill],
                   decode_tok_s=decode_tokens / max(sum(decode), 1e-12),
                   decode_step_ms=1e3 * sum(decode) / max(len(decode), 1))
    if outputs:
        check = list(outputs)
        progress(f"checking layers {check} against the unsharded fp32 layers on the CPU")
        ref = reference_outputs(ckpt, check, steps, DTYPES[spec.dtype])
        summary.update(compare(outputs, ref), checked_layers=check)
    if spec.save_outputs:
        torch.save(dict(outputs=outputs, steps=len(steps)), spec.save_outputs)
    return summary


def run_rank(spec: JobSpec) -> dict | None:
    """This rank's part of the job (inside an initialised process group, or alone for tp=1);
    rank 0 returns the summary."""
    rank, world = get_rank(), get_world_size()
    if world != spec.tp:
        raise ValueError(f"the job asks for tp={spec.tp} but {world} ranks are running")
    device = local_device() if spec.device == "cuda" else torch.device("cpu")
    ckpt = Path(spec.checkpoint) if spec.checkpoint else default_checkpoint(spec.device)
    dtype = DTYPES[spec.dtype]
    cfg = GDNConfig.from_pretrained(ckpt)
    progress(f"loading {ckpt} over {world} rank{'s' if world > 1 else ''} ({spec.device}, {spec.dtype})")
    t0 = time.perf_counter()
    layers = load_layers(ckpt, dtype=dtype, device=device, layer_ids=spec.layers, backend=spec.backend)
    load_s = time.perf_counter() - t0
    ids = list(layers)
    steps = serving_workload(cfg.hidden_size, spec.seqs, spec.prompt_len, spec.decode_steps, spec.seed)

    def forward_on(cache):
        return lambda i, x, batch: layers[i](x, batch, cache)

    def put(x):
        return to_layer_input(x, device, dtype)

    def new_cache():
        return StateCache(cfg, ids, spec.seqs, dtype=dtype, device=device)

    # warm-up on a scratch cache: compiles kernels and fills allocator pools outside the timing
    progress(warm_up_message(device.type))
    serve(forward_on(new_cache()), ids, steps[:2], [], lambda: sync(device), put=put)
    cache, keep, step = new_cache(), checked_layers(spec, ids), None
    graphs = spec.decode_graphs
    if graphs and (device.type != "cuda" or layers[ids[0]].backend != "triton"):
        raise ValueError("decode_graphs needs CUDA devices and the triton backend")
    if graphs:
        from ..graphs import GraphedDecoder
        decoder = GraphedDecoder(layers, cache)
        progress(f"capturing the decode step of {spec.seqs} sequences in CUDA graphs")
        decoder.prepare(spec.seqs)       # captured here, outside the timing
        step = graphed_decode_step(decoder, keep)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress(serving_message(steps, ids, spec.prefill_repeats))
    times, outputs = serve(forward_on(cache), ids, steps, keep, lambda: sync(device), step, put,
                           first_repeats=spec.prefill_repeats)
    info = dict(rank=rank, device=str(device), backend=layers[ids[0]].backend, layers=len(ids), load_s=load_s,
                peak_memory_bytes=peak_memory_bytes(device), decode_graphs=graphs)
    ranks = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(ranks, info)
    else:
        ranks = [info]
    summary = summarize(spec, ckpt, steps, times, outputs, ranks) if rank == 0 else None
    sync(device)
    return summary


def format_summary(s: dict) -> str:
    spec = s["spec"]
    lines = [
        f"tp_gdn main job: {s['checkpoint']}",
        f"  tp={spec['tp']} device={s['ranks'][0]['device'].split(':')[0]} backend={s['ranks'][0]['backend']} "
        f"dtype={spec['dtype']} layers={s['ranks'][0]['layers']} sequences={spec['seqs']} "
        f"prompt~{spec['prompt_len']} decode_steps={spec['decode_steps']}"
        f"{' (CUDA graphs)' if s['ranks'][0].get('decode_graphs') else ''}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| prefill ({s['prefill_tokens']} tokens, all layers) | {s['prefill_tok_s']:,.0f} tokens/s "
        f"({prefill_note(s['prefill_ms'])}) |",
        f"| decode ({spec['seqs']} sequences, all layers) | {s['decode_tok_s']:,.0f} tokens/s "
        f"({s['decode_step_ms']:.2f} ms/step) |",
    ]
    if "max_rel_err" in s:
        lines.append(f"| max error vs unsharded fp32 layer, same weights (layers {s['checked_layers']}) | "
                     f"rel {s['max_rel_err']:.2e}, abs {s['max_abs_err']:.2e} |")
    else:
        lines.append("| max error vs unsharded fp32 layer | not checked |")
    for r in s["ranks"]:
        lines.append(f"| rank {r['rank']} ({r['device']}) peak memory, load time | "
                     f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB, {r['load_s']:.2f} s |")
    if "ray_overhead_ms" in s:
        how = "compiled graph" if s.get("ray_compiled_graph") else "actor calls"
        decode = s.get("ray_decode_overhead_ms", float("nan"))
        lines.append(f"| Ray per-call overhead ({how}; driver latency - actor compute), mean | "
                     f"{s['ray_overhead_ms']:.2f} ms (decode steps {decode:.2f}) |")
    return "\n".join(lines)


def prefill_note(ms: list[float]) -> str:
    """How the prefill rate was formed, for the table: one step's time, or the median of several
    and their range."""
    if len(ms) == 1:
        return f"one step, {ms[0]:.2f} ms"
    return f"median of {len(ms)} steps, {statistics.median(ms):.2f} ms; {min(ms):.2f}-{max(ms):.2f}"


def add_job_args(ap: argparse.ArgumentParser) -> None:
    d = JobSpec()
    ap.add_argument("--checkpoint", default=None,
                    help="HF checkpoint or `tp-gdn shard` output (default: a generated one, written once to "
                         "~/.cache/tp_gdn: tiny on the CPU, 4 layers of Qwen3-Next-80B GDN dims on GPUs)")
    ap.add_argument("--tp", type=int, default=None,
                    help="tensor-parallel size (default: every visible GPU, or 2 ranks on the CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="cpu: gloo and torch kernels; cuda: nccl and Triton kernels (default: cuda if visible "
                         "here; under --launcher ray, cuda puts the ranks on the cluster's GPUs even from a "
                         "machine without any)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="weights and activations (default: float32 on the CPU, bfloat16 on GPUs)")
    ap.add_argument("--backend", choices=["auto", "torch", "triton"], default=d.backend,
                    help="kernels: auto picks triton on CUDA, torch on the CPU")
    ap.add_argument("--seqs", type=int, default=d.seqs, help="sequences served at once (one slot each)")
    ap.add_argument("--prompt-len", type=int, default=d.prompt_len,
                    help="average prompt length; lengths spread +-50%% around it")
    ap.add_argument("--decode-steps", type=int, default=d.decode_steps, help="decode steps after the prefill")
    ap.add_argument("--prefill-repeats", type=int, default=d.prefill_repeats,
                    help="time the prefill step this many times, back to back, and report the median (every "
                         "repeat starts the sequences fresh, so the decode steps see the states one run leaves)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the workload's random inputs")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="GDN layer indices to run (default: all)")
    ap.add_argument("--check-layers", choices=["all", "first", "none"], default=d.check_layers,
                    help="which layers to compare with the unsharded fp32 layer on the CPU")
    ap.add_argument("--save-outputs", default=None, help="rank 0 saves the checked layers' outputs here")
    ap.add_argument("--decode-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="replay the decode steps from CUDA graphs (tp_gdn.graphs.GraphedDecoder, in each rank), "
                         "captured before the timing (default: on with GPUs and the triton backend, under every "
                         "launcher; off on the CPU)")
    ap.add_argument("--json", default=None, help="write the summary as JSON here")


def spec_from_args(args) -> JobSpec:
    """The job the command line asks for; ValueError names an option that cannot be taken. Under
    `--launcher ray` (`args.launcher`), --device cuda needs no GPU here: the ranks are actors
    placed on the cluster's GPUs, and a driver on a CPU-only head node is the usual case."""
    cuda = torch.cuda.is_available()
    on_ray = getattr(args, "launcher", None) == "ray"
    device = args.device or ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        if not on_ray:
            raise ValueError("--device cuda: no CUDA device is visible")
        if args.tp is None:
            raise ValueError("--device cuda with --launcher ray on a machine without GPUs: give --tp (the ranks "
                             "take the cluster's GPUs, which this machine cannot count)")
    tp = args.tp if args.tp is not None else (torch.cuda.device_count() if device == "cuda" else 2)
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    graphs_ok = device == "cuda" and args.backend != "torch"
    if args.decode_graphs and not graphs_ok:
        raise ValueError("--decode-graphs needs --device cuda and the triton backend")
    decode_graphs = graphs_ok if args.decode_graphs is None else args.decode_graphs
    if args.seqs < 1 or args.prompt_len < 1 or args.decode_steps < 0:
        raise ValueError("--seqs and --prompt-len must be >= 1 and --decode-steps >= 0")
    if args.prefill_repeats < 1:
        raise ValueError(f"--prefill-repeats must be >= 1, got {args.prefill_repeats}")
    return JobSpec(checkpoint=args.checkpoint, tp=tp, device=device,
                   dtype=args.dtype or ("bfloat16" if device == "cuda" else "float32"), backend=args.backend,
                   seqs=args.seqs, prompt_len=args.prompt_len, decode_steps=args.decode_steps, seed=args.seed,
                   layers=args.layers, check_layers=args.check_layers, save_outputs=args.save_outputs,
                   decode_graphs=decode_graphs, prefill_repeats=args.prefill_repeats)


def finish(summary: dict, json_path: str | None) -> None:
    print(format_summary(summary), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1, default=str) + "\n")


def main(argv=None) -> None:
    """Entry point under torchrun: every rank runs this, rank 0 prints the table."""
    ap = argparse.ArgumentParser(prog="python -m tp_gdn.launch.job",
                                 description="the tp_gdn main job, one process per rank (start it with torchrun)")
    add_job_args(ap)
    args = ap.parse_args(argv)
    init_distributed()
    try:
        if args.tp is not None and args.tp != get_world_size():
            raise ValueError(f"--tp {args.tp} but torchrun started {get_world_size()} ranks")
        args.tp = get_world_size()
        spec = spec_from_args(args)
        check_spec(spec)
    except (ValueError, FileNotFoundError) as e:      # CheckpointError is a ValueError
        destroy_distributed()
        raise SystemExit(f"tp_gdn job: error: {e}") from None
    try:
        out = run_rank(spec)
        if out is not None:
            finish(out, args.json)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
