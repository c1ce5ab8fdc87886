"""Settings of the graphed decode step side by side: each setting captured in its own graph on the
same layer weights and state cache, timed in interleaved rounds (single replays and back to back),
after a check that every setting gives the same bits as the first (where one does not, it prints
how far it is off).

    torchrun --standalone --nproc-per-node N benchmarks/decode_ab.py [--batch B] [--rounds R]
        [--settings NAME ...]

Settings (`SETTINGS`): `main` (the defaults), `apart` (at one token, the out_proj product does not
push the flag-in-word all-reduce's words itself: triton_gemv.PUSH_WORDS off), `norm-apart` (at one
token, the gated norm runs as its own kernel, not inside the out_proj product:
triton_gemv.NORM_IN_PRODUCT off), then each all-reduce the decode step can take at tp=2 and up:
`ll` and `push` (our flag-in-word and push kernels, for every size, TP_GDN_SYMM_KERNEL; the
default takes ll up to comm.LL_MAX_BYTES, push above), `oneshot` (torch's one-shot kernel),
`nccl` (TP_GDN_ALL_REDUCE=nccl). Each applies while its layer is built and its graph captured.
Qwen3-Next-80B dims, bf16, as bench_layer.py. Every rank runs the same fixed number of calls; rank
0 prints the medians over the rounds of each setting's median single replay and its back-to-back
time per step, in us.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from bench_layer import CFG, environ, full_weights, patched  # noqa: E402
from timing import back_to_back, timeit  # noqa: E402

from tp_gdn import Batch, GDNLayer, StateCache  # noqa: E402
from tp_gdn.graphs import GraphedDecoder  # noqa: E402
from tp_gdn.kernels import triton_gemv  # noqa: E402
from tp_gdn.parallel import destroy_distributed, get_rank, get_world_size, init_distributed, local_device  # noqa: E402

# name -> (the environment while its layer is built and its graph captured, triton_gemv's
# attributes while its graph is captured)
SETTINGS = {
    "main": ({}, {}),
    "apart": ({}, {"PUSH_WORDS": False}),
    "norm-apart": ({}, {"NORM_IN_PRODUCT": False}),
    "ll": ({"TP_GDN_SYMM_KERNEL": "ll"}, {}),
    "push": ({"TP_GDN_SYMM_KERNEL": "push"}, {}),
    "oneshot": ({"TP_GDN_SYMM_KERNEL": "oneshot"}, {}),
    "nccl": ({"TP_GDN_ALL_REDUCE": "nccl"}, {}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="sequences a step (default 1)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50, help="calls a timing (single and back to back)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.iters < 1:
        ap.error("--batch, --rounds and --iters take 1 or more")
    init_distributed()
    dev = local_device()
    if dev.type != "cuda":
        raise SystemExit("decode_ab.py needs CUDA GPUs (run it under torchrun, one process per GPU)")
    torch.cuda.set_device(dev)
    compare(args, dev)
    # the graphs (and the NCCL and symmetric-memory work captured in them) are gone before the
    # group goes: with them still held, a run with the nccl and oneshot settings hung in teardown
    gc.collect()
    torch.cuda.synchronize()
    destroy_distributed()


def compare(args, dev):
    rank, tp = get_rank(), get_world_size()
    B, H, bf = args.batch, CFG.hidden_size, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    full = full_weights()
    cache = StateCache(CFG, [0], B, dtype=bf, device=dev, tp_size=tp)
    slots = list(range(B))
    steps = {}
    for name in args.settings:
        env, attrs = SETTINGS[name]
        with environ(env), patched(triton_gemv, **attrs):
            layer = GDNLayer.from_full(CFG, 0, full, rank, tp, dtype=bf, device=dev, backend="triton")
            if not steps:      # a prompt fills the state once
                layer(torch.randn(16 * B, H, device=dev, dtype=bf, generator=g), Batch([16] * B, slots, [False] * B),
                      cache)
            decoder = GraphedDecoder({0: layer}, cache)
            x = decoder.input_buffer(B)        # captured here
        steps[name] = (decoder, x)
    # the same bits: each setting runs three steps from the same state on the same inputs
    xs = [torch.randn(B, H, device=dev, dtype=bf, generator=g) for _ in range(3)]
    saved = [t.clone() for t in (cache.conv[0], cache.ssm[0])]
    outs = {}
    for name, (decoder, x) in steps.items():
        cache.conv[0].copy_(saved[0])
        cache.ssm[0].copy_(saved[1])
        ys = []
        for xi in xs:
            x.copy_(xi)
            ys.append(decoder(x, slots)[0].clone())
        outs[name] = (ys, cache.ssm[0].clone(), cache.conv[0].clone())
    first = args.settings[0]
    for name, (ys, ssm, conv) in outs.items():
        same = all(torch.equal(a, b) for a, b in zip(ys, outs[first][0])) and torch.equal(ssm, outs[first][1]) \
            and torch.equal(conv, outs[first][2])
        if rank == 0:
            print(f"{name}: outputs and state {'bit-equal to' if same else 'DIFFER from'} {first}'s", flush=True)
        if rank == 0 and not same:
            worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(ys, outs[first][0]))
            scale = max(b.float().abs().max().item() for b in outs[first][0])
            print(f"  largest output difference {worst:.3g} (largest output {scale:.3g}); state "
                  f"{(ssm - outs[first][1]).abs().max().item():.3g}, conv state "
                  f"{(conv.float() - outs[first][2].float()).abs().max().item():.3g}", flush=True)
    times = {name: ([], []) for name in steps}
    for _ in range(args.rounds):
        for name, (decoder, x) in steps.items():
            times[name][0].append(timeit(lambda: decoder(x, slots), args.iters) * 1e3)
            times[name][1].append(back_to_back(lambda: decoder(x, slots), args.iters) * 1e3)
    if rank == 0:
        card = torch.cuda.get_device_name(dev)
        print(f"\ndecode {B} seq(s), tp={tp}, {card} x{tp}, {args.rounds} interleaved rounds of {args.iters} calls "
              f"(us: median over rounds; each round's single figure a median of its calls)")
        print("| setting | single | back to back | single, each round |")
        print("|---|---|---|---|")
        for name, (single, b2b) in times.items():
            print(f"| {name} | {statistics.median(single):.2f} | {statistics.median(b2b):.2f} | "
                  f"{' '.join(f'{t:.1f}' for t in single)} |", flush=True)


if __name__ == "__main__":
    main()
