"""parallel/blaslt.py: products of many rows through cuBLASLt with the algorithm picked by timing,
and linear.product's order of products. The GPU tests compare with fp64 products of the same
rounded inputs and with torch's own call."""

import pytest
import torch

from helpers import random_full_weights, rel_err, tiny_config
from tp_gdn import Batch, GDNLayer, StateCache
from tp_gdn.parallel import blaslt
from tp_gdn.parallel.linear import ColumnParallelLinear, product

CUDA = torch.cuda.is_available()


def test_row_class_is_the_power_of_two_at_or_above():
    assert [blaslt.row_class(n) for n in (1, 2, 3, 2048, 2049, 4096, 32767, 32768)] == \
        [1, 2, 4, 2048, 4096, 4096, 32768, 32768]


def test_gemm_mode_is_checked_when_a_layer_is_built(monkeypatch):
    cfg = tiny_config()
    monkeypatch.setenv("TP_GDN_GEMM", "cuBLAS ")
    assert blaslt.gemm_mode() == "cublas"
    assert GDNLayer(cfg, 0).gemm == "cublas"
    monkeypatch.setenv("TP_GDN_GEMM", "fastest")
    with pytest.raises(ValueError, match="TP_GDN_GEMM='fastest': expected one of tuned, cublas"):
        GDNLayer(cfg, 0)
    monkeypatch.delenv("TP_GDN_GEMM")
    # off the GPU the layer's products are torch's, whatever the mode
    assert GDNLayer(cfg, 0).gemm == "cublas" and GDNLayer(cfg, 0).in_proj.products == ()


def test_tuned_gemm_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="runs on CUDA devices, not cpu"):
        blaslt.TunedGemm.for_device("cpu")


def test_product_takes_the_first_product_that_takes_x():
    lin = ColumnParallelLinear(6, (5,), 1, torch.float64, "cpu")
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(3, 6, dtype=torch.float64)
    seen = []

    def refuses(x_, w_, out):
        seen.append("refuses")
        return None

    def doubles(x_, w_, out):
        seen.append("doubles")
        return 2 * (x_ @ w_.T)

    def never(x_, w_, out):
        raise AssertionError("asked after a product took x")

    lin.products = (refuses, doubles, never)
    assert torch.equal(lin(x), 2 * (x @ lin.weight.T)) and seen == ["refuses", "doubles"]
    lin.products = (refuses,)
    out = torch.empty(3, 5, dtype=torch.float64)
    assert product(lin, x, out=out) is out and torch.allclose(out, x @ lin.weight.T)


# -- on a GPU ------------------------------------------------------------------------------------


def fresh(monkeypatch):
    """A TunedGemm of its own (no picks from other tests)."""
    monkeypatch.setattr(blaslt.TunedGemm, "_by_device", {})
    return blaslt.TunedGemm.for_device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(12352, 2048), (2048, 4096), (1000, 320)])
def test_gpu_tuned_product_matches_fp64(monkeypatch, dtype, N, K):
    """With every class kept on a cuBLASLt candidate (MARGIN raised): a class's first call (which
    picks), another row count of the class, a call into a given output all give x W^T; few rows
    are left to torch. With the real margin, the pick's timings are reported."""
    monkeypatch.setattr(blaslt, "MARGIN", 10.0)
    tuned = fresh(monkeypatch)
    w = (torch.randn(N, K, dtype=torch.float64) / K ** 0.5).to("cuda", dtype)
    ran = 0
    for M in (4096, 3000, 2048):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        want = x.double() @ w.double().T
        for out in (None, torch.empty(M, N, device="cuda", dtype=dtype)):
            got = tuned(x, w, out)
            pick = tuned.picks[(N, K, dtype, out is not None, blaslt.row_class(M))]
            assert pick is not None
            if got is None:           # only where cuBLASLt's check refuses the class's pick for M rows
                assert M != blaslt.row_class(M) and not pick.takes(M)
                continue
            ran += 1
            assert got.shape == (M, N) and got.dtype == dtype and (out is None or got is out)
            assert rel_err(got.double(), want) < 1e-2
            assert rel_err(got.float(), torch.nn.functional.linear(x, w).float()) < 1e-2
    assert ran >= 4
    assert tuned(torch.randn(7, K, device="cuda", dtype=dtype), w) is None      # under MIN_ROWS
    monkeypatch.setattr(blaslt, "MARGIN", 0.98)
    tuned = fresh(monkeypatch)
    x = torch.randn(4096, K, device="cuda", dtype=dtype)
    got = tuned(x, w)
    assert got is None or rel_err(got.float(), torch.nn.functional.linear(x, w).float()) < 1e-2
    (line,) = tuned.report()
    assert f"[4096 x {K}] x [{N} x {K}]^T" in line and "torch " in line and "; runs " in line


@pytest.mark.gpu
def test_gpu_pick_holds_one_output_buffer(monkeypatch):
    """A class's first call (the pick) holds at most one output-sized buffer at its peak, the one it
    then returns: every side of the timing writes the same buffer (F.linear's own output per call
    had doubled the peak, 772 MiB more at tp=1's in_proj of 32768 rows)."""
    tuned = fresh(monkeypatch)
    M, N, K = 8192, 4096, 1024
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    torch.matmul(x, w.t())                   # torch's own cuBLAS workspace, before the baseline
    torch.cuda.synchronize()
    out_bytes = M * N * 2
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = tuned(x, w)
    torch.cuda.synchronize()
    assert (N, K, torch.bfloat16, False, M) in tuned.picks             # it picked
    held = torch.cuda.max_memory_allocated() - before
    assert held <= out_bytes + 2 * blaslt.WORKSPACE, (held, out_bytes)
    want = torch.nn.functional.linear(x, w)
    assert rel_err((want if got is None else got).float(), want.float()) < 1e-2


@pytest.mark.gpu
def test_gpu_tuned_product_leaves_what_it_does_not_take(monkeypatch):
    tuned = fresh(monkeypatch)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4097, 256, device="cuda", dtype=torch.bfloat16)
    assert tuned(x.flatten()[8:8 + 4096 * 256].view(4096, 256), w) is None     # 16 bytes off a 256-byte boundary
    assert tuned(x[:, :128], w[:, :128]) is None          # rows not packed
    assert tuned(x[:4096].float(), w.float()) is None    # fp32
    assert tuned(x[:4096], w, out=torch.empty(4096, 512, device="cuda", dtype=torch.float16)) is None
    assert not tuned.picks                                # each refused before any timing


@pytest.mark.gpu
def test_gpu_tuned_product_in_a_cuda_graph(monkeypatch):
    """A stream being captured does not pick, nor take its workspace (torch's call is captured
    instead); a class picked before runs its cuBLASLt pick inside the graph on a stream that has its
    workspace, and the replay gives the eager call's bits."""
    monkeypatch.setattr(blaslt, "MARGIN", 10.0)           # keep a candidate, so that the graph runs cuBLASLt
    tuned = fresh(monkeypatch)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(4096, 2048, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        assert tuned(x, w, out) is None
        torch.matmul(x, w.t(), out=out)
    assert not tuned.picks
    eager = tuned(x, w, out).clone()                       # picks, outside a capture
    assert tuned.picks[(2048, 1024, torch.bfloat16, True, 4096)] is not None
    assert rel_err(eager.float(), torch.nn.functional.linear(x, w).float()) < 1e-2
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2, stream=stream):     # a stream without its workspace: torch's call
        assert tuned(x, w, out) is None
        torch.matmul(x, w.t(), out=out)
    with torch.cuda.stream(stream):
        assert tuned(x, w, out) is out            # the stream's workspace, outside a capture
    torch.cuda.synchronize()
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2, stream=stream):
        assert tuned(x, w, out) is out
    out.zero_()
    g2.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
def test_gpu_layer_with_tuned_products_matches_torch_call(monkeypatch, seed):
    """The triton layer (tp=1, bf16) with its products on cuBLASLt picks (MARGIN raised, so that
    they run) against the same layer with TP_GDN_GEMM=cublas, on a prefill of 2,300 tokens (in_proj
    and out_proj over the row minimum) and a decode step; and both against the fp32 torch layer."""
    monkeypatch.setattr(blaslt, "MARGIN", 10.0)
    tuned = fresh(monkeypatch)
    cfg = tiny_config(nk=4, nv=8, dk=128, dv=128, H=1024, K=4, layers=1)
    full = {k: v.bfloat16().float() if v.dim() > 1 else v for k, v in random_full_weights(cfg, seed).items()}
    lens = [1200, 1100]
    x = torch.randn(sum(lens), cfg.hidden_size, device="cuda") * 0.5
    outs = {}
    for mode in ("tuned", "cublas"):
        monkeypatch.setenv("TP_GDN_GEMM", mode)
        layer = GDNLayer.from_full(cfg, 0, full, backend="triton", device="cuda", dtype=torch.bfloat16)
        assert layer.gemm == mode and (tuned in layer.in_proj.products) == (mode == "tuned")
        cache = StateCache(cfg, [0], 2, device="cuda", dtype=torch.bfloat16, tp_size=1)
        y = layer(x.bfloat16(), Batch(lens, [0, 1], [False, False]), cache)
        d = layer(x[:2].bfloat16(), Batch([1, 1], [0, 1], [True, True]), cache)
        outs[mode] = (y.float(), d.float())
    in_proj, out_proj = (2 * 512 + 2 * 1024 + 2 * 8, 1024), (1024, 1024)
    assert tuned.picks[(*in_proj, torch.bfloat16, False, 4096)] is not None
    assert tuned.picks[(*out_proj, torch.bfloat16, False, 4096)] is not None
    ref_layer = GDNLayer.from_full(cfg, 0, full, backend="torch", device="cuda")
    cache = StateCache(cfg, [0], 2, device="cuda", tp_size=1)
    want = ref_layer(x, Batch(lens, [0, 1], [False, False]), cache)
    want_d = ref_layer(x[:2], Batch([1, 1], [0, 1], [True, True]), cache)
    for mode, (y, d) in outs.items():
        assert rel_err(y, want) < 2e-2 and rel_err(d, want_d) < 2e-2, mode
    assert rel_err(outs["tuned"][0], outs["cublas"][0]) < 1e-2
