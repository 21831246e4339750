"""The figures: JSON in bench/results/<timestamp>.json, a table on the terminal, docs."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from bench.sinks import nginx_version

__all__ = [
    "direct_block",
    "enable_table",
    "machine",
    "render_console",
    "scale_out_block",
    "source_state",
    "update_docs",
    "write_json",
]

LIBRARIES: Final = (
    "xmpp-push",
    "slixmpp",
    "h2",
    "aiohttp",
    "aioapns",
    "google-auth",
    "structlog",
    "cryptography",
    "py-spy",
)
_BLOCK = "<!-- {name}:{edge} -->"
_NAMES: Final = {"apns": "APNs", "fcm": "FCM"}


def _name(service: str) -> str:
    return _NAMES.get(service, service)


def _first_line(path: str, prefix: str) -> str | None:
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    memory = _first_line("/proc/meminfo", "MemTotal")
    os_name = None
    try:
        release = Path("/etc/os-release").read_text()
        found = re.search(r'^PRETTY_NAME="?(.*?)"?$', release, re.M)
        os_name = found.group(1) if found else None
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["nginx"] = nginx_version()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _first_line("/proc/cpuinfo", "model name"),
        "ram_gib": round(int(memory.split()[0]) / 1024 / 1024, 1) if memory else None,
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": versions,
    }


def source_state(repo: Path) -> dict[str, Any]:
    """Which code was measured: the commit, and product files changed since it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "xmpp_push", "pyproject.toml").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_product_files": [line[3:] for line in changed],
    }


def write_json(results: Mapping[str, Any], directory: Path, stamp: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


# --------------------------------------------------------------------------------------
# Tables


def _number(value: object, digits: int = 0) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _run_title(run: Mapping[str, Any]) -> str:
    title = f"{run['implementation']} → {_name(run['service'])}"
    if run["mode"] == "paced":
        title += f" paced {run['offered_rate']:,.0f}/s"
    elif run["mode"] == "soak":
        title += f" soak {run['offered_rate']:,.0f}/s"
    else:
        title += f" (window {run['window']})"
    if run.get("profiled"):
        title += " under py-spy"
    if run.get("attempts", 1) > 1:
        title += f", least disturbed of {run['attempts']} runs"
    return title


def runs_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| scenario | publishes | publishes/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB "
        "| CPU cores | CPU µs/publish | sink cores | other load | answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        latency = run["latency_ms"]
        component = run["component"]
        answers = f"{run['results']:,} result"
        for key, count in sorted(run["errors"].items()):
            answers += f", {count:,} {key}"
        if run["unanswered"]:
            answers += f", **{run['unanswered']:,} unanswered**"
        lines.append(
            f"| {_run_title(run)} | {run['answered']:,} | {_number(run['publishes_per_s'])} "
            f"| {_number(latency['p50'], 1)} | {_number(latency['p99'], 1)} "
            f"| {_number(latency['p99_9'], 1)} | {_number(component['peak_rss_mib'], 1)} "
            f"| {_number(component['cpu_cores'], 2)} | {_number(component['cpu_us_per_publish'])} "
            f"| {_number(run['sink']['cpu_cores'], 3)} "
            f"| {_number(run.get('machine', {}).get('other_cores'), 2)} | {answers} |"
        )
    return lines


def targets_table(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| target | measured | met |", "|---|---:|---|"]
    for target in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        lines.append(f"| {target['target']} | {target['measured']} | {met} |")
    return lines


def sinks_table(sinks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| sink | kind | load (clients) | served req/s | sink cores | req per sink CPU-second "
        "| sink cores in project max run |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for service, sink in sinks.items():
        ceiling = sink.get("ceiling") or {}
        during = sink.get("during_project_max_cores")
        lines.append(
            f"| {_name(service)} | {sink['kind']} | "
            f"{ceiling.get('clients', '–')} × project client | "
            f"{_number(ceiling.get('rate'))} | {_number(ceiling.get('sink_cores'), 3)} | "
            f"{_number(ceiling.get('requests_per_sink_cpu_second'))} | {_number(during, 3)} |"
        )
    return lines


def profile_lines(profiles: Mapping[str, Mapping[str, Any]], top: int = 12) -> list[str]:
    lines: list[str] = []
    for label, profile in profiles.items():
        if not profile.get("samples"):
            lines.append(f"{label}: no samples ({profile.get('error', 'py-spy failed')}).")
            continue
        lines += ["", f"**{label}** ({profile['samples']:,} samples)", ""]
        lines += ["| self time by package | % | self time by function | % |", "|---|---:|---|---:|"]
        packages = profile["self_by_package"]
        functions = profile["self_by_function"]
        for i in range(min(top, max(len(packages), len(functions)))):
            package = packages[i] if i < len(packages) else {"name": "", "percent": ""}
            function = functions[i] if i < len(functions) else {"name": "", "percent": ""}
            lines.append(
                f"| {package['name']} | {package['percent']} "
                f"| `{function['name']}` | {function['percent']} |"
            )
        lines += ["", "| inclusive time by function | % |", "|---|---:|"]
        lines += [
            f"| `{entry['name']}` | {entry['percent']} |"
            for entry in profile["inclusive_by_function"][:top]
        ]
    return lines


def machine_lines(info: Mapping[str, Any]) -> list[str]:
    libraries = ", ".join(
        f"{name} {version}" for name, version in info["libraries"].items() if version
    )
    return [
        f"* {info['cores']} cores, {info['ram_gib']} GiB RAM, {info['cpu_model']}",
        f"* {info['os']}, kernel {info['kernel']}, Python {info['python']}",
        f"* {libraries}",
    ]


def scale_out_table(scaled: Mapping[str, Any]) -> list[str]:
    """The single process, each process of the scale-out run, and all of them together."""
    count = scaled["processes"]
    lines = [
        "| run | publishes | share | publishes/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB "
        "| CPU cores | CPU µs/publish | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single = scaled.get("single_process")
    if single:
        latency = single["latency_ms"]
        component = single["component"]
        lines.append(
            f"| 1 process (project → APNs, window {single['window']}) | {single['answered']:,} "
            f"| | {_number(single['publishes_per_s'])} | {_number(latency['p50'], 1)} "
            f"| {_number(latency['p99'], 1)} | {_number(latency['p99_9'], 1)} "
            f"| {_number(component['peak_rss_mib'], 1)} | {_number(component['cpu_cores'], 2)} "
            f"| {_number(component['cpu_us_per_publish'])} "
            f"| {_number(single.get('other_cores'), 2)} |"
        )
    for process in scaled["per_process"]:
        latency = process["latency_ms"]
        lines.append(
            f"| process {process['process']} of {count} | {process['answered']:,} "
            f"| {process['share']:.1%} | {_number(process['publishes_per_s'])} "
            f"| {_number(latency['p50'], 1)} | {_number(latency['p99'], 1)} "
            f"| {_number(latency['p99_9'], 1)} | {_number(process['peak_rss_mib'], 1)} "
            f"| {_number(process['cpu_cores'], 2)} | {_number(process['cpu_us_per_publish'])} | |"
        )
    latency = scaled["latency_ms"]
    component = scaled["component"]
    answers = ""
    if scaled["unanswered"]:
        answers = f", **{scaled['unanswered']:,} unanswered**"
    for key, errors in sorted(scaled["errors"].items()):
        answers += f", {errors:,} {key}"
    title = f"**{count} processes together**"
    if scaled.get("attempts", 1) > 1:
        title += f", least disturbed of {scaled['attempts']} runs"
    lines.append(
        f"| {title}{answers} | {scaled['answered']:,} | 100% "
        f"| **{_number(scaled['publishes_per_s'])}** | {_number(latency['p50'], 1)} "
        f"| {_number(latency['p99'], 1)} | {_number(latency['p99_9'], 1)} "
        f"| {_number(component['peak_rss_mib'], 1)} (sum) | {_number(component['cpu_cores'], 2)} "
        f"| {_number(component['cpu_us_per_publish'])} "
        f"| {_number(scaled.get('machine', {}).get('other_cores'), 2)} |"
    )
    return lines


def scale_out_summary(scaled: Mapping[str, Any]) -> str:
    return (
        f"{scaled['processes']} processes → APNs: {scaled['publishes_per_s']:,.0f} publishes/s "
        f"together, **{scaled['ratio']:.2f}×** one process "
        f"({scaled['single_process']['publishes_per_s']:,.0f}/s); harness "
        f"{scaled['harness']['cpu_cores']:.2f} cores, APNs sink {scaled['sink']['cpu_cores']:.3f}, "
        f"PostgreSQL {scaled['database']['cpu_cores']:.3f} "
        f"({scaled['database']['backends']} backends)"
    )


_BACKEND_NAMES: Final = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def direct_table(direct: Mapping[str, Any]) -> list[str]:
    """App-server mode's APNs max-rate run of the same invocation, then direct mode on
    each store."""
    lines = [
        "| run | registrations | IQs sent | pushes at the sink | pushes/s | × app-server "
        "| latency p50 ms | p99 ms | p99.9 ms | peak RSS MiB | CPU cores | CPU µs/push "
        "| database cores | sink cores | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    appserver = direct.get("appserver")
    if appserver:
        latency = appserver["latency_ms"]
        component = appserver["component"]
        lines.append(
            f"| app-server mode → APNs (window {appserver['window']}): publish → answer "
            f"| – | {appserver['answered']:,} | {appserver['answered']:,} "
            f"| {_number(appserver['publishes_per_s'])} | 1 | {_number(latency['p50'], 1)} "
            f"| {_number(latency['p99'], 1)} | {_number(latency['p99_9'], 1)} "
            f"| {_number(component['peak_rss_mib'], 1)} | {_number(component['cpu_cores'], 2)} "
            f"| {_number(component['cpu_us_per_publish'])} | – | – "
            f"| {_number(appserver.get('other_cores'), 2)} |"
        )
    for run in direct["runs"]:
        latency = run["latency_ms"]
        component = run["component"]
        title = f"direct mode, {_BACKEND_NAMES.get(run['backend'], run['backend'])}: notify → push"
        if run.get("attempts", 1) > 1:
            title += f", least disturbed of {run['attempts']} runs"
        pushes = f"{run['pushes']:,}"
        if run["undelivered"]:
            pushes += f" (**{run['undelivered']:,} not pushed**)"
        for key, count in sorted(run["errors"].items()):
            pushes += f", {count:,} refused {key}"
        ratio = run.get("ratio")
        lines.append(
            f"| {title} | {run['rows']:,} | {run['sent']:,} | {pushes} "
            f"| **{_number(run['pushes_per_s'])}** "
            f"| {f'{ratio:.2f}' if ratio is not None else '–'} "
            f"| {_number(latency['p50'], 0)} | {_number(latency['p99'], 0)} "
            f"| {_number(latency['p99_9'], 0)} | {_number(component['peak_rss_mib'], 1)} "
            f"| {_number(component['cpu_cores'], 2)} | {_number(component['cpu_us_per_push'])} "
            f"| {_number(run['database']['cpu_cores'], 2) if run['database']['backends'] else '–'} "
            f"| {_number(run['sink']['cpu_cores'], 3)} "
            f"| {_number(run.get('machine', {}).get('other_cores'), 2)} |"
        )
    return lines


def direct_summary(direct: Mapping[str, Any]) -> list[str]:
    """One line per store: the rate, its ratio to app-server mode, the CPU per push."""
    appserver = direct.get("appserver")
    lines = []
    for run in direct["runs"]:
        name = _BACKEND_NAMES.get(run["backend"], run["backend"])
        line = (
            f"{name}, {run['rows']:,} registrations: {run['pushes_per_s']:,.0f} pushes/s, "
            f"{run['component']['cpu_us_per_push']:,.0f} µs of component CPU per push"
        )
        if appserver and run.get("ratio") is not None:
            line += (
                f"; **{run['ratio']:.2f}×** app-server mode's "
                f"{appserver['publishes_per_s']:,.0f} publishes/s and "
                f"{run['cpu_ratio']:.2f}× its "
                f"{appserver['component']['cpu_us_per_publish']:,.0f} µs per publish"
            )
        loading = run.get("registrations", {})
        if loading.get("reloaded"):
            line += f" (registrations loaded in {loading['seconds']:,.1f} s before the run)"
        lines.append(line)
    return lines


def enable_table(enable: Mapping[str, Any]) -> list[str]:
    """Each phase of the delegated enables and disables, on each store."""
    lines = [
        "| store: phase | IQs | answers | IQs/s | p50 ms | p99 ms | p99.9 ms | CPU cores "
        "| CPU µs/IQ | database cores | table rows before → after | the phase's users' rows "
        "| other load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in enable["runs"]:
        store = _BACKEND_NAMES.get(run["backend"], run["backend"])
        if run.get("attempts", 1) > 1:
            store += f" (least disturbed of {run['attempts']} runs)"
        for phase in run["phases"]:
            latency = phase["latency_ms"]
            rows = phase["rows"]
            answers = f"{phase['results']:,} result"
            for key, count in sorted(phase["errors"].items()):
                answers += f", **{count:,} {key}**"
            if phase["unanswered"]:
                answers += f", **{phase['unanswered']:,} unanswered**"
            users = f"{rows['users_before']:,} → {rows['users_after']:,}"
            if phase["phase"] != "disable":
                users += f", {rows['users_written']:,} written"
            if not rows["as_expected"]:
                users += f" (**expected {rows['expected']}**)"
            database = phase["database"]
            lines.append(
                f"| {store}: {phase['title']} | {phase['sent']:,} | {answers} "
                f"| **{_number(phase['iqs_per_s'])}** | {_number(latency['p50'], 1)} "
                f"| {_number(latency['p99'], 1)} | {_number(latency['p99_9'], 1)} "
                f"| {_number(phase['component']['cpu_cores'], 2)} "
                f"| {_number(phase['component']['cpu_us_per_iq'])} "
                f"| {_number(database['cpu_cores'], 2) if database['backends'] else '–'} "
                f"| {rows['table_before']:,} → {rows['table_after']:,} | {users} "
                f"| {_number(phase.get('machine', {}).get('other_cores'), 2)} |"
            )
    return lines


def enable_summary(enable: Mapping[str, Any]) -> list[str]:
    """One line per store: each phase's rate and CPU per IQ, and the table afterwards."""
    lines = []
    for run in enable["runs"]:
        name = _BACKEND_NAMES.get(run["backend"], run["backend"])
        phases = "; ".join(
            f"{phase['title']} {phase['iqs_per_s']:,.0f}/s "
            f"({phase['component']['cpu_us_per_iq']:,.0f} µs CPU/IQ)"
            for phase in run["phases"]
        )
        line = f"{name}, {run['rows']:,} registrations: {phases}"
        if run["rows_after_run"] == run["rows"] and not run["removed_after_run"]:
            line += f"; {run['rows_after_run']:,} rows afterwards, as loaded"
        else:
            line += (
                f"; **{run['rows_after_run']:,} rows afterwards**, "
                f"{run['removed_after_run']:,} not loaded removed"
            )
        lines.append(line)
    return lines


def _enable_lines(direct: Mapping[str, Any]) -> list[str]:
    enable = direct.get("enable")
    if not enable or not enable["runs"]:
        return []
    return [
        "",
        "### Enables and disables through the component",
        "",
        "The harness, still playing the server, sends clients' `<enable/>` and "
        "`<disable/>` delegated to the component (XEP-0355) in the shape Prosody 0.12.3's "
        "mod_delegation forwards them (PROTOCOLS.md §2: a wrapper from the server domain, "
        "no `to` on the client's IQ; the enable's form names an APNs device), to a fresh "
        "component process on each store after its notify run, with the loaded "
        f"registrations in it. Three phases of {enable['count']:,} IQs, after "
        f"{enable['warmup']:,} warm-up IQs of each: enables of users not among the "
        "loaded rows (a row inserted each), enables of loaded users with exactly what they "
        "registered, as every app start sends again (the row rewritten), and disables, "
        "with the node, of what the first phase added (the table ends as loaded). "
        f"{enable['window']} IQs outstanding; {enable['counted']}. Each enable also arms "
        "the session at the server plugin (`arm`, answered by the harness) and each "
        "disable that takes a session's last registration disarms it. CPU µs/IQ is the "
        "component's CPU over the phase per answered IQ; database cores are the "
        "PostgreSQL server processes serving it.",
        "",
        *enable_table(enable),
        "",
        *(f"* {line}." for line in enable_summary(enable)),
    ]


def direct_block(results: Mapping[str, Any]) -> str:
    direct = results["direct"]
    workload = direct["workload"]
    body = [
        "## Direct mode: notifies → lookups → APNs",
        "",
        f"Measured {results['date']} with `{results['command']}` "
        f"(results file `{results['results_file']}`), after that invocation's app-server "
        "runs (the first row: its project → APNs max-rate run).",
        "",
        "The harness plays the XMPP server with the server plugin in it "
        "(docs/plugin-protocol.md): it answers the component's `configure` as "
        "plugins/prosody/mod_xmpp_push.lua does, then sends `notify` IQs in the shape "
        "Prosody 0.12.3 with that plugin wrote them (`state='offline'`, a chat message, "
        f"sender shown, no body), each for another of {direct['rows']:,} users "
        f"`user<i>@{workload['server_domain']}`, who have one registration each (an APNs "
        "device) in the component's store: SQLite, or PostgreSQL on this machine. "
        "Every notify is a store lookup (no user is notified twice by one process, so "
        "coalescing never merges two, and PostgreSQL's per-user cache never hits) and "
        "one push. The component answers a notify before it pushes, so the figures are "
        "taken at the APNs sink, which logs each direct-mode push with nginx's `$msec`: "
        f"{direct['counted']}. The window is the app-server runs' ({direct['window']}), "
        f"counted to the push instead of the answer; {direct['notifies']:,} notifies "
        f"measured after {direct['warmup']:,} warm-up ones. CPU µs/push is the "
        "component's CPU over the run per push, answering the notify included; database "
        "cores are the PostgreSQL server processes serving it.",
        "",
        *direct_table(direct),
        "",
        *(f"* {line}." for line in direct_summary(direct)),
        *_enable_lines(direct),
    ]
    others = [run.get("machine", {}).get("other_cores") for run in direct["runs"]]
    others += [run["machine"]["other_cores"] for run in direct.get("enable", {}).get("runs", [])]
    if direct.get("appserver"):
        others.append(direct["appserver"].get("other_cores"))
    noisy = max((float(other) for other in others if other is not None), default=0.0)
    if noisy > direct.get("noisy_cores", 0.3):
        body.append(
            f"* **Disturbed**: other processes used up to {noisy:.2f} cores during these "
            "runs (the `other load` column); measure again on an idle machine."
        )
    return _block("direct", body)


def soak_lines(soak: Mapping[str, Any]) -> list[str]:
    rss = soak["rss"]
    run = soak["run"]
    samples = rss["samples_mib"]
    every = max(1, len(samples) // 24)
    flat = "yes" if rss["flat"] else "**no**"
    latency = run["latency_ms"]
    source = soak.get("source", {})
    code = f", code at commit {source['commit']}" if source.get("commit") else ""
    return [
        f"`{soak['command']}` on {soak['date']}{code}: project → APNs paced at "
        f"{run['offered_rate']:,.0f} publishes/s for {soak['seconds']:,.0f} s "
        f"({run['answered']:,} answered, {run['unanswered']:,} unanswered; "
        f"p50 {_number(latency['p50'], 1)} ms, p99 {_number(latency['p99'], 1)} ms, "
        f"p99.9 {_number(latency['p99_9'], 1)} ms).",
        "",
        "| RSS after warm-up | RSS at the end | growth after warm-up | growth in the 2nd half "
        "| trend | peak RSS (VmHWM) | flat (≤ 5 MiB after warm-up) |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| {rss['after_warmup_mib']:.1f} MiB at {rss['warmup_seconds']:.0f} s "
        f"| {rss['final_mib']:.1f} MiB | {rss['growth_mib']:+.1f} MiB "
        f"| {rss.get('second_half_growth_mib', float('nan')):+.1f} MiB "
        f"| {rss['slope_mib_per_10min']:+.2f} MiB/10 min | {rss['peak_mib']:.1f} MiB | {flat} |",
        "",
        "RSS samples (s → MiB): " + ", ".join(f"{t:.0f}→{mib:.1f}" for t, mib in samples[::every]),
    ]


# --------------------------------------------------------------------------------------
# Terminal


def render_console(results: Mapping[str, Any]) -> str:
    lines = [""]
    if results.get("runs"):
        lines += runs_table(results["runs"])
    ratios = results.get("ratios", {})
    if ratios:
        lines.append("")
        lines += [
            f"project/baseline {_name(service)}: {ratio:.2f}×" for service, ratio in ratios.items()
        ]
    if results.get("scale_out"):
        lines += ["", *scale_out_table(results["scale_out"]), ""]
        lines.append(scale_out_summary(results["scale_out"]).replace("**", ""))
    if results.get("direct"):
        lines += ["", *direct_table(results["direct"]), ""]
        lines += [line.replace("**", "") for line in direct_summary(results["direct"])]
        enable = results["direct"].get("enable")
        if enable and enable["runs"]:
            lines += ["", *(line.replace("**", "") for line in enable_table(enable)), ""]
            lines += [line.replace("**", "") for line in enable_summary(enable)]
    if results.get("sinks"):
        lines += ["", *sinks_table(results["sinks"])]
    if results.get("targets"):
        lines += ["", *targets_table(results["targets"])]
    lines += [f"* {note}" for note in results.get("notes", [])]
    if results.get("soak"):
        lines += ["", *soak_lines(results["soak"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# docs/performance.md

_INTRO: Final = """\
# Performance

<!-- Written by bench/report.py: `bench/run` replaces this intro, the results
     block, the scale-out block and the direct-mode block, `bench/run --soak 600` the
     soak block; everything else in this file (the findings, bench/registrations.py's
     section) is left as it is. -->

How fast xmpp-push answers XEP-0357 publishes and delivers them, next to the
straightforward implementation (slixmpp `ComponentXMPP` + `xep_0060` + `iq.reply()` +
aioapns / aiohttp, in `bench/baseline.py`), on one machine. Run it with

```sh
bench/run                # full run: ~5 minutes idle (the first: +1.5 to load 1M registrations)
bench/run --quick        # 5,000 publishes per scenario, no profiles, ~1 minute
bench/run --soak 600     # 10 minutes at half the maximum rate, RSS sampled every 5 s
```

How it measures (details in `bench/README.md`): the harness plays the XMPP server
(XEP-0114) and sends publishes in Prosody's and ejabberd's exact shapes
(PROTOCOLS.md §1.2) to 100,000 distinct device tokens, keeping a window of IQs
outstanding (maximum rate) or pacing them (latency at half that rate). The component
is a separate process started as in production (`python -m xmpp_push.cli run`), the
baseline too (`python -m bench.baseline`); RSS is the kernel's high-water mark of that
process, CPU its user+system time over the measured run. Pushes go to nginx sinks on
loopback, one process each (APNs: HTTP/2 over TLS; FCM: HTTP/2 over TLS for the
project, HTTP/1.1 for the baseline's aiohttp, as ALPN picks). Latency is publish sent →
reply read, at the harness; direct mode's notifies are counted where their pushes
arrive (the APNs sink), its enables and disables by their answers.
"""


def _block(name: str, body: Sequence[str]) -> str:
    return "\n".join(
        [_BLOCK.format(name=name, edge="begin"), *body, _BLOCK.format(name=name, edge="end")]
    )


def _existing_block(text: str, name: str) -> str | None:
    begin = _BLOCK.format(name=name, edge="begin")
    end = _BLOCK.format(name=name, edge="end")
    start = text.find(begin)
    stop = text.find(end)
    if start < 0 or stop < 0:
        return None
    return text[start : stop + len(end)]


def results_block(results: Mapping[str, Any]) -> str:
    body = [
        f"Measured {results['date']} with `{results['command']}` "
        f"(results file `{results['results_file']}`).",
        "",
        *runs_table(results["runs"]),
        "",
    ]
    ratios = results.get("ratios", {})
    body += [
        f"* project / baseline, {_name(service)}: **{ratio:.2f}×** publishes/s"
        for service, ratio in ratios.items()
    ]
    body += ["", "### Targets", "", *targets_table(results["targets"])]
    body += [
        "",
        "### Sinks",
        "",
        "Each sink's own ceiling: the project's provider client, several processes, "
        "straight at the sink (no XMPP). The rate served is what those Python clients "
        "manage on 2 cores; the sink's capacity is its requests per CPU-second (one core "
        "of nginx), against the share of a core it used while the project ran flat out.",
        "",
        *sinks_table(results["sinks"]),
    ]
    notes = results.get("notes", [])
    if notes:
        body += ["", *(f"* {note}" for note in notes)]
    if results.get("profiles"):
        body += [
            "",
            "### Where the component spends its time",
            "",
            "py-spy (`--gil`: the Python work of the event loop), sampling the component "
            "during a separate max-rate run; raw stacks in bench/results/.",
            *profile_lines(results["profiles"]),
        ]
    body += ["", "### Machine", "", *machine_lines(results["machine"])]
    source = results.get("source", {})
    if source.get("commit"):
        changed = source.get("uncommitted_product_files") or []
        body.append(
            f"* code: commit {source['commit']}"
            + (f" plus uncommitted changes to {len(changed)} product files" if changed else "")
        )
    return _block("results", ["## Results", "", *body])


def scale_out_block(results: Mapping[str, Any]) -> str:
    scaled = results["scale_out"]
    single = scaled["single_process"]
    count = scaled["processes"]
    cores = results["machine"]["cores"]
    harness = scaled["harness"]["cpu_cores"]
    body = [
        "## Scale-out: several processes",
        "",
        f"Measured {results['date']} with `{results['command']}` "
        f"(results file `{results['results_file']}`), after that invocation's "
        "single-process run to APNs (the first row).",
        "",
        f"{count} × `python -m xmpp_push.cli run` on this {cores}-core machine, the same "
        f"config for each: `[storage] url` = PostgreSQL on this machine "
        f"(`{scaled['storage']}`, made once and brought to HEAD with `xmpp-push db "
        f"upgrade`), the same APNs sink, and each its own connection of the one component "
        f"JID `{scaled['component_jid']}` to the harness. The harness spreads the publishes "
        "as ejabberd does (below): each to a connection picked at random, "
        f"{scaled['window']} IQs outstanding over all connections together, the same "
        "window as the single process had; a random pick, not one window per connection, "
        "because ejabberd's router does not look at how busy a connection is. "
        "Latency is over all answers; peak RSS and CPU as above, per process.",
        "",
        *scale_out_table(scaled),
        "",
        f"* {scale_out_summary(scaled)}.",
    ]
    others = [scaled.get("machine", {}).get("other_cores"), single.get("other_cores")]
    noisy = max((float(other) for other in others if other is not None), default=0.0)
    if noisy > scaled.get("noisy_cores", 0.3):
        body.append(
            f"* **Disturbed**: other processes used up to {noisy:.2f} cores during these "
            "runs (the `other load` column), so the ratio says little; measure again on "
            "an idle machine."
        )
    body += [
        "",
        "### How it scales",
        "",
        f"* **Processes and cores.** One process is one event loop on one core: at its "
        f"maximum rate the single process used {single['component']['cpu_cores']:.2f} of "
        f"a core. More processes add throughput only while there are idle cores: here "
        f"{count} processes share {cores} cores with the harness (the XMPP server, "
        f"{harness:.2f} cores), nginx and the kernel's loopback traffic, so the ratio "
        f"above ({scaled['ratio']:.2f}×) is what {count} processes get from {cores} "
        f"shared cores; {count}× needs {count} cores left to the component alone. "
        "On a server, run one process per core left over by the XMPP server and "
        "the database; the processes share no state that would make one wait for "
        "another.",
        "* **What is shared.** PostgreSQL, and in app-server mode nothing else: each "
        "process reads the device from the publish, so the database is off the push path "
        f"(its {scaled['database']['backends']} backends for these processes used "
        f"{scaled['database']['cpu_cores']:.3f} cores during the run; it holds the "
        "direct-mode registrations, and its LISTEN/NOTIFY keeps each process's cache of "
        "them current). Each process has its own connections to APNs and FCM and its own "
        "tokens (JWT, OAuth).",
        "* **Per process.** The coalescing windows (`policy.coalesce_window`, direct mode) "
        "and the retry queue (`policy.max_pending_retries`) are each process's own: two "
        "messages for one device that reach different processes are pushed twice instead "
        "of merged, and a process that stops takes its queued retries with it (SIGTERM "
        "drains in-flight deliveries for `policy.drain_timeout`).",
        "* **Balancing on the real servers** (checked on Prosody 0.12 and ejabberd 23.01). "
        "Prosody refuses a second connection for a component JID it has one for (stream "
        "error `conflict`): with Prosody each process needs its own component JID "
        "(`[component] jid`, one `Component` entry each), and the load splits by which "
        "JID the devices registered with. ejabberd accepts several connections of one "
        "component JID and spreads stanzas over them, per stanza at random "
        "(`ejabberd_router:balancing_route` without `domain_balancing`; 200 messages "
        "came out 99/101), whatever each connection has outstanding: a slow process gets "
        "as many as a fast one. That is what this run models.",
    ]
    return _block("scaleout", body)


def _replace_block(text: str, name: str, block: str, after: str | None = None) -> str:
    """`text` with block `name` replaced by `block`; a missing one goes after block
    `after` (when there is one) or at the end."""
    old = _existing_block(text, name)
    if old is not None:
        return text.replace(old, block, 1)
    previous = _existing_block(text, after) if after else None
    if previous is not None:
        return text.replace(previous, previous + "\n\n" + block, 1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_docs(
    path: Path, results: Mapping[str, Any] | None, soak: Mapping[str, Any] | None
) -> None:
    """Replace this benchmark's blocks of `path` (the intro, and the results with the
    scale-out and direct mode, or the soak, when given), adding any that are missing;
    every other byte stays as it is, since others write parts of the file too
    (bench/registrations.py, the findings)."""
    text = path.read_text() if path.is_file() else ""
    if not text.strip():
        text = "\n\n".join(
            [
                _block("intro", [_INTRO.rstrip("\n")]),
                _block("results", ["## Results", "", "Not measured yet: run `bench/run`."]),
                _block("soak", ["## Soak", "", "Not measured yet: run `bench/run --soak 600`."]),
            ]
        )
    if _existing_block(text, "intro") is None:
        text = _block("intro", [_INTRO.rstrip("\n")]) + "\n\n" + text
    text = _replace_block(text, "intro", _block("intro", [_INTRO.rstrip("\n")]))
    if results:
        text = _replace_block(text, "results", results_block(results))
        if results.get("scale_out"):
            text = _replace_block(text, "scaleout", scale_out_block(results), after="results")
        if results.get("direct"):
            after = "scaleout" if _existing_block(text, "scaleout") is not None else "results"
            text = _replace_block(text, "direct", direct_block(results), after=after)
    if soak:
        text = _replace_block(text, "soak", _block("soak", ["## Soak", "", *soak_lines(soak)]))
    path.write_text(text.rstrip("\n") + "\n")
