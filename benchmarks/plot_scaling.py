"""Plot layer time against tp for ours and the composed peer, from bench_layer.py's JSON files.

    python benchmarks/plot_scaling.py OUT.png layer_tp1.json layer_tp2.json layer_tp4.json

Needs matplotlib (`pip install matplotlib`; not a dependency of tp_gdn). One panel per workload
that was run at more than one tp (prefill 8x4096); the title names the card the JSON files give.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, files = argv[0], argv[1:]
    series: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    devices = set()
    for f in files:
        data = json.load(open(f))
        devices.add(data["device"])
        for r in data["rows"]:
            series[r["workload"]]["ours"][r["tp"]] = r["ours_ms"]
            series[r["workload"]]["composed peer (fla-core)"][r["tp"]] = r["peer_ms"]
            if "ours_back_to_back_ms" in r:   # calls issued without a wait between them
                series[r["workload"]]["ours, calls back to back"][r["tp"]] = r["ours_back_to_back_ms"]
                series[r["workload"]]["peer, calls back to back"][r["tp"]] = r["peer_back_to_back_ms"]
            if "ours_nccl_back_to_back_ms" in r:   # decode at tp > 1 with NCCL's all-reduce, not symmetric memory
                series[r["workload"]]["ours with NCCL all-reduce, back to back"][r["tp"]] = r["ours_nccl_back_to_back_ms"]
            for pieces, ms in (r.get("overlap_ms") or {}).items():
                if int(pieces) > 1:
                    series[r["workload"]][f"ours, all-reduce overlapped ({pieces} pieces)"][r["tp"]] = ms
    panels = [w for w, s in series.items() if len(s["ours"]) > 1]
    if not panels:
        print("no workload was run at more than one tp", file=sys.stderr)
        return 1
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, w in zip(axes[0], panels):
        ones = series[w]["ours"].get(1)
        for name, pts in series[w].items():
            tps = sorted(pts)
            ax.plot(tps, [pts[t] for t in tps], marker="o", label=name)
        if ones:
            tps = sorted(series[w]["ours"])
            ax.plot(tps, [ones / t for t in tps], ls=":", color="gray", label="ours at tp=1, divided by tp")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(series[w]["ours"]), [str(t) for t in sorted(series[w]["ours"])])
        ax.set_xlabel("tensor-parallel size")
        ax.set_ylabel("ms per layer call")
        ax.set_title(w)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"GDN layer, Qwen3-Next-80B dims, bf16 — {', '.join(sorted(devices))}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
