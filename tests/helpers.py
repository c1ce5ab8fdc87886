"""Shared test helpers: tiny configs and weights, HF checkpoints, and running several ranks."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from tp_gdn import GDNConfig
from tp_gdn.layer import full_shapes
from tp_gdn.loader.synthetic import gate_parameters


def tiny_config(model_type="qwen3_next", nk=4, nv=8, dk=16, dv=16, H=32, K=4, layers=4) -> GDNConfig:
    types = tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers))
    return GDNConfig(model_type=model_type, hidden_size=H, num_k_heads=nk, num_v_heads=nv, head_k_dim=dk,
                     head_v_dim=dv, conv_kernel=K, rms_norm_eps=1e-6, layer_types=types)


def random_full_weights(cfg: GDNConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random unsharded layer weights with realistic scales and non-default A_log/dt_bias/norm."""
    g = torch.Generator().manual_seed(seed)
    s = full_shapes(cfg)
    A_log, dt_bias = gate_parameters(cfg.num_v_heads, g)
    w = {
        "in_proj.weight": torch.randn(s["in_proj.weight"], generator=g) / cfg.hidden_size ** 0.5,
        "conv_weight": torch.randn(s["conv_weight"], generator=g) / cfg.conv_kernel ** 0.5,
        "A_log": A_log,
        "dt_bias": dt_bias,
        "norm_weight": 1 + 0.3 * torch.randn(s["norm_weight"], generator=g),
        "out_proj.weight": torch.randn(s["out_proj.weight"], generator=g) / cfg.value_dim ** 0.5,
    }
    return {k: v.to(dtype) if v.dim() > 1 else v for k, v in w.items()}


def load_benchmark(name: str):
    """A script of benchmarks/ (by file name, without .py) imported as a module, for its logic
    that runs without a GPU."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# -- HF transformers checkpoints -------------------------------------------------------------------
HF_GDN_MODULES = ("transformers.models.qwen3_next.modeling_qwen3_next", "transformers.models.qwen3_5.modeling_qwen3_5")
HF_KERNEL_FUNCS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                   "causal_conv1d_update")
HF_OPTIONAL_KERNELS = ("fla", "causal_conv1d")


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in HF_OPTIONAL_KERNELS:
            raise ImportError(f"{fullname} is hidden while HF's GDN modeling modules are imported")
        return None


def import_hf_gdn_torch_only() -> None:
    """Import HF's Qwen3-Next / Qwen3.5 modeling modules with fla-core and causal-conv1d hidden.

    transformers binds those packages' kernels in place of its own torch code, at import time,
    wherever they are installed (fla-core is, on the GPU machine): the HF oracle would then run
    fla's kernels (and fail on CPU tensors), no longer an independent reference. Raises if a module
    was imported earlier with a kernel bound."""
    hidden = {n: m for n, m in sys.modules.items() if n.split(".")[0] in HF_OPTIONAL_KERNELS}
    for n in hidden:
        del sys.modules[n]
    finder = _Hide()
    sys.meta_path.insert(0, finder)
    try:
        mods = [importlib.import_module(m) for m in HF_GDN_MODULES]
    finally:
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
    for mod in mods:
        for name in HF_KERNEL_FUNCS:
            impl = inspect.getclosurevars(getattr(mod, name)).nonlocals.get("implementation")
            if impl is None or impl.__module__ != mod.__name__:
                raise RuntimeError(f"{mod.__name__}.{name} runs {getattr(impl, '__module__', impl)}, not transformers' "
                                   "torch code: import the HF oracle before fla-core")


def build_hf_model(kind: str, seed: int = 0):
    """A tiny random Qwen3-Next or Qwen3.5 (text) model with non-default GDN parameters, on
    transformers' own torch code (import_hf_gdn_torch_only)."""
    import transformers

    import_hf_gdn_torch_only()

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, linear_conv_kernel_dim=4,
                  rms_norm_eps=1e-6)
    if kind == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(
            **common, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
            linear_value_head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
            shared_expert_intermediate_size=16)
        model = transformers.Qwen3NextForCausalLM(cfg)
    elif kind == "qwen3_5":
        cfg = transformers.Qwen3_5TextConfig(
            **common, linear_num_key_heads=4, linear_num_value_heads=16, linear_key_head_dim=16,
            linear_value_head_dim=8)
        model = transformers.Qwen3_5ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for layer in model.model.layers:
            if getattr(layer, "linear_attn", None) is not None:
                la = layer.linear_attn
                A_log, dt_bias = gate_parameters(la.A_log.numel())
                la.A_log.copy_(A_log)
                la.dt_bias.copy_(dt_bias)
                la.norm.weight.copy_(1 + 0.3 * torch.randn_like(la.norm.weight))
    return model.eval()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="100KB")
    n_files = len(list(Path(path).glob("*.safetensors")))
    assert n_files >= 3, f"expected a checkpoint spread over several files, got {n_files}"
    return path


def with_weights_rounded_to(model, dtype):
    """A copy of `model` whose GDN matrices (projections, conv) are rounded to `dtype` and back:
    the oracle for a run that stores those weights in `dtype` (A_log, dt_bias and the norm weight
    stay fp32 in tp_gdn, so they are left alone)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".linear_attn." in name and p.dim() > 1:
                p.copy_(p.to(dtype).float())
    return model


def hf_layer_oracle(model, layer_id: int):
    la = model.model.layers[layer_id].linear_attn

    @torch.no_grad()
    def run(history_LH: torch.Tensor) -> torch.Tensor:
        return la(history_LH[None].to(torch.float32))[0]

    return run


# -- several ranks as processes ------------------------------------------------------------------
def _with_rank(fn, *args):
    from tp_gdn.parallel import get_rank, get_world_size

    return fn(get_rank(), get_world_size(), *args)


def run_ranks(world: int, fn, tmp_path: Path, *args, timeout: float = 600) -> list:
    """Run fn(rank, world, *args) in `world` spawned processes joined by gloo through a file://
    store under tmp_path; return each rank's result (fn must live in an importable module)."""
    from tp_gdn.launch.local import spawn_ranks

    return spawn_ranks(world, _with_rank, fn, *args, timeout_s=timeout, workdir=tmp_path)


# -- the main job under every launcher -----------------------------------------------------------
def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of checkpoint directory `src` at `dst` (new), to edit without touching `src`."""
    dst.mkdir()
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    return dst


def run_main_job(args: list[str], tmp_path: Path, name: str) -> tuple[dict, dict]:
    """`tp-gdn run *args`, which must succeed: (the checked layers' saved outputs, the summary)."""
    import json

    from tp_gdn.cli import main as cli

    out, js = tmp_path / f"{name}.pt", tmp_path / f"{name}.json"
    assert cli(["run", *args, "--save-outputs", str(out), "--json", str(js)]) == 0, name
    return torch.load(out)["outputs"], json.loads(js.read_text())


def job_across_launchers(tmp_path: Path, job_args: list[str], tp: int, tol: float) -> dict[str, dict]:
    """`tp-gdn run *job_args` at tp under the local launcher, torchrun and (where ray is importable)
    Ray, and at tp=1. Asserts that the launchers' outputs are bit-equal, that they lie within
    `tol` of the tp=1 run's, and that every run's own check against the unsharded fp32 layer
    (max_rel_err) is within `tol`. Returns each run's summary by launcher."""
    def run(name, *extra):
        return run_main_job([*job_args, *extra], tmp_path, name)

    one, one_summary = run("tp1", "--tp", "1")
    launchers = ["local", "torchrun"] + (["ray"] if importlib.util.find_spec("ray") else [])
    outputs, summaries = {}, {"tp1": one_summary}
    for launcher in launchers:
        outputs[launcher], summaries[launcher] = run(launcher, "--tp", str(tp), "--launcher", launcher)
    for name, summary in summaries.items():
        assert summary["max_rel_err"] < tol, (name, summary["max_rel_err"])
    assert len(summaries["local"]["ranks"]) == tp and set(outputs["local"]) == set(one)
    for i in one:
        for n, want in enumerate(one[i]):
            got = outputs["local"][i][n]
            assert rel_err(got, want) < tol, (i, n)
            for launcher in launchers[1:]:
                assert torch.equal(outputs[launcher][i][n], got), (launcher, i, n)
    return summaries
