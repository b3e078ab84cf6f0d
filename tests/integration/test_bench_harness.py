"""bench/ runs end to end on a tiny scenario (it reports numbers; nothing here asserts a speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_a_tiny_scenario(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scenario",
            "bare",
            "--peer",
            "gateway",
            "--rounds",
            "1",
            "--seconds",
            "1",
            "--connections",
            "4",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bare | gateway |" in result.stdout
    [report_file] = tmp_path.glob("bench-*.json")
    report = json.loads(report_file.read_text())
    assert report["machine"]["cores"] >= 1
    assert {"wrk", "python"} <= set(report["tools"])
    by_peer = {r["peer"]: r for r in report["results"]}
    gateway = by_peer["gateway"]
    assert gateway["scenario"] == "bare"
    assert len(gateway["rounds"]) == 1
    assert gateway["rounds"][0]["requests"] > 0
    assert gateway["errors"] == 0
    assert gateway["cpu_us_per_request"] > 0
    assert gateway["peak_rss_mib"] > 0
    assert by_peer["upstream (direct)"]["rounds"][0]["requests"] > 0
