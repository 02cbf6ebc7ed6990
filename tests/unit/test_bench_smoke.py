"""The GPU benchmark scripts, run on the CPU with scaled-down files (their smoke modes), so that a script broken
by a change elsewhere fails here instead of wasting scarce GPU time. These check the scripts' code paths and
the invariants they report (a replayed CUDA-graph loop equals the plain loop; every step ran), never speed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_load_profile_runs_every_step(tmp_path: Path) -> None:
    out_file = tmp_path / "profile.json"
    _run(["bench/load_profile.py", "--weights", str(tmp_path / "w"), "--device", "cpu", "--scale", "tiny",
          "--out", str(out_file)])
    rows = json.loads(out_file.read_text())
    names = [r["name"] for r in rows]
    assert "error" not in names, [r for r in rows if r["name"] == "error"]
    for expected in ("raw read pread 12 threads (0 registering)", "raw read pread default threads, allocator cache kept",
                     "stages rep 1", "cprofile dit+te by tottime",
                     "alloc dit bytes at once rep 1", "alloc dit tensors after reserving rep 1",
                     "cprofile vae by tottime", "concurrent rep 1", "alloc dit tensors rep 1"):
        assert expected in names, names
    stages = next(r for r in rows if r["name"] == "stages rep 1")
    assert stages["sum_loads"] > 0 and stages["vae_plan_build"] > 0
    assert next(r for r in rows if r["name"] == "concurrent rep 1")["ok"] == ["dit", "te", "vae"]


def test_graph_check_replays_equal_plain(tmp_path: Path) -> None:
    out_file = tmp_path / "graph.json"
    _run(["bench/graph_check.py", "--device", "cpu", "--scale", "tiny", "--attention", "fa3", "--fp8-attention",
          "--out", str(out_file)])
    res = json.loads(out_file.read_text())
    # FA3 is CUDA-only: the blocks fall back to SDPA, say so, and fp8 attention stays off
    assert res["attention_note"] and "using PyTorch SDPA" in res["attention_note"] and res["fp8_attention"] is False
    assert res["max_abs_diff"] == 0.0
    assert res["errors"] == [None] * 4
    assert res["replays"] == 0  # no CUDA: StepGraphs passes every call through


def test_bench_pipeline_ours_peers(tmp_path: Path) -> None:
    card = tmp_path / "card.md"
    _run(["bench/bench_pipeline.py", "--smoke", "--weights", str(tmp_path / "w"), "--peers",
          "ours_graph_b4,ours_fp8_graph", "--runs", "1", "--alloc", "async", "--out", str(card)])
    rows = {r["peer"]: r for r in json.loads(card.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"ours_graph_b4", "ours_fp8_graph"}
    for peer, r in rows.items():
        assert "error" not in r, r
        assert r["finite"] and r["graph_vs_plain_max_abs"] == 0.0, r
        assert "CUDA graph" in r["mode"] and "failed" not in r["mode"], r
    assert rows["ours_fp8_graph"]["image_mad_vs_bf16"] is not None
    assert "fp8 matmuls" in rows["ours_fp8_graph"]["mode"]
    b4 = rows["ours_graph_b4"]
    assert b4["batch4_graphs"] and b4["batch4_dit_s"] > 0 and b4["batch4_throughput_x"] > 0, b4
    assert "partial" not in json.loads(card.with_suffix(".json").read_text())
    assert "cudaMallocAsync" in card.read_text()
