"""The `tp-gdn` command.

  tp-gdn run               the main job (default: a generated checkpoint; 2 CPU ranks, or every GPU)
  tp-gdn shard CKPT ...    write a pre-sharded copy of an HF checkpoint for one tp size
  tp-gdn make-checkpoint   write a random GDN-only HF checkpoint (tiny, or real Qwen dims)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace

from .launch.job import add_job_args, finish, spec_from_args
from .loader.synthetic import PRESETS


def torchrun_command(spec, json_path: str | None) -> list[str]:
    """The torchrun command line that runs `spec` on one node: python -m torch.distributed.run
    ... -m tp_gdn.launch.job with every field of the spec as an option."""
    job = [f"--tp={spec.tp}", f"--device={spec.device}", f"--dtype={spec.dtype}", f"--backend={spec.backend}",
           f"--seqs={spec.seqs}", f"--prompt-len={spec.prompt_len}", f"--decode-steps={spec.decode_steps}",
           f"--seed={spec.seed}", f"--check-layers={spec.check_layers}", f"--prefill-repeats={spec.prefill_repeats}"]
    for flag, value in (("--checkpoint", spec.checkpoint), ("--save-outputs", spec.save_outputs), ("--json", json_path)):
        if value:
            job.append(f"{flag}={value}")
    if spec.layers:
        job += ["--layers", *map(str, spec.layers)]
    job.append("--decode-graphs" if spec.decode_graphs else "--no-decode-graphs")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec.tp}",
            "-m", "tp_gdn.launch.job", *job]


def cmd_run(args) -> int:
    from .launch.job import check_spec, default_checkpoint, progress

    spec = spec_from_args(args)
    if args.launcher != "ray":
        given = [flag for flag, on in (("--ray-address", args.ray_address is not None),
                                       ("--[no-]ray-compiled-graph", args.ray_compiled_graph is not None)) if on]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to --launcher ray")
    if args.launcher == "ray" and args.device is None and spec.device == "cpu":
        # the default device is this machine's; say so, as the cluster may have GPUs that it does not
        progress("no GPU is visible on this machine, so the Ray ranks run on CPUs; --device cuda "
                 "places them on the cluster's GPUs")
    # refuse a backend the device cannot run, or a bad checkpoint, tp or layer list, before any rank starts
    check_spec(replace(spec, checkpoint=spec.checkpoint or str(default_checkpoint(spec.device))))
    if args.launcher == "torchrun":
        return subprocess.call(torchrun_command(spec, args.json))
    if args.launcher == "ray":
        from .launch.ray_executor import run_job
        summary = run_job(spec, address=args.ray_address, compiled_graph=args.ray_compiled_graph)
    else:
        from .launch.job import run_rank
        from .launch.local import spawn_ranks
        backend = "nccl" if spec.device == "cuda" else "gloo"
        summary = spawn_ranks(spec.tp, run_rank, spec, backend=backend)[0]
    finish(summary, args.json)
    return 0


def cmd_shard(args) -> int:
    from .loader.presharded import write_presharded
    out = write_presharded(args.checkpoint, args.out, args.tp, progress=None if sys.stderr.isatty() else False)
    print(f"wrote {out} for tp={args.tp}")
    return 0


def cmd_make_checkpoint(args) -> int:
    from .loader.synthetic import write_checkpoint

    def progress(n, total):
        if sys.stderr.isatty():
            print(f"\r  layer {n}/{total}", end="" if n < total else "\n", file=sys.stderr, flush=True)

    out = write_checkpoint(args.out, args.preset, args.gdn_layers, dtype=args.dtype, seed=args.seed, progress=progress)
    print(f"wrote {out}")
    return 0


ENVIRONMENT = """\
environment (the README says more):
  TP_GDN_ALL_REDUCE=auto|nccl|symm
                        the output projection's all-reduce on GPUs of one host.
                        auto (default): symmetric memory for small outputs, copy
                        engines for large ones formed in row chunks, NCCL for the
                        rest; nccl: NCCL always; symm: as auto, and an error
                        where it cannot apply
  TP_GDN_SYMM_KERNEL=auto|ll|push|oneshot
                        the symmetric-memory kernel (default auto: ll for the
                        smallest all-reduces, push above)
  TP_GDN_COLLECTIVE_TIMEOUT=SECONDS
                        how long a GPU may wait on a peer in those all-reduces
                        before the watchdog ends the process with exit code 3
                        (default 600; 0: no watchdog)
  TP_GDN_FAST_LAUNCH=0  every Triton launch through Triton's own path
  TP_GDN_GEMM=tuned|cublas
                        tuned (default): products of 2048 rows or more on GPUs
                        through the cuBLASLt algorithm that timing picks at a
                        shape's first call, where it beats torch's call;
                        cublas: torch's call always
  TP_GDN_CACHE=DIR      where the embedded default checkpoint is generated
                        (default ~/.cache/tp_gdn)
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tp-gdn", description="Tensor-parallel Gated DeltaNet runtime.")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: load, serve prefills then decodes, check, report",
                         description="Load a checkpoint sharded over --tp ranks, serve packed prefills then\n"
                                     "decode steps through every GDN layer, compare with the unsharded fp32\n"
                                     "layer, and print throughput, error and per-rank memory.",
                         epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(run)
    run.add_argument("--launcher", choices=["local", "torchrun", "ray"], default="local",
                     help="local: spawned processes on this machine (default); torchrun: torch.distributed.run "
                          "--standalone on this machine (for several nodes, start launch/torchrun_job.py with "
                          "torchrun yourself); ray: one actor per rank on a Ray cluster")
    run.add_argument("--ray-address", default=None,
                     help="Ray cluster to join ('auto' for the running one); default: start a local one")
    run.add_argument("--ray-compiled-graph", action=argparse.BooleanOptionalAction, default=None,
                     help="send each call to the Ray actors through a Ray compiled graph, or as plain actor calls "
                          "(default: the graph on GPU ranks, plain calls on CPU ranks, where an idle actor "
                          "polling the graph's channel would take a core from the others)")
    run.set_defaults(fn=cmd_run)

    shard = sub.add_parser("shard", help="write a pre-sharded copy of an HF checkpoint for one tp size",
                           description="Cut an HF checkpoint into one safetensors file per rank plus a manifest "
                                       "(tp, layout, source config, sha256 per file); load_layers reads it directly.")
    shard.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
    shard.add_argument("--tp", type=int, required=True, help="tensor-parallel size to shard for")
    shard.add_argument("--out", required=True, help="output directory (new, or empty)")
    shard.set_defaults(fn=cmd_shard)

    mk = sub.add_parser("make-checkpoint", help="write a random GDN-only HF checkpoint",
                        description="Write config.json, an index and several safetensors files with random "
                                    "GDN weights (only the linear-attention layers' tensors).")
    mk.add_argument("out", help="output directory (new, or empty)")
    mk.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="tiny, qwen3-next-80b (the 80B-A3B GDN dims) or qwen3.5 (split layout); default: tiny")
    mk.add_argument("--gdn-layers", type=int, default=None, help="number of GDN layers (default: the preset's)")
    mk.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the weight matrices (default: bfloat16)")
    mk.add_argument("--seed", type=int, default=0, help="random seed")
    mk.set_defaults(fn=cmd_make_checkpoint)
    return ap


def main(argv=None) -> int:
    from .loader import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"tp-gdn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
