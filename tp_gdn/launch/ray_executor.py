"""RayExecutor: one actor per rank in a placement group, driven from the Ray driver.

Bundle i holds rank i (PACK: ranks fill a node before the next). Rank 0's actor creates a
TCPStore on a port the OS picks and reports it, the others join it, so there is no port race;
NCCL joins GPU actors, gloo CPU actors. `forward(layer_id, x, batch)` runs the layer on every
rank and returns the all-reduced output; the state cache lives in the actors. `step(x, batch)`
runs every layer on the same x in one call per actor, and on GPU ranks `decode(x, slots)` does
so for a decode step replayed from CUDA graphs (tp_gdn.graphs.GraphedDecoder, one per actor
over its layers and cache; `prepare_decode(B)` captures B sequences' graph ahead of time).

On GPU ranks those calls go to the actors through a Ray compiled graph (`compiled_graph`: None,
the default, takes it on GPU ranks and not on CPU ranks): one graph, compiled once the shards are
loaded, whose input every actor reads from a channel and runs on a thread of its own. A call then
costs the driver a fraction of a millisecond where a plain actor call costs a millisecond or more
per round trip. An idle actor polls its channel and keeps a CPU core busy, which ranks that
compute on CPUs cannot spare, so there they take plain actor calls unless `compiled_graph=True`.
A dead actor, or one that does not answer within `call_timeout_s` (a failed or hung collective),
raises in the driver naming the rank; after a call through the graph fails that way the executor
refuses further calls. `shutdown()` releases the graph, the actors and the placement group.
"""

from __future__ import annotations

import logging
import time
import traceback

import numpy as np
import torch

from ..batch import Batch


def _to_wire(t: torch.Tensor) -> tuple:
    """A tensor as Ray moves it between processes: a numpy array of its CPU copy (bfloat16 and
    float16 as their bits in int16) and its dtype's name. Ray serialises numpy arrays without
    pickling their data, and torch tensors with it: on a host of 2 H200s a call to two actors
    with a [4, 2048] fp32 argument took 1.98 ms as numpy against 2.69 as a tensor (0.96 with no
    argument; benchmarks/results/ray_wire_h200x2_s34d_ray_args.log).

    A CPU tensor is copied by numpy, on one thread. torch's copy of a large tensor runs on its
    intra-op thread pool, and on a host of 2 H200s (32 cores, the driver's torch on 32 threads)
    that slowed the copy and the graph's execute after it: the prefill call of the GPU default job
    (a [398, 2048] fp32 x) took 21.4-30.0 ms with torch's copy against 10.6-12.5 with numpy's,
    the copy 6.3-7.2 ms against 0.6, execute 5.1-8.4 against 0.8-0.9
    (benchmarks/results/ray_omp_h200x2_s36a_omp.log)."""
    t = t.detach()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    if t.device.type != "cpu":
        return t.to("cpu").contiguous().numpy(), name     # a device-to-host copy into new memory
    # its own memory, not a buffer the next step reuses
    return np.array(t.numpy(), copy=True, order="C"), name


def _from_wire(w: tuple) -> torch.Tensor:
    """The tensor _to_wire sent, as a CPU tensor of its own (Ray hands the array over read-only)."""
    arr, name = w
    t = torch.from_numpy(arr.copy())
    return t.view(getattr(torch, name)) if name in ("bfloat16", "float16") else t


class _Rank:
    """The body of one rank's actor (wrapped with ray.remote by RayExecutor)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.store = None
        self.decoder = None     # the GraphedDecoder over this rank's layers, built at the first graphed step
        self.device = None      # set by load
        self.busy = False       # inside a call from the compiled graph
        self.failure = None     # the traceback of the graph call in flight or last made, if it raised
        self._stall_s = 0.0     # tests: the next graph call sleeps this long first (a rank stuck in a collective)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start_store(self, timeout_s: float) -> tuple[str, int]:
        import datetime

        import ray
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(host, 0, self.world, is_master=True,
                                   timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        return host, self.store.port

    def join(self, host: str, port: int, use_gpu: bool, timeout_s: float) -> None:
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        if self.store is None:
            self.store = dist.TCPStore(host, port, self.world, is_master=False, timeout=timeout)
        backend = "nccl" if use_gpu else "gloo"
        kw = {}
        if use_gpu:
            torch.cuda.set_device(0)   # Ray shows each GPU actor only its own device
            kw["device_id"] = torch.device("cuda", 0)
        dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.world, timeout=timeout,
                                **kw)

    def load(self, checkpoint: str, dtype: str, use_gpu: bool, layer_ids, backend: str, num_slots: int) -> dict:
        from .. import StateCache, load_layers
        from .job import DTYPES

        t0 = time.perf_counter()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.dtype = DTYPES[dtype]
        self.layers = load_layers(checkpoint, dtype=self.dtype, device=self.device, layer_ids=layer_ids,
                                  backend=backend)
        cfg = next(iter(self.layers.values())).cfg
        self.cache = StateCache(cfg, list(self.layers), num_slots, dtype=self.dtype, device=self.device)
        return dict(rank=self.rank, device=str(self.device), backend=next(iter(self.layers.values())).backend,
                    layers=len(self.layers), load_s=time.perf_counter() - t0)

    def layer_ids(self) -> list[int]:
        return list(self.layers)

    def forward(self, x: tuple, batch: Batch, layer_id: int):
        """Layer `layer_id` on x (as _to_wire sends it); rank 0 returns (y as _to_wire sends it,
        (start, end) of its work on time.perf_counter's clock), the other ranks None."""
        t0 = time.perf_counter()
        y = self.layers[layer_id](self._input(x), batch, self.cache)
        return self._reply(lambda: _to_wire(y), t0)

    def step(self, x: tuple, batch: Batch, keep: list[int]):
        """Every layer on x; rank 0 returns ({layer id: y} for `keep`, as _to_wire sends them, and
        (start, end) as forward does), the other ranks None."""
        t0 = time.perf_counter()
        x = self._input(x)
        ys = {i: layer(x, batch, self.cache) for i, layer in self.layers.items()}
        return self._reply(lambda: {i: _to_wire(ys[i]) for i in keep}, t0)

    def _graphed(self):
        if self.decoder is None:
            from ..graphs import GraphedDecoder
            self.decoder = GraphedDecoder(self.layers, self.cache)
        return self.decoder

    def prepare_decode(self, B: int) -> None:
        self._graphed().prepare(B)

    def decode(self, x: tuple, slots: list[int], keep: list[int]):
        """One decode step of every layer from the graphs; rank 0 returns ({layer id: y} for the
        layers in `keep`, as _to_wire sends them, and (start, end) as forward does), the other
        ranks None."""
        t0 = time.perf_counter()
        ys = self._graphed()(self._input(x), slots)
        return self._reply(lambda: {i: _to_wire(ys[i]) for i in keep}, t0)

    def _input(self, x: tuple) -> torch.Tensor:
        """x as _to_wire sent it, on this rank's device in its dtype (job.to_layer_input: cast on
        the device, not by the CPU's thread pool)."""
        from .job import to_layer_input
        return to_layer_input(_from_wire(x), self.device, self.dtype)

    def _reply(self, outputs, t0: float):
        """What forward, step and decode return: on rank 0 (outputs(), the outputs as _to_wire
        sends them, formed only there, and (t0, now)), elsewhere None."""
        if self.rank != 0:
            return None
        return outputs(), (t0, time.perf_counter())

    GRAPH_METHODS = ("forward", "step", "decode", "prepare_decode", "layer_ids")

    def call(self, msg: tuple):
        """The compiled graph's one task: msg = (method, args) for one of GRAPH_METHODS. Runs on
        the graph's own thread of this actor. Returns ("ok", the method's result) or ("failed",
        its traceback), so that the driver can name the rank that failed."""
        method, args = msg
        self.busy, self.failure = True, None
        try:
            if method not in self.GRAPH_METHODS:
                raise ValueError(f"{method!r} is not one of {self.GRAPH_METHODS}")
            if self._stall_s:
                stall, self._stall_s = self._stall_s, 0.0
                time.sleep(stall)
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)      # this thread's current device (the actor's only GPU)
            return "ok", getattr(self, method)(*args)
        except Exception:
            self.failure = traceback.format_exc()
            return "failed", self.failure
        finally:
            self.busy = False

    def status(self) -> dict:
        """Asked on the actor's main thread while a graph call may still run on the graph's thread."""
        return dict(busy=self.busy, failure=self.failure)

    def stall_next(self, seconds: float) -> None:
        """For tests: the next call from the compiled graph sleeps `seconds` first."""
        self._stall_s = float(seconds)

    def peak_memory_bytes(self) -> int:
        from .job import peak_memory_bytes

        return peak_memory_bytes(self.device)

    def die(self) -> None:
        """For tests: this rank's process exits as a crashed worker would."""
        import os

        os._exit(1)

    def close(self) -> None:
        import torch.distributed as dist

        self.decoder = None       # its graphs hold work captured on the process group's communicator
        if dist.is_initialized():
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dist.destroy_process_group()


class RayExecutor:
    SHUTDOWN_TIMEOUT_S = 20.0      # how long shutdown waits for the ranks to close their process groups

    def __init__(self, checkpoint: str, tp: int, *, address: str | None = None, use_gpu: bool | None = None,
                 dtype: str = "float32", backend: str = "auto", layer_ids: list[int] | None = None,
                 num_slots: int = 16, call_timeout_s: float = 120.0, start_timeout_s: float = 300.0,
                 compiled_graph: bool | None = None, ray_init_kwargs: dict | None = None):
        """Connect to the Ray cluster at `address` ("auto": the running one) or, when None and
        Ray is not initialised, start a local one; place `tp` rank actors, load the shards and
        compile the graph that carries the calls to them (`compiled_graph`; None: on GPU ranks)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..config import GDNConfig

        GDNConfig.from_pretrained(checkpoint).check_tp(tp)
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            kw = dict(ray_init_kwargs or {})
            if address is None:
                kw.setdefault("include_dashboard", False)
            ray.init(address=address, **kw)
        gpus = ray.cluster_resources().get("GPU", 0)
        if use_gpu is None:
            use_gpu = gpus >= tp
        self.tp, self.use_gpu, self.call_timeout_s = tp, use_gpu, call_timeout_s
        self.compiled_graph = use_gpu if compiled_graph is None else bool(compiled_graph)
        # per call: (driver latency, rank 0's compute, the driver's start to rank 0's start); the
        # last is read on one clock (CLOCK_MONOTONIC), so it means something only where the
        # driver and rank 0 share a host
        self.calls: list[tuple[float, float, float]] = []
        self.actors, self.pg, self._layer_ids = [], None, None
        self._dag, self._broken = None, None       # the compiled graph; why the ranks are unusable, once they are
        if use_gpu and gpus < tp and self._owns_ray and address is None:
            # a local instance started here gains no GPUs while the placement waits (a cluster's
            # autoscaler might add some, so there the wait stays)
            self.shutdown()
            raise ValueError(f"the local Ray instance has {gpus:g} GPUs, and {tp} ranks on GPUs need {tp}; "
                             "join a cluster that has them (address, --ray-address) or run on CPUs")
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy="PACK")
        try:
            self._wait([self.pg.ready()], start_timeout_s, "placing the ranks (does the cluster have "
                       f"{tp} x {bundle} free?)")
            actor_cls = ray.remote(_Rank)
            self.actors = [
                actor_cls.options(num_cpus=1, num_gpus=1 if use_gpu else 0,
                                  scheduling_strategy=PlacementGroupSchedulingStrategy(
                                      placement_group=self.pg, placement_group_bundle_index=i)).remote(i, tp)
                for i in range(tp)]
            host, port = self._wait([self.actors[0].start_store.remote(start_timeout_s)], start_timeout_s,
                                    "starting rank 0's store")[0]
            self._wait([a.join.remote(host, port, use_gpu, call_timeout_s) for a in self.actors], start_timeout_s,
                       "joining the process group")
            self.rank_info = self._wait(
                [a.load.remote(str(checkpoint), dtype, use_gpu, layer_ids, backend, num_slots) for a in self.actors],
                start_timeout_s, "loading the shards")
            if self.compiled_graph:
                self._dag = self._compile()
                # one call through the graph now, which registers this driver as the reader of
                # its outputs: Ray 2.60 aborts the driver process ("Experimental mutable object
                # must be in the local object store to register as reader") when it tears down,
                # on an actor's death, a graph that no call has been through yet
                self._layer_ids = self._run("layer_ids", "the compiled graph's first call")[0]
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, refs, timeout_s: float, what: str) -> list:
        """Every result, or an error naming the rank: at once for a failed or dead rank, after
        `timeout_s` for ranks that stay silent (a dead peer or a hung collective)."""
        ray = self._ray
        index = {r: i for i, r in enumerate(refs)}
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(index[r] for r in pending)
                raise TimeoutError(f"tp_gdn/ray: {what}: rank(s) {late} gave no answer within {timeout_s:.0f} s "
                                   "(a dead peer or a hung collective)")
            for r in ready:
                try:
                    ray.get(r)
                except ray.exceptions.RayActorError as e:
                    raise RuntimeError(f"tp_gdn/ray: {what}: rank {index[r]}'s actor died: {e}") from None
                except ray.exceptions.RayTaskError as e:
                    raise RuntimeError(f"tp_gdn/ray: {what}: rank {index[r]} failed: {e}") from None
        return ray.get(list(refs))

    def _compile(self):
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            dag = MultiOutputNode([a.call.bind(inp) for a in self.actors])
        return dag.experimental_compile(_submit_timeout=self.call_timeout_s)

    def _run(self, method: str, what: str, *args) -> list:
        """actor.method(*args) on every rank (one of _Rank.GRAPH_METHODS); every rank's result,
        by rank. Through the compiled graph where there is
        one, else as plain actor calls."""
        if self._broken is not None:
            raise RuntimeError(f"tp_gdn/ray: {what}: refused, as an earlier call left the ranks unusable "
                               f"({self._broken}); shut this executor down and start another")
        if self._dag is None:
            return self._wait([getattr(a, method).remote(*args) for a in self.actors], self.call_timeout_s, what)
        ray = self._ray
        try:
            results = ray.get(self._dag.execute((method, args)), timeout=self.call_timeout_s)
        except Exception as e:            # a timeout, a closed channel (a dead actor), or an actor's death
            self._broken = f"{what}: {type(e).__name__}"
            raise self._diagnose(what, e) from None
        failed = [(i, r[1]) for i, r in enumerate(results) if r[0] == "failed"]
        if failed:
            i, tb = failed[0]
            others = f" (and rank(s) {[j for j, _ in failed[1:]]})" if len(failed) > 1 else ""
            raise RuntimeError(f"tp_gdn/ray: {what}: rank {i} failed{others}:\n{tb}")
        return [r[1] for r in results]

    def _diagnose(self, what: str, error: Exception) -> Exception:
        """The error for a graph call that got no answer: each rank's state, asked on its actor's
        main thread (dead, failed with a traceback, or still inside the call)."""
        ray = self._ray
        dead, failed, silent = [], [], []
        for i, a in enumerate(self.actors):
            try:
                st = ray.get(a.status.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                dead.append(i)
                continue
            except Exception:             # no answer on the main thread either
                silent.append(i)
                continue
            if st["failure"] is not None:
                failed.append((i, st["failure"]))
            elif st["busy"]:
                silent.append(i)
        if dead:
            return RuntimeError(f"tp_gdn/ray: {what}: rank {dead[0]}'s actor died"
                                + (f" (and rank(s) {dead[1:]}'s)" if len(dead) > 1 else ""))
        if failed:
            i, tb = failed[0]
            late = f"; rank(s) {silent} gave no answer" if silent else ""
            return RuntimeError(f"tp_gdn/ray: {what}: rank {i} failed{late}:\n{tb}")
        if silent:
            return TimeoutError(f"tp_gdn/ray: {what}: rank(s) {silent} gave no answer within "
                                f"{self.call_timeout_s:.0f} s (a dead peer or a hung collective)")
        return RuntimeError(f"tp_gdn/ray: {what}: the compiled graph failed: {type(error).__name__}: {error}")

    def placement(self) -> list[str]:
        """The Ray node id each rank runs on, by rank."""
        return self._wait([a.node_id.remote() for a in self.actors], self.call_timeout_s, "asking for node ids")

    def layer_ids(self) -> list[int]:
        if self._layer_ids is None:
            self._layer_ids = self._wait([self.actors[0].layer_ids.remote()], self.call_timeout_s, "listing layers")[0]
        return list(self._layer_ids)

    def _call_all(self, method: str, what: str, x: torch.Tensor, *args):
        """actor.method(x, *args) on every rank, x sent as _to_wire sends it; rank 0's output (a
        tensor, or {layer id: tensor}) back as tensors. Records the call's times in self.calls."""
        t0 = time.perf_counter()
        results = self._run(method, what, _to_wire(x), *args)
        out, (start, end) = results[0]
        out = {i: _from_wire(y) for i, y in out.items()} if isinstance(out, dict) else _from_wire(out)
        self.calls.append((time.perf_counter() - t0, end - start, start - t0))
        return out

    def forward(self, layer_id: int, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Run layer `layer_id` on every rank with the same x [tokens, H]; the all-reduced output."""
        return self._call_all("forward", f"forward of layer {layer_id}", x, batch, layer_id)

    def _check_graphs(self) -> None:
        backend = self.rank_info[0]["backend"]
        if not self.use_gpu or backend != "triton":
            raise ValueError("decode steps from CUDA graphs need GPU ranks and the triton backend (these ranks "
                             f"run on {'GPUs' if self.use_gpu else 'CPUs'} with the {backend} backend); "
                             "use step or forward for eager steps")

    def prepare_decode(self, B: int) -> None:
        """Capture every actor's decode graph for B sequences now (the first decode step of B
        sequences captures it otherwise): each warms up on a scratch cache, so the slots keep
        their states."""
        self._check_graphs()
        if B < 1:
            raise ValueError(f"a decode step needs at least one sequence, got B={B}")
        self._run("prepare_decode", f"capturing the decode graphs of {B} sequences", B)

    def _kept(self, keep) -> list[int]:
        ids = self.layer_ids()
        keep = ids if keep is None else [int(i) for i in keep]
        unknown = sorted(set(keep) - set(ids))
        if unknown:
            raise ValueError(f"layer(s) {unknown} are not loaded here (the ranks hold layers {ids})")
        return keep

    def step(self, x: torch.Tensor, batch: Batch, keep: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Every layer on the same x [tokens, H] (as GraphedDecoder's steps run them), in one call
        per actor where forward takes one per layer: {layer id: all-reduced y} for the layers in
        `keep` (default: every layer; all of them run either way)."""
        keep = self._kept(keep)
        return self._call_all("step", f"step of {batch.num_tokens} tokens", x, batch, keep)

    def decode(self, x: torch.Tensor, slots: list[int], keep: list[int] | None = None) -> dict[int, torch.Tensor]:
        """One decode step through every layer, replayed from each actor's CUDA graphs: x [B, H]
        (one token for each of the B slots, continuing from its state) -> {layer id: y [B, H]} for
        the layers in `keep` (default: every layer; all of them run either way). One call per
        actor, as step."""
        self._check_graphs()
        slots = [int(s) for s in slots]
        keep = self._kept(keep)
        return self._call_all("decode", f"decode step of {len(slots)} sequences", x, slots, keep)

    def peak_memory_bytes(self) -> list[int]:
        return self._wait([a.peak_memory_bytes.remote() for a in self.actors], self.call_timeout_s, "memory query")

    def overhead_ms(self, calls: list[tuple[float, float, float]] | None = None) -> float:
        """Mean driver-side latency of a call (forward, step or decode) minus rank 0's compute
        time, over `calls` (default: every call recorded in self.calls)."""
        calls = self.calls if calls is None else calls
        if not calls:
            return float("nan")
        return 1e3 * sum(lat - comp for lat, comp, _ in calls) / len(calls)

    def shutdown(self) -> None:
        """Close every rank's process group (all at once: rank 0's actor holds the store that the
        others' NCCL watchdogs poll, so it must outlive their close), then end the actors."""
        ray = self._ray
        if self._dag is not None:
            # the graph's threads end first, so that close runs with no call in flight; Ray logs
            # each step of it (and, for a dead actor, a traceback) at INFO and ERROR
            log = logging.getLogger("ray.dag.compiled_dag_node")
            level = log.level
            log.setLevel(logging.CRITICAL)
            try:
                self._dag.teardown()
            except Exception:  # a dead actor's loop cannot be cancelled; it is killed below
                pass
            finally:
                log.setLevel(level)
            self._dag = None
        closing = []
        for a in self.actors:
            try:
                closing.append(a.close.remote())
            except Exception:  # a dead actor is killed below either way
                pass
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=self.SHUTDOWN_TIMEOUT_S)   # a hung one is killed too
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
        if self._owns_ray:
            ray.shutdown()


def run_job(spec, address: str | None = None, compiled_graph: bool | None = None) -> dict:
    """The main job (tp_gdn.launch.job) driven through a RayExecutor from this process; its calls
    go through a Ray compiled graph where `compiled_graph` says so (None: on GPU ranks)."""
    from ..config import GDNConfig
    from ..workload import serving_workload
    from .job import (checked_layers, default_checkpoint, is_decode_step, progress, serve, serving_message, summarize,
                      warm_up_message)

    ckpt = spec.checkpoint or str(default_checkpoint(spec.device))
    cfg = GDNConfig.from_pretrained(ckpt)
    progress(f"starting {spec.tp} Ray actors and loading {ckpt} ({spec.device}, {spec.dtype})")
    ex = RayExecutor(ckpt, spec.tp, address=address, use_gpu=spec.device == "cuda", dtype=spec.dtype,
                     backend=spec.backend, layer_ids=spec.layers, num_slots=spec.seqs, compiled_graph=compiled_graph)
    try:
        ids = ex.layer_ids()
        steps = serving_workload(cfg.hidden_size, spec.seqs, spec.prompt_len, spec.decode_steps, spec.seed)
        progress(warm_up_message(spec.device))
        keep = checked_layers(spec, ids)

        decode_calls = []                  # which of ex.calls are decode steps

        def one_call(x, batch):            # a whole step (every layer) in one call per actor
            decode = is_decode_step(batch)
            if decode:
                decode_calls.append(len(ex.calls))
            if spec.decode_graphs and decode:
                return ex.decode(x, list(batch.slots), keep)
            return ex.step(x, batch, keep)
        # warm-up; its outputs come back as the timed steps' do, so that one-off costs of bringing
        # them back (a compiled graph's channels grow to the largest output) fall outside the timing
        serve(ex.forward, ids, steps[:2], [], lambda: None, lambda x, batch: ex.step(x, batch, keep))
        if spec.decode_graphs:
            progress(f"capturing the decode step of {spec.seqs} sequences in CUDA graphs")
            ex.prepare_decode(spec.seqs)                            # captured here, outside the timing
        ex.calls.clear()
        progress(serving_message(steps, ids, spec.prefill_repeats))
        times, outputs = serve(ex.forward, ids, steps, keep, lambda: None, one_call,
                               first_repeats=spec.prefill_repeats)
        ranks = [dict(info, peak_memory_bytes=m, decode_graphs=spec.decode_graphs)
                 for info, m in zip(ex.rank_info, ex.peak_memory_bytes())]
        summary = summarize(spec, ckpt, steps, times, outputs, ranks)
        summary.update(ray_overhead_ms=ex.overhead_ms(),
                       ray_decode_overhead_ms=ex.overhead_ms([ex.calls[i] for i in decode_calls]),
                       ray_compiled_graph=ex.compiled_graph, placement=ex.placement())
        return summary
    finally:
        ex.shutdown()
