"""Large products x W^T through cuBLASLt, with the algorithm picked by timing once per shape class.

torch's cuBLAS call runs the algorithm that cuBLASLt's heuristic ranks first for the shape. Other
algorithms can run faster: ones the heuristic ranks lower, and ones it offers for other row counts
of the same product. On one H200 (s41; benchmarks/RESULTS.md), at 32768 rows: tp=1's in_proj
(2048 -> 12352) 2,258 us on the heuristic's #7 against 2,451 on torch's call, out_proj (4096 ->
2048) 721 against 765; tp=2's in_proj (2048 -> 6176) 1,132 us on the algorithm the heuristic
offers for 16384 rows against 1,211 (none of the 8 it offers for 32768 rows beat torch's call).

`TunedGemm` (one per device, `TunedGemm.for_device`) is a product in the sense of
`linear.product`: `tuned(x [M, K], W [N, K], out=None)` returns x W^T, or None where it leaves the
product to torch's cuBLAS call. It takes bf16 and fp16 x and W with packed rows (and `out`, where
given, packed [M, N]), pointers on 256-byte boundaries and M >= MIN_ROWS.

The first call of a class (N, K, dtype, whether `out` is given, M rounded up to a power of two)
gathers the heuristic's algorithms for M rows and for the DONOR_ROWS multiples of M (up to
CANDIDATES each, needing at most WORKSPACE bytes), keeps those cuBLASLt's check
(cublasLtMatmulAlgoCheck) takes for M rows, and times them against torch's call in interleaved
rounds on the current stream. It keeps the fastest where that took at most MARGIN of torch's time,
else the class stays with torch's call. Other row counts of the class run the kept algorithm where
cuBLASLt's check takes it for them (asked once per row count), else torch's call. Picking takes
one wait for the current stream and 0.43-0.44 s for in_proj at 32768 rows at tp=1 (0.23-0.25 s
at tp=2, 0.16-0.17 s for out_proj at tp=1; H200, s41).

Each stream gets its own workspace of WORKSPACE bytes at its first tuned product (the algorithms
picked so far asked cuBLASLt's check for 4 bytes), so that products on several streams share
none. A stream being captured into a CUDA graph never picks and never allocates: its products run
the class's pick where one was made and the stream has its workspace (a call on that stream before
the capture, as torch's warm-up before a capture does), else torch's call.

The picked candidates were bit-equal to torch's call in every case measured (no split of K); the
pick itself can differ from one process to the next where two candidates time alike.

TP_GDN_GEMM=cublas (read when a layer is built) leaves every product to torch's call.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch
import torch.nn.functional as F

from .comm import _env_choice

GEMM_MODES = ("tuned", "cublas")
MIN_ROWS = 2048          # fewer rows: torch's call (little to gain, and the direct call's host work)
CANDIDATES = 8           # how many of the heuristic's algorithms are asked for, per row count asked
DONOR_ROWS = (0.5, 2.0)  # the heuristic is also asked for these multiples of the rows (see _pick)
WORKSPACE = 1 << 20      # bytes of workspace a candidate may need (one buffer per stream)
MARGIN = 0.98            # a candidate is kept only if it takes at most this share of torch's time
ALIGN = 256              # the pointer alignment cuBLASLt's heuristic assumes by default
# timing at a class's first call: WARM calls of each, then interleaved rounds of back-to-back calls
# (with 1 warm call and 3 rounds of 3, one pick timed the heuristic's first candidate at 2,111 us
# against torch's call's 2,479 and kept it, where other timings of that candidate were within 3% of
# torch's call: H200, in_proj at 32768 rows, s41)
WARM, ROUNDS, CALLS = 2, 5, 3

# cuBLASLt's enums (cublasLt.h, stable since CUDA 10.1)
_COMPUTE_32F, _SCALE_32F = 68, 0
_DTYPES = {torch.bfloat16: 14, torch.float16: 2}          # cudaDataType_t
_DESC_TRANSA, _DESC_TRANSB, _OP_N, _OP_T = 3, 4, 0, 1
_PREF_MAX_WORKSPACE = 1


def gemm_mode() -> str:
    """TP_GDN_GEMM (default "tuned"), checked."""
    return _env_choice("TP_GDN_GEMM", GEMM_MODES)


def row_class(rows: int) -> int:
    """The power of two at or above `rows`: row counts that share a picked algorithm."""
    return 1 << max(rows - 1, 0).bit_length()


_UNPICKED = object()


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib = None


def _library():
    """libcublasLt as torch's cuBLAS loaded it (libcublas links it), bound once."""
    global _lib
    if _lib is not None:
        return _lib
    path = None
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcublasLt.so" in line), None)
    except OSError:
        pass
    if path is None:
        raise RuntimeError("TP_GDN_GEMM=tuned: libcublasLt is not loaded in this process (torch's cuBLAS "
                           "loads it on its first product); set TP_GDN_GEMM=cublas to leave products to torch")
    lib = ctypes.CDLL(path)
    P, I, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, args in {
            "cublasLtCreate": [P],
            "cublasLtMatmulDescCreate": [P, I, I],
            "cublasLtMatmulDescSetAttribute": [P, I, P, S],
            "cublasLtMatrixLayoutCreate": [P, I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [P],
            "cublasLtMatmulPreferenceSetAttribute": [P, I, P, S],
            "cublasLtMatmulAlgoGetHeuristic": [P, P, P, P, P, P, P, I, P, P],
            "cublasLtMatmulAlgoCheck": [P, P, P, P, P, P, P, P],
            "cublasLtMatmul": [P, P, P, P, P, P, P, P, P, P, P, P, P, P, S, P]}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, I
    _lib = lib
    return lib


def _ok(status: int, what: str):
    if status:
        raise RuntimeError(f"cuBLASLt {what} failed with cublasStatus_t {status}")


class _Shape:
    """Descriptors of one product class: x [M, K] W[N, K]^T -> [M, N], row-major, as column-major
    W^T-first: D [N, M] = op(A) B with A = W (K x N, transposed), B = x (K x M)."""

    def __init__(self, lib, N: int, K: int, dtype: torch.dtype):
        self.lib, self.N, self.K, self.type = lib, N, K, _DTYPES[dtype]
        self.desc = ctypes.c_void_p()
        _ok(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _SCALE_32F), "MatmulDescCreate")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(op)
            _ok(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "MatmulDescSetAttribute")
        self.a = self._layout(K, N)
        self.rows = {}                    # M -> (B, D) layouts

    def _layout(self, rows: int, cols: int):
        layout = ctypes.c_void_p()
        _ok(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), self.type, rows, cols, rows),
            "MatrixLayoutCreate")
        return layout

    def layouts(self, M: int):
        got = self.rows.get(M)
        if got is None:
            got = self.rows[M] = (self._layout(self.K, M), self._layout(self.N, M))
        return got


class TunedGemm:
    """The tuned products of one CUDA device (see the module's docstring)."""

    _by_device: dict[int, "TunedGemm"] = {}

    @classmethod
    def for_device(cls, device) -> "TunedGemm":
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"TunedGemm runs on CUDA devices, not {device}")
        index = torch.cuda.current_device() if device.index is None else device.index
        got = cls._by_device.get(index)
        if got is None:
            got = cls._by_device[index] = cls(index)
        return got

    def __init__(self, index: int):
        self.index = index
        with torch.cuda.device(index):
            a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
            F.linear(a, a)                       # torch's cuBLAS (and with it libcublasLt) loaded
            torch.cuda.synchronize()
            self.lib = _library()
            self.handle = ctypes.c_void_p()
            _ok(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "Create")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.shapes = {}       # (N, K, dtype) -> _Shape
        self.picks = {}        # (N, K, dtype, out given, row class) -> _Pick, or None: torch's call
        self.timings = {}      # the same key -> what the pick timed (for reports)
        self.pref = None       # the heuristic's preference: up to WORKSPACE bytes of workspace
        self.workspaces = {}   # stream handle -> its workspace (a kernel per stream at a time uses it)

    # -- the product -------------------------------------------------------------------------------
    def __call__(self, x_MK: torch.Tensor, w_NK: torch.Tensor, out: torch.Tensor | None = None):
        if x_MK.dim() != 2 or x_MK.shape[0] < MIN_ROWS:
            return None
        M, K = x_MK.shape
        N = w_NK.shape[0]
        key = (N, K, x_MK.dtype, out is not None, row_class(M))
        pick = self.picks.get(key, _UNPICKED)
        if pick is None:                 # the class runs torch's call (the common case needs no more checks)
            return None
        if (x_MK.dtype not in _DTYPES or w_NK.dtype != x_MK.dtype or w_NK.dim() != 2 or w_NK.shape[1] != K
                or x_MK.stride() != (K, 1) or w_NK.stride() != (K, 1) or not x_MK.is_cuda
                or x_MK.device.index != self.index or w_NK.device != x_MK.device
                or x_MK.data_ptr() % ALIGN or w_NK.data_ptr() % ALIGN):
            return None
        if out is not None and (out.shape != (M, N) or out.dtype != x_MK.dtype or out.stride() != (N, 1)
                                or out.device != x_MK.device or out.data_ptr() % ALIGN):
            return None
        if pick is _UNPICKED:
            if torch.cuda.is_current_stream_capturing():
                return None
            pick = self._pick(key, x_MK, w_NK, out)
            if pick is None:
                return None
        if not pick.takes(M):
            return None
        stream = torch.cuda.current_stream(x_MK.device).cuda_stream
        workspace = self.workspace(stream)
        if workspace is None:
            return None
        if out is None:
            out = torch.empty(M, N, device=x_MK.device, dtype=x_MK.dtype)
        pick.run(x_MK, w_NK, out, stream, workspace)
        return out

    def workspace(self, stream: int) -> int | None:
        """The workspace's address for `stream` (allocated at its first use; None where that would
        fall inside a CUDA graph capture, whose memory is the graph's)."""
        ws = self.workspaces.get(stream)
        if ws is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            ws = self.workspaces[stream] = torch.empty(WORKSPACE, dtype=torch.uint8, device=f"cuda:{self.index}")
        return ws.data_ptr()

    # -- picking -----------------------------------------------------------------------------------
    def _offered(self, shape: "_Shape", M: int) -> list["_Algo"]:
        """The heuristic's algorithms for M rows of `shape` (up to WORKSPACE bytes of workspace), best first."""
        b, d = shape.layouts(M)
        if self.pref is None:
            self.pref = ctypes.c_void_p()
            _ok(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)), "MatmulPreferenceCreate")
            size = ctypes.c_uint64(WORKSPACE)
            _ok(self.lib.cublasLtMatmulPreferenceSetAttribute(self.pref, _PREF_MAX_WORKSPACE, ctypes.byref(size), 8),
                "MatmulPreferenceSetAttribute")
        found = (_Heuristic * CANDIDATES)()
        count = ctypes.c_int()
        _ok(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, shape.desc, shape.a, b, d, d, self.pref, CANDIDATES,
                                                    found, ctypes.byref(count)), "MatmulAlgoGetHeuristic")
        return [found[i].algo for i in range(count.value) if found[i].state == 0 and found[i].workspace <= WORKSPACE]

    def check(self, shape: "_Shape", algo: "_Algo", M: int) -> bool:
        """Whether cuBLASLt's check takes `algo` for M rows of `shape` within WORKSPACE bytes."""
        b, d = shape.layouts(M)
        result = _Heuristic()
        status = self.lib.cublasLtMatmulAlgoCheck(self.handle, shape.desc, shape.a, b, d, d, ctypes.byref(algo),
                                                  ctypes.byref(result))
        return status == 0 and result.workspace <= WORKSPACE

    def _pick(self, key, x_MK, w_NK, out):
        start = time.perf_counter()
        N, K, dtype = key[:3]
        M = x_MK.shape[0]
        shape = self.shapes.get((N, K, dtype))
        if shape is None:
            shape = self.shapes[(N, K, dtype)] = _Shape(self.lib, N, K, dtype)
        # the heuristic's algorithms for these rows, then those it offers for other row counts (at
        # tp=2's in_proj, 32768 x 2048 -> 6176, its pick for 16384 rows, a 168x128 tile, took 1,132
        # us against torch's call's 1,211, where none of the 8 offered for 32768 rows beat torch's:
        # H200, s41), each where cuBLASLt's check takes it for these rows
        found = {}
        for scale in (1.0, *DONOR_ROWS):
            rows = max(1, int(M * scale))
            for i, algo in enumerate(self._offered(shape, rows)):
                found.setdefault(bytes(algo), (algo, "#{}".format(i) if scale == 1.0 else f"#{i} of {rows} rows"))
        picks = [_Pick(self, shape, algo, label, M) for algo, label in found.values() if self.check(shape, algo, M)]
        stream = torch.cuda.current_stream(x_MK.device).cuda_stream
        workspace = self.workspace(stream)
        # every side writes one buffer: torch's call into a given output runs the same kernel as
        # F.linear, which would hold a second output-sized buffer during the timing (about 800 MB
        # at tp=1's in_proj of 32768 rows)
        y = torch.empty(M, N, device=x_MK.device, dtype=x_MK.dtype) if out is None else out

        def torch_call():
            return torch.matmul(x_MK, w_NK.t(), out=y)
        runs = [torch_call] + [lambda p=p: p.run(x_MK, w_NK, y, stream, workspace) for p in picks]
        times = _interleaved(runs)
        best = min(range(1, len(runs)), key=times.__getitem__, default=None)
        chosen = picks[best - 1] if best is not None and times[best] <= MARGIN * times[0] else None
        self.picks[key] = chosen
        self.timings[key] = (M, times[0], [(p.label, t) for p, t in zip(picks, times[1:])], chosen,
                             time.perf_counter() - start)
        return chosen

    def report(self) -> list[str]:
        """One line per class picked so far: its rows, torch's time and each candidate's, and the pick."""
        lines = []
        for (N, K, dtype, given, rows), (M, base, cands, chosen, took) in self.timings.items():
            what = "torch's call" if chosen is None else \
                "the heuristic's {} (row counts run / left to torch's call: {} / {})".format(chosen.label,
                                                                                           *chosen.rows())
            lines.append(f"cuda:{self.index} [{M} x {K}] x [{N} x {K}]^T ({str(dtype)[6:]}, rows class {rows}"
                         f"{', into a given output' if given else ''}): torch {base * 1e3:.1f} us; "
                         + ", ".join(f"{r} {t * 1e3:.1f}" for r, t in cands)
                         + f"; runs {what}; picked in {took * 1e3:.0f} ms")
        return lines


class _Pick:
    """One cuBLASLt algorithm of a class, run on the current stream with that stream's workspace:
    on the row count it was picked at, and on another row count of its class where cuBLASLt's
    check takes it (asked once per row count)."""

    def __init__(self, owner: TunedGemm, shape: _Shape, algo: _Algo, label: str, M: int):
        self.owner, self.shape, self.label = owner, shape, label
        self.algo = _Algo.from_buffer_copy(algo)      # its own copy, apart from the heuristic's array
        self.checked = {M: True}     # row count -> whether this algorithm runs it
        self.algo_p = ctypes.addressof(self.algo)
        self.alpha_p, self.beta_p = ctypes.addressof(owner.alpha), ctypes.addressof(owner.beta)

    def takes(self, M: int) -> bool:
        ok = self.checked.get(M)
        if ok is None:
            ok = self.checked[M] = self.owner.check(self.shape, self.algo, M)
        return ok

    def rows(self) -> tuple[int, int]:
        """How many row counts it runs, and how many it leaves to torch's call."""
        taken = sum(self.checked.values())
        return taken, len(self.checked) - taken

    def run(self, x_MK, w_NK, out, stream: int, workspace: int):
        o, s = self.owner, self.shape
        b, d = s.layouts(x_MK.shape[0])
        status = o.lib.cublasLtMatmul(o.handle, s.desc, self.alpha_p, w_NK.data_ptr(), s.a, x_MK.data_ptr(), b,
                                      self.beta_p, out.data_ptr(), d, out.data_ptr(), d, self.algo_p, workspace,
                                      WORKSPACE, stream)
        if status:
            _ok(status, "Matmul")


def _interleaved(runs) -> list[float]:
    """Median milliseconds a call of each of `runs` over ROUNDS interleaved rounds of CALLS
    back-to-back calls on the current stream (after WARM calls of each), the order turning each
    round; the host waits for the current stream at the end."""
    for run in runs:
        for _ in range(WARM):
            run()
    events = [[] for _ in runs]
    for r in range(ROUNDS):
        order = list(range(len(runs)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CALLS):
                runs[i]()
            end.record()
            events[i].append((start, end))
    done = torch.cuda.Event()
    done.record()
    done.synchronize()          # the current stream's work only: other streams may wait on peers
    return [statistics.median(s.elapsed_time(e) / CALLS for s, e in ev) for ev in events]
