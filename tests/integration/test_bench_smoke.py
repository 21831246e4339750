"""The benchmark harness (bench/) still runs end to end: a tiny quick run, no baseline.

It starts the sinks (nginx when installed, else the Python stand-ins), the component
as `xmpp-push run` in its own process, and floods it from the harness's XMPP server;
every publish must come back answered and the results file must carry the figures
the documentation is made from. The scale-out scenario (2 processes on this machine's
PostgreSQL, each with its own connection of the one component JID) runs too, and direct
mode (the plugin's notifies for users among 20,000 registrations, in SQLite and in
PostgreSQL, counted at the APNs sink; then delegated enables of new users, enables again
and disables, each answered `result` and seen in the rows), each PostgreSQL part unless
PostgreSQL cannot be reached, which the results file then says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PUBLISHES = 300
DIRECT_ROWS = 20_000
ENABLES = 150
WARMUP = 50


def test_quick_benchmark_answers_every_publish_and_writes_its_figures(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--publishes",
            str(PUBLISHES),
            "--warmup",
            str(WARMUP),
            "--enables",
            str(ENABLES),
            "--paced-seconds",
            "1",
            "--no-baseline",
            "--no-ceiling",
            "--no-profile",
            "--no-docs",
            "--results-dir",
            str(tmp_path),
            "--direct-cache",
            str(tmp_path / "direct-cache"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results_file] = tmp_path.glob("*.json")
    results = json.loads(results_file.read_text())

    assert {"machine", "settings", "runs", "ratios", "sinks", "targets"} <= results.keys()
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["libraries"]["slixmpp"]
    runs = {(run["service"], run["mode"]): run for run in results["runs"]}
    assert runs.keys() == {
        ("apns", "window"),
        ("fcm", "window"),
        ("apns", "paced"),
        ("fcm", "paced"),
    }
    for run in runs.values():
        assert run["implementation"] == "project"
        assert run["answered"] == run["sent"] == run["requested"]
        assert run["unanswered"] == 0
        assert run["results"] == run["answered"], run["errors"]
        assert run["publishes_per_s"] > 0
        assert {"p50", "p99", "p99_9", "max", "mean"} <= run["latency_ms"].keys()
        assert run["component"]["peak_rss_mib"] > 10
        assert run["component"]["cpu_cores"] > 0
        assert "cpu_cores" in run["sink"]
    assert runs[("apns", "window")]["requested"] == PUBLISHES
    assert runs[("apns", "paced")]["offered_rate"] > 0
    assert {target["target"] for target in results["targets"]} >= {
        "APNs: ≥ 5,000 publishes/s",
        "project peak RSS ≤ 120 MiB",
    }

    _check_direct_mode(results)

    scaled = results.get("scale_out")
    if scaled is None:
        assert any(note.startswith("scale-out skipped") for note in results["notes"])
        return
    assert scaled["processes"] == 2
    assert scaled["answered"] == scaled["sent"] == scaled["requested"] == PUBLISHES
    assert scaled["results"] == scaled["answered"], scaled["errors"]
    assert scaled["storage"].startswith("postgresql")
    per_process = scaled["per_process"]
    assert len(per_process) == 2
    assert sum(process["answered"] for process in per_process) == PUBLISHES
    for process in per_process:
        assert process["answered"] > 0  # the publishes were spread over both links
        assert process["peak_rss_mib"] > 10
        assert process["exit_code"] == 0
    assert scaled["ratio"] > 0
    assert scaled["single_process"]["label"] == "project-apns-window"


def _check_direct_mode(results: dict[str, Any]) -> None:
    """Every notify answered `result` and pushed once, as counted at the APNs sink."""
    direct = results.get("direct")
    if results["sinks"]["apns"]["kind"] != "nginx":
        assert direct is None
        assert any(note.startswith("direct mode skipped") for note in results["notes"])
        return
    assert direct is not None
    runs = {run["backend"]: run for run in direct["runs"]}
    assert "sqlite" in runs
    if "postgresql" not in runs:
        assert any(
            note.startswith("direct mode on postgresql skipped") for note in results["notes"]
        )
    assert direct["rows"] == DIRECT_ROWS
    assert direct["appserver"]["label"] == "project-apns-window"
    for backend, run in runs.items():
        assert run["label"] == f"project-direct-{backend}"
        assert run["plugin_configures_answered"] == 1
        assert run["sent"] == run["answered"] == run["results"] == PUBLISHES, run["errors"]
        assert run["pushes"] == run["sent"]
        assert run["undelivered"] == run["unexpected_pushes"] == 0
        assert not run["stalled"]
        assert sum(run["pushes_per_second"]) == run["pushes"]
        assert run["pushes_per_s"] > 0
        assert run["ratio"] > 0
        latency = run["latency_ms"]
        assert 0 <= latency["p50"] <= latency["p99"] <= latency["max"] < 30_000
        assert run["component"]["peak_rss_mib"] > 10
        assert run["component"]["cpu_us_per_push"] > 0
        assert run["exit_code"] == 0
        loaded = run["registrations"]
        assert loaded["rows"] == DIRECT_ROWS
        assert loaded["marker"]["rows"] == DIRECT_ROWS
    _check_enables(direct["enable"], set(runs))


def _check_enables(enable: dict[str, Any], backends: set[str]) -> None:
    """Every delegated enable and disable answered `result`, and the rows show it: new
    users' rows written, loaded ones written again, the table back as loaded."""
    assert (enable["count"], enable["warmup"]) == (ENABLES, WARMUP)
    assert {run["backend"] for run in enable["runs"]} == backends
    for run in enable["runs"]:
        phases = {phase["phase"]: phase for phase in run["phases"]}
        assert list(phases) == ["enable_new", "enable_again", "disable"]
        for name, phase in phases.items():
            assert phase["sent"] == phase["answered"] == phase["results"] == ENABLES, phase
            assert phase["errors"] == {}
            assert phase["unanswered"] == phase["unexpected"] == 0
            assert not phase["stalled"]
            assert phase["iqs_per_s"] > 0
            assert 0 <= phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"] < 30_000
            assert phase["component"]["cpu_us_per_iq"] > 0
            assert phase["rows"]["as_expected"], phase["rows"]
            arms = (phase["plugin_arms"], phase["plugin_disarms"])
            assert arms == ((0, ENABLES) if name == "disable" else (ENABLES, 0))
        rows = [phase["rows"] for phase in phases.values()]
        assert [row["table_after"] for row in rows] == [
            DIRECT_ROWS + ENABLES,
            DIRECT_ROWS + ENABLES,
            DIRECT_ROWS,
        ]
        assert rows[0]["users_written"] == rows[1]["users_written"] == ENABLES
        assert (run["rows_after_run"], run["removed_after_run"]) == (DIRECT_ROWS, 0)
        assert run["exit_code"] == 0
