"""Loading at scale: rank-local reads, bounded memory, pre-sharded checkpoints, generated
checkpoints, and failures that name the file and tensor."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tp_gdn import CheckpointError, GDNConfig, GDNLayer, LoadStats, load_layers
from tp_gdn.cli import main as cli
from tp_gdn.loader import files as loader_files
from tp_gdn.loader.rules import pack, tensor_rules
from tp_gdn.loader.synthetic import gate_parameters, write_checkpoint

MID = dict(hidden_size=256, linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=32,
           linear_value_head_dim=32)


@pytest.fixture(scope="module")
def mid_ckpt(tmp_path_factory):
    """A 3-layer Qwen3-Next-layout checkpoint, fp32, one file per ~1 MB (several files)."""
    return write_checkpoint(tmp_path_factory.mktemp("mid"), "qwen3-next-80b", gdn_layers=3, dtype="float32",
                            max_file_bytes=1 << 20, **MID)


def gdn_bytes(ckpt):
    """(all GDN tensor bytes, bytes of the replicated tensors) of a checkpoint."""
    cfg = GDNConfig.from_pretrained(ckpt)
    total = repl = 0
    for path in Path(ckpt).glob("*.safetensors"):
        for name, t in load_file(path).items():
            n = t.numel() * t.element_size()
            total += n
            repl += n if name.endswith("norm.weight") else 0
    return cfg, total, repl


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_reads_its_share_and_opens_each_file_once(mid_ckpt, tp):
    cfg, total, repl = gdn_bytes(mid_ckpt)
    for rank in range(tp):
        stats = LoadStats()
        load_layers(mid_ckpt, tp_rank=rank, tp_size=tp, stats=stats)
        assert stats.bytes_read == (total - repl) // tp + repl
        assert len(stats.files_opened) == len(set(stats.files_opened)) == len(list(Path(mid_ckpt).glob("*.safetensors")))


def test_no_full_tensor_is_ever_materialised(mid_ckpt, monkeypatch):
    cfg = GDNConfig.from_pretrained(mid_ckpt)
    full = {n: shape for n, (shape, _) in tensor_rules(cfg).items()}
    seen = []
    real = loader_files._read_piece

    def spy(sl, rule, rank, world):
        piece = real(sl, rule, rank, world)
        seen.append(piece.shape)
        return piece

    monkeypatch.setattr(loader_files, "_read_piece", spy)
    load_layers(mid_ckpt, tp_rank=1, tp_size=4)
    big = [s for s in full.values() if len(s) > 1]
    assert seen and not any(tuple(s) in big for s in seen)
    assert max(torch.Size(s).numel() for s in seen) <= max(torch.Size(s).numel() for s in big) // 4


PEAK = """
import sys, torch
from tp_gdn import load_layers
def hwm_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
open("/proc/self/clear_refs", "w").write("5")   # restart the peak-RSS counter after the imports
base = hwm_kib()
layers = load_layers(sys.argv[1], dtype=torch.bfloat16, tp_rank=0, tp_size=int(sys.argv[2]))
print(hwm_kib() - base)
"""


def test_peak_memory_follows_the_shard_not_the_checkpoint(tmp_path):
    ckpt = write_checkpoint(tmp_path / "big", "qwen3-next-80b", gdn_layers=2, dtype="bfloat16")
    peak = {tp: int(subprocess.run([sys.executable, "-c", PEAK, str(ckpt), str(tp)], capture_output=True,
                                   text=True, check=True).stdout) for tp in (1, 4)}
    assert peak[4] < 0.5 * peak[1], peak


def test_presharded_checkpoint_loads_the_same_weights(hf_next, tmp_path):
    src = hf_next[0]
    out = tmp_path / "tp2"
    assert cli(["shard", str(src), "--tp", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / "tp_gdn_manifest.json").read_text())
    assert manifest["tp"] == 2 and manifest["layout"] == "grouped" and len(manifest["files"]) == 2
    assert manifest["version"] == 2
    assert all(f["sha256_blocks"] and all(len(d) == 64 for d in f["sha256_blocks"]) for f in manifest["files"])
    for rank in range(2):
        stats = LoadStats()
        a = load_layers(out, tp_rank=rank, tp_size=2, stats=stats)
        b = load_layers(src, tp_rank=rank, tp_size=2)
        assert stats.files_opened == [f"rank-{rank:05d}-of-00002.safetensors"]
        for i in a:
            for (n, p), (_, q) in zip(a[i].named_parameters(), b[i].named_parameters()):
                assert torch.equal(p, q), (i, n)


def test_presharded_checkpoint_refuses_another_tp(hf_next, tmp_path):
    out = tmp_path / "tp2"
    cli(["shard", str(hf_next[0]), "--tp", "2", "--out", str(out)])
    with pytest.raises(CheckpointError, match="pre-sharded for tp=2, but this run has tp=4"):
        load_layers(out, tp_rank=0, tp_size=4)


def shard_with_a_flipped_byte(hf_next, tmp_path, rank: int, at: int):
    """A tp=2 pre-sharded copy whose rank file has byte `at` inverted."""
    out = tmp_path / "tp2"
    cli(["shard", str(hf_next[0]), "--tp", "2", "--out", str(out)])
    f = out / f"rank-{rank:05d}-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))
    return out


def test_presharded_file_that_changed_is_refused(hf_next, tmp_path):
    out = shard_with_a_flipped_byte(hf_next, tmp_path, rank=1, at=-3)
    load_layers(out, tp_rank=0, tp_size=2)
    with pytest.raises(CheckpointError, match="rank-00001-of-00002.safetensors: sha256 does not match"):
        load_layers(out, tp_rank=1, tp_size=2)


def test_presharded_blocks_are_hashed_apart_and_a_changed_block_is_named(hf_next, tmp_path, monkeypatch):
    from tp_gdn.loader import presharded
    monkeypatch.setattr(presharded, "HASH_BLOCK", 4096)      # several blocks even for the tiny files
    out = shard_with_a_flipped_byte(hf_next, tmp_path, rank=1, at=5000)
    manifest = json.loads((out / "tp_gdn_manifest.json").read_text())
    f = out / "rank-00001-of-00002.safetensors"
    assert len(manifest["files"][1]["sha256_blocks"]) == -(-f.stat().st_size // 4096) > 2
    assert presharded.sha256_blocks(f, 4096, threads=3)[0] == manifest["files"][1]["sha256_blocks"][0]
    with pytest.raises(CheckpointError, match=r"sha256 does not match the manifest \(from byte 4096 on\)"):
        load_layers(out, tp_rank=1, tp_size=2)


def test_version_1_manifest_with_one_sha256_per_file_still_loads(hf_next, tmp_path):
    from tp_gdn.loader.presharded import sha256_file
    out = tmp_path / "tp2"
    cli(["shard", str(hf_next[0]), "--tp", "2", "--out", str(out)])
    path = out / "tp_gdn_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = 1
    for e in manifest["files"]:
        del e["sha256_blocks"], e["sha256_block_bytes"]
        e["sha256"] = sha256_file(out / e["file"])
    manifest["files"][1]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    a, b = load_layers(out, tp_rank=0, tp_size=2), load_layers(hf_next[0], tp_rank=0, tp_size=2)
    assert all(torch.equal(p, q) for i in a for p, q in zip(a[i].parameters(), b[i].parameters()))
    with pytest.raises(CheckpointError, match="rank-00001-of-00002.safetensors: sha256 does not match"):
        load_layers(out, tp_rank=1, tp_size=2)


def test_presharded_file_with_a_damaged_header_is_named_as_changed(hf_next, tmp_path):
    out = shard_with_a_flipped_byte(hf_next, tmp_path, rank=0, at=12)   # inside the JSON header
    with pytest.raises(CheckpointError, match="rank-00000-of-00002.safetensors: sha256 does not match"):
        load_layers(out, tp_rank=0, tp_size=2)


@pytest.mark.parametrize("preset,layout", [("tiny", "grouped"), ("qwen3.5", "split")])
def test_generated_checkpoint_spans_files_and_loads(tmp_path, preset, layout):
    small = {} if preset == "tiny" else dict(hidden_size=64, linear_key_head_dim=16, linear_value_head_dim=16)
    ckpt = write_checkpoint(tmp_path / preset, preset, gdn_layers=3, max_file_bytes=1, **small)
    cfg = GDNConfig.from_pretrained(ckpt)
    assert cfg.layout == layout and len(cfg.linear_layer_ids) == 3
    assert len(list(ckpt.glob("*.safetensors"))) == 3
    tensors = {}
    for path in ckpt.glob("*.safetensors"):
        tensors.update(load_file(path))
    i = cfg.linear_layer_ids[-1]
    full = pack(cfg, 1, {n: tensors[cfg.tensor_prefix(i) + n] for n in tensor_rules(cfg)})
    ref = GDNLayer.from_full(cfg, i, full, tp_rank=1, tp_size=2, dtype=torch.bfloat16)
    got = load_layers(ckpt, dtype=torch.bfloat16, layer_ids=[i], tp_rank=1, tp_size=2)[i]
    for (n, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert cfg.torch_dtype == "bfloat16" and tensors[cfg.tensor_prefix(i) + "A_log"].dtype == torch.float32


def test_generated_gates_keep_state_in_some_heads_and_forget_it_in_others():
    """The gate parameters that tests, benchmarks and generated checkpoints share: with unit-scale
    gate inputs, the weakest head keeps most of its state over a 64-token chunk and the
    strongest forgets it within one chunk, so states passed between chunks matter in tests."""
    A_log, dt_bias = gate_parameters(8, torch.Generator().manual_seed(0))
    a = torch.randn(4096, 8, generator=torch.Generator().manual_seed(1))
    g = -A_log.exp() * torch.nn.functional.softplus(a + dt_bias)     # the layer's gate per token
    kept_per_chunk = (64 * g.mean(0)).exp()
    assert kept_per_chunk.max() > 0.3 and kept_per_chunk.min() < 1e-3
    dt = torch.nn.functional.softplus(dt_bias)                       # log-spaced over [1e-3, 1e-1]
    assert torch.allclose(dt.sort().values, torch.logspace(-3, -1, 8), rtol=1e-4)
    assert not torch.equal(dt, dt.sort().values)                      # in random order across heads


def test_make_checkpoint_command_writes_a_loadable_checkpoint(tmp_path):
    assert cli(["make-checkpoint", str(tmp_path / "c"), "--preset", "tiny", "--dtype", "float32"]) == 0
    assert len(load_layers(tmp_path / "c", tp_rank=0, tp_size=1)) == 3


def directory_state(d: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_checkpoints_are_written_only_into_new_or_empty_directories(hf_next, tmp_path, capsys):
    """make-checkpoint over a pre-sharded directory once left its manifest, which is read first, so
    the old rank files loaded under the new config.json; shard into an HF checkpoint's directory
    turned it into a pre-sharded one. Both are refused now, with nothing written; an empty
    directory that exists is taken."""
    pre = tmp_path / "pre"
    assert cli(["shard", str(hf_next[0]), "--tp", "2", "--out", str(pre)]) == 0
    hf = write_checkpoint(tmp_path / "hf", "tiny", dtype="float32", seed=1)
    before = {d: directory_state(d) for d in (pre, hf)}
    capsys.readouterr()
    assert cli(["make-checkpoint", str(pre), "--preset", "tiny", "--dtype", "float32"]) == 2
    assert cli(["shard", str(hf_next[0]), "--tp", "2", "--out", str(hf)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"tp-gdn {cmd}: error: {d} exists and is not an empty directory; write the checkpoint to a new "
                   "or empty directory (or remove this one first)" for cmd, d in (("make-checkpoint", pre),
                                                                                  ("shard", hf))], err
    assert {d: directory_state(d) for d in (pre, hf)} == before
    with pytest.raises(CheckpointError, match="is not an empty directory"):
        write_checkpoint(hf_next[0] / "config.json", "tiny")          # a file, not a directory
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["make-checkpoint", str(empty), "--preset", "tiny", "--dtype", "float32"]) == 0
    assert len(load_layers(empty, tp_rank=0, tp_size=1)) == 3


# -- failures that name the file and tensor ---------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", "tiny", dtype="float32")


def first_file(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"]["model.layers.0.linear_attn.A_log"]


def test_non_float_tensor_is_named(ckpt):
    f = first_file(ckpt)
    t = load_file(f)
    t["model.layers.0.linear_attn.dt_bias"] = torch.arange(8, dtype=torch.int32)
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"gdn-00001.safetensors: tensor model.layers.0.linear_attn.dt_bias "
                                              r"has dtype I32"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_truncated_file_is_named(ckpt):
    f = first_file(ckpt)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="gdn-00001.safetensors: not a readable safetensors file"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_corrupt_header_is_named(ckpt):
    f = first_file(ckpt)
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="gdn-00001.safetensors: not a readable safetensors file"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_index_naming_a_missing_file_is_named(ckpt):
    first_file(ckpt).unlink()
    with pytest.raises(CheckpointError, match="names file gdn-00001.safetensors .*which does not exist"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_config_that_disagrees_with_the_weights_is_named(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["linear_key_head_dim"] = 8
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"in_proj_qkvz.weight has shape \[384, 32\], but config.json implies"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    src = write_checkpoint(tmp_path / "cfg", "tiny")
    (d / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="pytorch_model.bin, a pickle-based format that tp_gdn never unpickles"):
        load_layers(d, tp_rank=0, tp_size=1)
    assert not marker.exists()


def test_loading_is_quiet_when_not_a_terminal(ckpt, capfd):
    load_layers(ckpt, tp_rank=0, tp_size=1)
    assert capfd.readouterr().err == ""


def test_progress_bar_when_asked(ckpt, capfd):
    load_layers(ckpt, tp_rank=0, tp_size=1, progress=True)
    assert "loading GDN layers" in capfd.readouterr().err
