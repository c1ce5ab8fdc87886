"""Registers, spills and shared memory of the layer's Triton kernels, compiled for Hopper (sm_90a)
on any machine, with or without a GPU; no kernel runs.

    python benchmarks/kernel_resources.py [--heads NK/NV ...] [--seqs NxL ...] [--core] [--sass DIR] [--ops]
    python benchmarks/kernel_resources.py --all-reduce WORLD ... [--sass DIR] [--ops]

The layer's mixer (`triton_ops.gdn_mix_norm`, or with --core `gdn_prefill` on raw q/k as
bench_kernels.py times it) is called on CPU tensors of the real shapes (dk = dv = 128, K = 4) with
every kernel swapped for a stand-in. The stand-in binds the arguments the way Triton's launcher
does for a GPU, with the same constexprs, the same specialisation of 16-divisible integers and
16-byte-aligned pointers, and the kernel's launch settings. It compiles the kernel for sm_90a and
runs ptxas -v over the PTX instead of launching it. --all-reduce compiles the decode all-reduce's
kernels instead (kernels/triton_allreduce.py: push and flag-in-word, and the few-row product that
pushes the flag-in-word words itself, also forming the gated norm as it reads o, with and without
the push; bf16 and fp32, as ranks 0 and 1 of groups of each size given: Triton specialises an
integer argument of 1).

Programs per SM come from 64 K registers (in 256-register units per warp) and 228 KB of shared
memory (1 KB reserved per program). The numbers are those of the Triton version imported here.
The GPU machines run Triton 3.6, so install it beside the local one:
`pip install --no-deps --target DIR triton==3.6.0` and run with `PYTHONPATH=DIR`. Other versions
compile differently: Triton 3.9 gave the fused pass at BV128 2,020 B of spill stores, where
Triton 3.6 gives 260 B.

--ops also prints each kernel's machine instructions by kind (all paths and branches counted once,
not weighted by how often they run): the FP32 arithmetic, MUFU (exp, reciprocal), conversions,
global and shared-memory traffic, barriers, tensor-core ops and local memory traffic (spills, and
the stack frame ptxas may use without reporting spills: the solve at small shapes). A kernel
whose SM throughput is high while its memory is not (Nsight Compute) shows here what it issues:
the sixteenth session's conv held 2,840 instructions on its two paths together, for 32 outputs a
thread each.

--sass DIR also writes each compiled kernel's machine code (cuobjdump -sass, line numbers left
out) to DIR. Two runs, before and after a change, then show whether the change alters the code a
GPU would run.

Checked against the driver on an H200 (Triton 3.6, benchmarks/results/exp_occupancy_h200_s6.log).
Shared memory was equal for the fused pass at BV 64 and 128, on 1 and 2 stages. Spill bytes were
within 10% of the driver's local memory size (its "spills" x 4).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tp_gdn import Batch  # noqa: E402
from tp_gdn.kernels import (triton_allreduce, triton_chunk, triton_conv, triton_decode, triton_gemv,  # noqa: E402
                            triton_norm, triton_ops)
from tp_gdn.kernels.triton_common import programs_per_sm  # noqa: E402

DK = DV = 128
CONV_K = 4
KERNEL_MODULES = (triton_chunk, triton_conv, triton_decode, triton_norm, triton_allreduce, triton_gemv)


def _ptxas() -> str:
    """The ptxas that Triton bundles for this PTX (ptxas-blackwell takes the newer PTX versions)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise SystemExit(f"no ptxas in {bin_dir}: this Triton build cannot compile for NVIDIA GPUs here")


def compile_for_hopper(fn, args, kwargs, sass_path: Path | None = None, ops: bool = False) -> dict:
    """Bind (args, kwargs) as Triton's launcher would, compile for sm_90a and read ptxas -v;
    with sass_path, write the compiled kernel's machine code there; with ops, count its
    instructions by kind (row["ops"], sass_ops)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    text = log.stderr + log.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if log.returncode or not regs or not spills:
        raise RuntimeError(f"ptxas failed on {fn.__name__}: {text[-500:]}")
    sass = _sass(compiled.asm["cubin"]) if sass_path is not None or ops else None
    if sass_path is not None:
        sass_path.write_text(sass)
    warps = options.num_warps
    shared = compiled.metadata.shared
    r = int(regs.group(1))
    return dict(kernel=fn.__name__, warps=warps, stages=options.num_stages, regs=r,
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)), shared=shared,
                per_sm=programs_per_sm(r, warps, shared), ops=sass_ops(sass) if ops else None,
                constexprs={k: kwargs[k] for k in ("BV", "NORM_QK", "GATED_NORM") if k in kwargs})


# --ops: instruction kinds, each a set of SASS opcodes (the part before the first dot)
OP_KINDS = {
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"),
    "mufu": ("MUFU",),
    "convert": ("F2F", "F2FP", "F2I", "I2F", "PRMT"),
    "int": ("IMAD", "IADD3", "LEA", "SHF", "LOP3", "ISETP", "IABS", "VIADD", "SEL", "SGXT"),
    "ldg": ("LDG",), "stg": ("STG",),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "bar": ("BAR",), "shfl": ("SHFL",),
    "mma": ("HGMMA", "HMMA", "WARPGROUP"),
    "local": ("LDL", "STL"),
}
_KIND_OF = {op: kind for kind, ops in OP_KINDS.items() for op in ops}


def sass_ops(sass: str) -> dict[str, int]:
    """{kind: instructions} of a kernel's machine code (cuobjdump -sass text), plus "all"; a
    predicate (@P0, @!P1) before an opcode is skipped."""
    counts = dict.fromkeys(OP_KINDS, 0)
    total = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not m:
            continue
        total += 1
        kind = _KIND_OF.get(m.group(1))
        if kind is not None:
            counts[kind] += 1
    counts["all"] = total
    return counts


def _sass(cubin: bytes) -> str:
    """The machine code of a cubin, without the lines that only say where it came from."""
    cuobjdump = Path(_ptxas()).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return "".join(line + "\n" for line in out.splitlines() if line.strip() and not line.lstrip().startswith("//##"))


class Recorder:
    """What the stand-ins record into: the rows of the current workload, and where its machine
    code goes (None: nowhere)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.sass_dir: Path | None = None
        self.ops = False


class _StandIn:
    """Takes a kernel's place: kernel[grid](...) compiles it and records its resources and grid."""

    def __init__(self, fn, rec: Recorder):
        self.fn, self.rec = fn, rec

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = self.rec
            sass = None if rec.sass_dir is None else rec.sass_dir / f"{len(rec.rows):02d}{self.fn.__name__}.sass"
            row = compile_for_hopper(self.fn, args, kwargs, sass, ops=rec.ops)
            row["programs"] = math.prod(grid)
            rec.rows.append(row)
        return launch


def swap_kernels(rec: Recorder) -> list:
    """Swap every launched kernel of the kernel modules for a stand-in; returns the undo list."""
    undo = []
    for mod in KERNEL_MODULES:
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.JITFunction):
                undo.append((mod, name, obj))
                setattr(mod, name, _StandIn(obj, rec))
    if not undo:
        raise RuntimeError("found no compiled Triton kernel to stand in for")
    # the split path's one-launch form, as an H200 takes it (its checks need a GPU: the SM count,
    # and the compiled kernel's programs per SM, which the stand-in's row reports)
    for name in ("split_overlap_applies", "split_overlap_fits"):
        undo.append((triton_chunk, name, getattr(triton_chunk, name)))
        setattr(triton_chunk, name, lambda *args: True)
    return undo


def layer_call(nk: int, nv: int, seq_lens: list[int]) -> None:
    """The Triton mixer and gated norm of one rank's layer call (bf16, fp32 state), on CPU tensors."""
    T = sum(seq_lens)
    kd, vd = nk * DK, nv * DV
    bf = torch.bfloat16
    batch = Batch(seq_lens, list(range(len(seq_lens))), [True] * len(seq_lens))
    S = len(seq_lens)
    triton_ops.gdn_mix_norm(
        torch.empty(T, 2 * kd + 2 * vd + 2 * nv, dtype=bf), nk, nv, DK, DV,
        torch.empty(2 * kd + vd, CONV_K, dtype=bf), torch.empty(nv), torch.empty(nv),
        torch.empty(S, CONV_K - 1, 2 * kd + vd, dtype=bf), torch.empty(S, nv, DK, DV), batch,
        batch.meta("cpu"), torch.empty(DV), 1e-6, out_dtype=bf)


def core_call(nk: int, nv: int, seq_lens: list[int]) -> None:
    """gdn_prefill on raw bf16 q/k/v (l2norm and gating inside), as bench_kernels.py times it."""
    T = sum(seq_lens)
    bf = torch.bfloat16
    batch = Batch(seq_lens, list(range(len(seq_lens))), [True] * len(seq_lens))
    triton_ops.gdn_prefill(torch.empty(T, nk, DK, dtype=bf), torch.empty(T, nk, DK, dtype=bf),
                           torch.empty(T, nv, DV, dtype=bf), torch.empty(T, nv, dtype=bf),
                           torch.empty(T, nv, dtype=bf), torch.empty(nv), torch.empty(nv),
                           torch.empty(len(seq_lens), nv, DK, DV), batch)


def all_reduce_calls(world: int) -> None:
    """The decode all-reduce's kernels of a group of `world` ranks as ranks 0 and 1 launch them
    (push and flag-in-word, and the one-row out_proj product that pushes the flag-in-word words
    itself; bf16 and fp32; a [1, 2048] output), on CPU tensors: the kernels only read their
    buffers' addresses."""
    region = 1 << 20
    for dtype in (torch.bfloat16, torch.float32):
        for rank in (0, 1):
            send, out = torch.empty(2048, dtype=dtype), torch.empty(2048, dtype=dtype)
            ptrs, epochs = torch.empty(world, dtype=torch.int64), torch.empty(64, dtype=torch.int64)
            triton_allreduce.push_all_reduce(send, out, ptrs, ptrs, epochs, rank, region // dtype.itemsize, progress=8)
            slot_words = region // triton_allreduce.WORD_BYTES
            triton_allreduce.ll_all_reduce(send, out, ptrs, epochs, rank, slot_words, progress=8)
            push = (ptrs, epochs, rank, slot_words, triton_allreduce.BLOCK_BYTES // dtype.itemsize)
            x, w = torch.empty(1, 2048, dtype=dtype), torch.empty(2048, 2048, dtype=dtype)
            triton_gemv.gemv(x, w, send.view(1, -1), push=push)
            # the same product forming the gated norm of the mixer's o and shifting the q|k conv
            # state (a decode step of one token at 8/16 local heads, tp=2 of 80B); and (rank 0)
            # without the push at 16/32 local heads (tp=1), which takes other pieces of W
            triton_gemv.gemv(x, w, send.view(1, -1), push=push, norm=product_norm(dtype, 8, 16))
            if rank == 0:
                triton_gemv.gemv(torch.empty(1, 4096, dtype=dtype), torch.empty(2048, 4096, dtype=dtype),
                                 send.view(1, -1), norm=product_norm(dtype, 16, 32))


def product_norm(dtype, nk: int, nv: int) -> tuple:
    """gemv's norm for a decode step of one token at nk/nv local heads, on CPU tensors."""
    kd, vd = nk * DK, nv * DV
    proj = torch.empty(1, 2 * kd + 2 * vd + 2 * nv, dtype=dtype)
    conv_pool = torch.empty(4, CONV_K - 1, 2 * kd + vd, dtype=dtype)
    meta = Batch([1], [2], [True]).meta("cpu")
    return triton_ops.product_norm(proj, nk, nv, DK, DV, conv_pool, meta, torch.empty(DV), 1e-6)


def parse_seqs(text: str) -> list[int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NxL, e.g. 8x4096 (N sequences of L tokens)")
    return [int(m.group(2))] * int(m.group(1))


def parse_heads(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) % int(m.group(1)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NK/NV with NV a multiple of NK, e.g. 16/32")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=parse_heads, nargs="+", default=[(16, 32), (8, 16), (4, 8)],
                    help="local key/value heads of one rank (default: 16/32 8/16 4/8, i.e. tp 1, 2, 4)")
    ap.add_argument("--seqs", type=parse_seqs, nargs="+", default=[[4096] * 8, [32768], [1] * 256],
                    help="sequences per call as NxL (default: 8x4096 1x32768 256x1)")
    ap.add_argument("--core", action="store_true",
                    help="compile gdn_prefill on raw q/k (as bench_kernels.py) instead of the layer's mixer")
    ap.add_argument("--ops", action="store_true",
                    help="also print each kernel's machine instructions by kind (static counts)")
    ap.add_argument("--all-reduce", type=int, nargs="+", default=None, metavar="WORLD",
                    help="compile the decode all-reduce's kernels for groups of these sizes instead")
    ap.add_argument("--sass", type=Path, default=None, metavar="DIR",
                    help="also write each compiled kernel's machine code here (one file per launch and workload)")
    args = ap.parse_args(argv)
    if args.all_reduce is not None and any(w < 2 for w in args.all_reduce):
        ap.error(f"--all-reduce takes group sizes of 2 or more, got {args.all_reduce}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources.py compiles the kernels for a GPU; unset TRITON_INTERPRET "
                         "(under it the kernels are interpreted functions, with nothing to compile)")
    print(f"Triton {triton.__version__}, sm_90a; the GPU machines run Triton 3.6", flush=True)
    rec = Recorder()
    rec.ops = args.ops
    undo = swap_kernels(rec)
    try:
        for world in args.all_reduce or []:
            rec.rows = []
            rec.sass_dir = None
            if args.sass is not None:
                rec.sass_dir = args.sass / f"all_reduce_{world}"
                rec.sass_dir.mkdir(parents=True, exist_ok=True)
            all_reduce_calls(world)
            print(f"== decode all-reduce, {world} ranks (bf16 rank 0, 1; fp32 rank 0, 1)", flush=True)
            print_rows(rec.rows)
        for nk, nv in args.heads if args.all_reduce is None else []:
            for lens in args.seqs:
                if args.core and max(lens) < 2:
                    print(f"== gdn_prefill, {nk}/{nv} heads, {len(lens)}x{lens[0]}: skipped (it takes sequences "
                          "longer than one token; the layer mixer covers decode)", flush=True)
                    continue
                rec.rows = []
                rec.sass_dir = None
                if args.sass is not None:
                    rec.sass_dir = args.sass / f"{nk}-{nv}_{len(lens)}x{lens[0]}{'_core' if args.core else ''}"
                    rec.sass_dir.mkdir(parents=True, exist_ok=True)
                (core_call if args.core else layer_call)(nk, nv, lens)
                what = "gdn_prefill" if args.core else "layer mixer"
                print(f"== {what}, {nk}/{nv} heads, {len(lens)}x{lens[0]}", flush=True)
                print_rows(rec.rows)
    finally:
        for mod, name, obj in undo:
            setattr(mod, name, obj)
    return rec.rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"  {r['kernel']:<26} {r['constexprs']!s:<48} {r['warps']:>2} warps {r['stages']} stages: "
              f"{r['regs']:>3} regs, spills {r['spill_stores']:>5} / {r['spill_loads']:>5} B, "
              f"shared {r['shared']:>6} B -> {r['per_sm']} per SM; {r['programs']} programs", flush=True)
        if r["ops"] is not None:
            print("    instructions: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()), flush=True)


if __name__ == "__main__":
    main()
