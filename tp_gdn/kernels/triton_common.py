"""Triton helpers that kernels of several modules inline, and the host side of every launch:
`launch` (a kernel launch without Triton's per-call binding once a specialisation is known) and
plain-integer `cdiv` / `next_pow2` (Triton's own run through its constexpr-function wrapper on
the host, a few microseconds each)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait
from triton.runtime.jit import JITFunction

try:
    from triton import knobs
    _INTERPRETED = knobs.runtime.interpret
except ImportError:         # Triton before 3.4 reads the variable itself
    knobs = None
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# whether kernels are compiled (and may run inline PTX) or interpreted (TRITON_INTERPRET=1), decided
# as triton.jit decides it, when this module is imported
_COMPILED = tl.constexpr(not _INTERPRETED)


@triton.jit
def sequence_of(seqs, cu_seqlens, slots, has_state, i_s):
    """Sequence n = seqs[i_s] of a launch: its tokens [bos, eos) of the packed batch, its state
    slot, and whether it continues from that slot (keep; else it starts from zero state)."""
    i_n = tl.load(seqs + i_s).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = tl.load(has_state + i_n) != 0
    return bos, eos, slot, keep


@triton.jit
def exp_ftz(x, FTZ: tl.constexpr):
    """exp(x) of an fp32 tensor. FTZ (compiled kernels only): one ex2.approx.ftz.f32 (a MUFU.EX2) of
    x log2(e), results below 2^-126 flushed to 0; tl.exp lowers to ex2.approx.f32 without ftz,
    which ptxas wraps in a fix-up for subnormal results (a compare, two multiplies and a select
    around each MUFU). Callers set FTZ for 16-bit inputs only: with fp32 inputs (exact fp32
    products on FMAs) the inline PTX made Triton 3.6 compile the split path's kernels for sm_90a
    in 785 s against 119 s. The interpreter runs no PTX and always takes tl.exp."""
    if FTZ and _COMPILED:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def wait_for_prior_grid(GDC: tl.constexpr):
    """Under programmatic dependent launch (a launch with launch_pdl=True, Hopper on) a kernel may
    start before the kernel ahead of it in the stream has finished: everything it does before
    this call must neither read what that kernel writes nor write what it reads. This waits until
    that kernel has finished and its writes are visible (griddepcontrol.wait). GDC False (any
    launch without PDL, and the interpreter) compiles nothing."""
    if GDC and _COMPILED:
        gdc_wait()


# -- the host side of a launch -------------------------------------------------------------------

# what one SM of a Hopper GPU holds (H100, H200): registers, shared memory (1 KB of it reserved per
# program), warps and programs
SM_REGS, SM_SHARED, SM_WARPS, SM_PROGRAMS = 65536, 228 * 1024, 64, 32


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """How many programs of a kernel with `regs` registers a thread, `warps` warps and `shared`
    bytes of shared memory one Hopper SM holds at once (registers go out per warp in units of
    256)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // (per_warp * warps)
    by_shared = SM_SHARED // (shared + 1024)
    return min(by_regs, by_shared, SM_WARPS // warps, SM_PROGRAMS)


_PER_SM: dict = {}


def compiled_per_sm(key, kernel, grid: tuple, *args, **meta) -> int:
    """programs_per_sm of `kernel` as Triton compiles it for these arguments (compiling it, not
    launching it, the first time), cached under `key`, which must hold whatever the compiled code
    depends on (the constexprs, launch settings, dtypes, device)."""
    n = _PER_SM.get(key)
    if n is None:
        compiled = kernel.warmup(*args, grid=grid, **meta)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        compiled._init_handles()
        n = _PER_SM[key] = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared)
    return n


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def is_hopper(device: torch.device) -> bool:
    """A CUDA GPU of compute capability 9.x, whose SMs programs_per_sm describes."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


@functools.lru_cache(maxsize=None)
def pdl_possible(device: torch.device) -> bool:
    """Whether launches on `device` can take programmatic dependent launch: compiled kernels
    (not the interpreter) on a CUDA GPU of compute capability 9.0 or above."""
    return (not _INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_launch(on: bool, device: torch.device) -> dict:
    """The keywords of a launch of a kernel that calls wait_for_prior_grid(GDC): where `on` and
    pdl_possible(device), its GDC constexpr and Triton's launch_pdl option, always together (a
    launch under PDL whose kernel does not wait would race the launch ahead); else GDC=False
    alone, a plain launch (the interpreter takes no launch_pdl)."""
    if on and pdl_possible(device):
        return {"GDC": True, "launch_pdl": True}
    return {"GDC": False}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# launch() skips Triton's binding where the launch convention is the one it was written against
# (Triton 3.4 to 3.9 call CompiledKernel.run(grid x3, stream, function, packed metadata, launch
# metadata, enter hook, exit hook, *every argument in signature order)); elsewhere, under the
# interpreter, or with TP_GDN_FAST_LAUNCH=0 in the environment, every launch is Triton's own.
FAST_LAUNCH = (not _INTERPRETED and knobs is not None and os.environ.get("TP_GDN_FAST_LAUNCH", "1") != "0"
               and (3, 4) <= tuple(int(x) for x in triton.__version__.split(".")[:2]) <= (3, 9))

# (kernel, device, argument specialisation, keyword items) -> (launcher, function, packed metadata,
# values of the parameters after the positional ones); None where those do not allow the short path
_LAUNCHES: dict = {}
_DRIVER: list = []     # [current device query, get_current_stream], bound on first use
_I32 = 1 << 31


def _specialise(args) -> tuple | None:
    """(key, call arguments) of a launch's positional arguments, or None where one is not a
    tensor, int, float or bool. The key holds what Triton specialises each on, or finer: a
    tensor's dtype, 16-byte alignment and being on a GPU; an int's being 1, its divisibility by 16
    and its integer width; a float's or bool's type. Tensors go on as their addresses (an int the
    launcher takes as is, without a data_ptr() call and a driver query per pointer)."""
    spec, call = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            ptr = a.data_ptr()
            spec.append((a.dtype, ptr & 15 == 0, a.is_cuda))
            call.append(ptr)
            continue
        t = type(a)
        if t is int:
            spec.append((a == 1, a & 15 == 0, -_I32 <= a < _I32, a >= 1 << 63))
        elif t is float or t is bool:
            spec.append(t)
        else:
            return None
        call.append(a)
    return tuple(spec), call


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """kernel[grid](*args, **meta) with tensors positional; scalars positional or by keyword;
    constexprs and launch options by keyword. The first launch of each specialisation (what
    Triton specialises the positional arguments on, the keyword values, the device) goes
    through Triton, which compiles or finds the kernel and checks the arguments; later ones call
    the compiled kernel's launcher directly, without Triton's binding, cache-key and
    launch-metadata work (on an H200 host, 15-40% less host time a layer call; RESULTS, twelfth
    session). Launch hooks installed through triton.knobs (profilers) make every launch Triton's
    own, as does anything but a JITFunction in kernel's place (benchmarks/kernel_resources.py's
    stand-ins)."""
    if FAST_LAUNCH and type(kernel) is JITFunction and _unhooked(knobs.runtime.launch_enter_hook) \
            and _unhooked(knobs.runtime.launch_exit_hook):
        if not _DRIVER:
            from triton.runtime import driver
            driver.active.get_current_device()      # torch.cuda.current_device: initialises CUDA
            # later calls take torch's device query without current_device's initialisation checks
            # (the query step took 5-12 us of a launch in cold calls on an H200 host; RESULTS,
            # twentieth session)
            _DRIVER[:] = [getattr(torch._C, "_cuda_getDevice", driver.active.get_current_device),
                          driver.active.get_current_stream]
        device = _DRIVER[0]()
        spec = _specialise(args)
        key = None if spec is None else (kernel, device, spec[0], tuple(meta.items()))
        entry = _LAUNCHES.get(key) if key is not None else None
        if entry is not None:
            run, function, packed, tail = entry
            g1 = grid[1] if len(grid) > 1 else 1
            g2 = grid[2] if len(grid) > 2 else 1
            run(grid[0], g1, g2, _DRIVER[1](device), function, packed, None, None, None, *spec[1], *tail)
            return
        compiled = kernel[grid](*args, **meta)
        if key is not None and key not in _LAUNCHES:
            _LAUNCHES[key] = _short_entry(kernel, compiled, len(args), meta)
        return
    kernel[grid](*args, **meta)


def _unhooked(hook) -> bool:
    """No launch hook installed: None (Triton 3.4) or an empty HookChain (3.5 on)."""
    return hook is None or not getattr(hook, "calls", True)


def _short_entry(kernel, compiled, n_args: int, meta: dict):
    """The short path's launch data for a kernel just launched by Triton: its launcher, function
    handle, packed metadata and the values of the parameters after the positional ones (given by
    keyword, else defaults), or None where one of those is neither a constexpr nor a scalar."""
    tail = []
    for p in kernel.params[n_args:]:
        if p.name in meta:
            value = meta[p.name]
        elif p.has_default:
            value = p.default
        else:
            return None
        if not p.is_constexpr and type(value) not in (int, float, bool):
            return None
        tail.append(value)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    return compiled.run, compiled.function, compiled.packed_metadata, tuple(tail)
