"""Round time and bytes with and without secure aggregation: fedtune's SecAgg+ and Flower's (issue 6).

For each delta size (0.6M and 4.4M parameters) and each number of clients (3, 10, 30), one worker
process runs, ``--repeats`` times and interleaved: fedtune plain, fedtune SecAgg+, Flower plain,
Flower SecAgg+ (``benchmarks/secagg_flower.py``). fedtune runs its real round loop (``run_server``)
with the real ClientApp on the in-process ``shared`` backend; every message crosses Flower's protobuf
serialization both ways (``benchmarks/secagg_wire.py``), which gives the bytes.

The model is the tiny family's (the tiny preset's BPE tokenizer) with Qwen2.5-0.5B's layer widths
(hidden 896, MLP 4864, 14 heads, 2 KV heads) and 2 layers; LoRA on all 7 linears at rank 13 or 96
gives 0.60M or 4.40M parameters (96 x 2 layers = Qwen2.5-0.5B's r=8 x 24 layers). Training is one
step of batch 2 per client (``train.local-steps=1``), the same in both variants, so the difference
is aggregation. Flower's client does not train at all (its fit adds a fixed delta), so the fair
comparison of the two protocols is their overhead over their own plain round; both are reported.

Round 1 loads sites and is left out; each figure is the median of rounds 2..R over the repeats.

    PYTHONPATH=. .venv/bin/python benchmarks/secagg_round.py [--configs 4.4M:10,0.6M:3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RANKS = {"0.6M": 13, "4.4M": 96}
WIDTHS = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
VARIANTS = ("fedtune-plain", "fedtune-secagg", "flower-plain", "flower-secagg")


def build_model(directory: Path) -> Path:
    """The tiny preset's tokenizer on a 2-layer Llama with Qwen2.5-0.5B's widths (built once)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from fedtune.model.tiny import build_tiny_model

    tiny = build_tiny_model(directory.parent / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = AutoConfig.from_pretrained(tiny)  # the tiny family's config, at wider widths
    config.update(WIDTHS)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def fedtune_flat(model: Path, out: Path, n: int, rank: int, rounds: int, protocol: str) -> dict[str, Any]:
    from fedtune.config.presets import preset

    return {
        **preset("tiny"),
        "model.name": str(model),
        "output.dir": str(out),
        "simulation.backend": "shared",
        "simulation.num-supernodes": n,
        "num-server-rounds": rounds,
        "lora.r": rank,
        "lora.alpha": 2 * rank,
        "data.partitioner": "iid",
        "train.local-steps": 1,
        "train.batch-size": 2,
        "eval.federated": False,
        "eval.centralized": False,
        "eval.max-new-tokens": 1,
        "secagg.protocol": protocol,
        "secagg.stage-timeout": 3600.0,
    }


def fedtune_run(model: Path, out: Path, n: int, rank: int, rounds: int, protocol: str) -> list[dict[str, Any]]:
    """Per round: the loop's seconds, its payload bytes, the wire bytes per client and (SecAgg+) stages."""
    from secagg_wire import WireGrid  # a sibling file

    from fedtune.client.app import app as client_app
    from fedtune.config.plan import Plan
    from fedtune.server.app import run_server

    grid = WireGrid(client_app, n)
    run_server(Plan.from_flat(fedtune_flat(model, out, n, rank, rounds, protocol)), grid)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "seconds": row["seconds"],
            "bytes_per_client": (grid.down[str(row["round"])] + grid.up[str(row["round"])]) / n,
            "payload_per_client": (row["bytes_up"] + row["bytes_down"]) / n,
            "stages": row.get("secagg", {}).get("stages"),
            "params": row.get("secagg", {}),
        }
        for row in rows
        if row["round"] >= 1
    ]


def worker(size: str, n: int, rounds: int, repeats: int, work: Path) -> dict[str, Any]:
    """All four variants, interleaved ``repeats`` times, for one size and client count."""
    import numpy as np
    from secagg_flower import flower_run  # a sibling file

    from fedtune.privacy.secagg.graph import default_threshold, effective_degree
    from fedtune.privacy.secagg.settings import auto_degree
    from fedtune.server.checkpoint import load

    model = build_model(work / "model")
    rank = RANKS[size]
    k = effective_degree(n, auto_degree(n))
    result: dict[str, Any] = {"size": size, "clients": n, "rank": rank, "runs": {v: [] for v in VARIANTS}}
    shapes: list[tuple[int, ...]] = []
    for _ in range(repeats):
        for protocol in ("none", "secagg"):
            out = Path(tempfile.mkdtemp(prefix=f"{size}-{n}-{protocol}-", dir=work)) / "run"
            result["runs"][f"fedtune-{'plain' if protocol == 'none' else 'secagg'}"].append(
                fedtune_run(model, out, n, rank, rounds, protocol)
            )
            if not shapes:
                arrays = load(out / "checkpoints" / "round-000").global_arrays
                shapes = [arrays[key].shape for key in sorted(arrays)]
                result["parameters"] = int(sum(np.prod(s) for s in shapes))
        result["runs"]["flower-plain"].append(flower_run(shapes, n, rounds, None))
        result["runs"]["flower-secagg"].append(flower_run(shapes, n, rounds, (k + 1, default_threshold(k))))
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds 2.. of every repeat, per variant."""
    out: dict[str, Any] = {"size": result["size"], "clients": result["clients"], "parameters": result["parameters"]}
    for variant, runs in result["runs"].items():
        rounds = [r for run in runs for r in run[1:]]
        out[variant] = {
            "seconds": statistics.median(r["seconds"] for r in rounds),
            "bytes_per_client": statistics.median(r["bytes_per_client"] for r in rounds),
            "all_seconds": [round(r["seconds"], 3) for r in rounds],
        }
        if variant.startswith("fedtune"):
            out[variant]["payload_per_client"] = statistics.median(r["payload_per_client"] for r in rounds)
        if variant == "fedtune-secagg":
            out["stages"] = rounds[-1]["stages"]
            out["secagg"] = {k: v for k, v in rounds[-1]["params"].items() if k != "stages"}
    return out


def table(summaries: list[dict[str, Any]]) -> str:
    """Markdown: the full table and the ratios."""
    lines = [
        "| params | clients | fedtune plain s | fedtune SecAgg+ s | ratio | Flower plain s | Flower SecAgg+ s | ratio "
        "| fedtune SecAgg+ / Flower SecAgg+ | overhead fedtune / Flower | fedtune bytes ratio | Flower bytes ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        fp, fs, wp, ws = (s[v] for v in VARIANTS)
        overhead = (fs["seconds"] - fp["seconds"]) / max(ws["seconds"] - wp["seconds"], 1e-9)
        lines.append(
            f"| {s['parameters'] / 1e6:.2f}M | {s['clients']} | {fp['seconds']:.2f} | {fs['seconds']:.2f} "
            f"| {fs['seconds'] / fp['seconds']:.2f}× | {wp['seconds']:.2f} | {ws['seconds']:.2f} "
            f"| {ws['seconds'] / wp['seconds']:.2f}× | {fs['seconds'] / ws['seconds']:.2f}× | {overhead:.2f}× "
            f"| {fs['bytes_per_client'] / fp['bytes_per_client']:.3f}× "
            f"| {ws['bytes_per_client'] / wp['bytes_per_client']:.3f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="4.4M:10,0.6M:3,0.6M:10,4.4M:3,0.6M:30,4.4M:30", help="SIZE:CLIENTS,...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder for the model and runs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "SIZE:N", run in a child process
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="secagg-bench-"))
    if args.worker:
        size, n = args.worker.split(":")
        print(json.dumps(worker(size, int(n), args.rounds, args.repeats, work)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    build_model(work / "model")
    summaries, raw = [], []
    for config in args.configs.split(","):  # the goal's configuration first, the slowest last
        start = time.monotonic()
        cmd = [sys.executable, __file__, "--worker", config, "--work", str(work)]
        cmd += ["--rounds", str(args.rounds), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        raw.append(result)
        summaries.append(summarize(result))
        print(f"{config}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        print(table(summaries[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:  # after each configuration, so an interrupted run keeps what finished
            args.json.write_text(json.dumps({"raw": raw, "summaries": summaries}, indent=1))
    print(table(summaries))
    for s in summaries:
        print(f"\n{s['parameters']:,} parameters x {s['clients']} clients, fedtune SecAgg+ {s['secagg']}")
        for name, stage in (s["stages"] or {}).items():
            print(
                f"  {name}: {stage['seconds']:.3f} s, down {stage['bytes_down_per_client']:,.0f} B/client, "
                f"up {stage['bytes_up_per_client']:,.0f} B/client"
            )


if __name__ == "__main__":
    main()
