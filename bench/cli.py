"""`python -m bench`: run every scenario, write the figures, compare with the baseline.

The plan of a default run (each scenario in a fresh component process):

1. project → APNs and project → FCM at the maximum rate (a window of outstanding IQs);
2. project → APNs and → FCM paced at half the maximum rate just measured (latency);
3. scale-out: `--processes` project processes (2) on one PostgreSQL database, each with
   its own connection of the one component JID, → APNs at the maximum rate, against
   step 1's single process;
4. baseline → APNs and → FCM at the maximum rate;
5. direct mode: the server plugin's notifies for users among `--direct-rows` (1,000,000)
   registrations, in SQLite and in PostgreSQL, → APNs at the maximum rate, pushes
   counted at the sink (bench.direct), against step 1's APNs run; then, on each store,
   `--enables` delegated enables of new users, enables again and disables, answers
   counted (bench.enables);
6. each sink's own ceiling, loaded straight by the project's provider client;
7. py-spy profiles of the project during two more max-rate runs (not in the figures).

`--soak SECONDS` instead runs the project → APNs paced for that long, sampling RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import report
from bench.direct import (
    BACKENDS,
    DEFAULT_ROWS,
    PLUGIN_SERVER,
    QUICK_ROWS,
    DirectWorkload,
    RequestLog,
    deliver,
    direct_database_url,
    remove_added_rows,
)
from bench.enables import ADVERTISEMENT, PHASE_TITLES, PHASES, EnablePlan, count_phase_rows
from bench.processes import (
    IMPLEMENTATIONS,
    POSTGRESQL_URL,
    REPO,
    SECRET,
    DatabaseUnavailable,
    RunningComponent,
    database_backends,
    prepare_postgresql,
    upgrade_database,
    write_config,
)
from bench.procstat import CpuClock, RssSampler, machine_busy_seconds, wait_for_quiet
from bench.profiling import PySpy, pyspy_path, summarise
from bench.sinks import Sink, start_sink
from bench.workload import COMPONENT_JID, AppServerWorkload, TokenSet, Workload
from bench.xmppserver import ComponentLink, LoadServer, RunResult, percentiles_ms, run_on_links

__all__ = ["main"]

SERVICES: Final = ("apns", "fcm")
WORKLOADS: dict[str, Callable[[TokenSet], Workload]] = {"appserver": AppServerWorkload}
"""Publish workloads by `--mode`. Direct mode's (bench.direct) is a scenario of its own
(`--no-direct`), since its figure is taken at the sink, not from the answers."""

TARGET_RATE: Final = 5_000.0
TARGET_RATIO: Final = 5.0
TARGET_P99_MS: Final = 20.0
TARGET_RSS_MIB: Final = 120.0
SOAK_FLAT_MIB: Final = 5.0
QUIET_CORES: Final = 0.15
"""Machine load below which a scenario may start (nothing of ours runs then)."""
NOISY_CORES: Final = 0.3
"""CPU used outside the benchmark's processes above which a run is flagged (below it:
mostly the kernel's own work for the loopback traffic)."""


@dataclass(frozen=True)
class Scenario:
    implementation: str
    service: str
    mode: str
    """"window" (maximum rate), "paced", "soak" or "scaleout" (window, several processes)."""
    publishes: int
    window: int
    rate: float | None = None
    profile: bool = False
    sample_every: float = 0.5
    processes: int = 1

    @property
    def label(self) -> str:
        label = f"{self.implementation}-{self.service}-{self.mode}"
        if self.mode == "scaleout":
            label += f"-{self.processes}"
        return label + "-profiled" if self.profile else label


@dataclass
class Bench:
    args: argparse.Namespace
    directory: Path
    server: LoadServer
    sinks: dict[str, Sink]
    stamp: str
    tokens: dict[str, TokenSet] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def workload(self, service: str) -> Workload:
        if service not in self.tokens:
            self.tokens[service] = TokenSet(service, self.args.tokens)
        return WORKLOADS[self.args.mode](self.tokens[service])

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class ScenarioFailed(RuntimeError):
    pass


async def _connect(bench: Bench, component: RunningComponent) -> ComponentLink:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not component.alive:
            raise ScenarioFailed(
                f"{component.implementation.name} exited before connecting:\n{component.log_tail()}"
            )
        with contextlib.suppress(TimeoutError):
            return await bench.server.next_link(timeout=0.5)
    raise ScenarioFailed(f"no handshake within 60 s:\n{component.log_tail()}")


async def _connect_configured(bench: Bench, component: RunningComponent) -> ComponentLink:
    """`_connect`, then wait until the component's `configure` of the server plugin
    was answered (direct mode: notifies and enables need a configured link)."""
    link = await _connect(bench, component)
    try:
        await asyncio.wait_for(asyncio.shield(link.configured), 15)
    except TimeoutError:
        raise ScenarioFailed(f"no configure within 15 s:\n{component.log_tail()}") from None
    return link


def _rusage_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_scenario(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    """Run `scenario`; again (up to --retries times) while other load disturbed it."""
    return await _least_disturbed(bench, scenario.label, lambda: _run_once(bench, scenario))


async def _least_disturbed(
    bench: Bench, label: str, once: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    record = await once()
    for attempt in range(bench.args.retries):
        if record["machine"]["other_cores"] <= NOISY_CORES:
            break
        bench.log(f"  disturbed: running {label} again ({attempt + 1})")
        again = await once()
        again["attempts"] = attempt + 2
        if again["machine"]["other_cores"] < record["machine"]["other_cores"]:
            record = again
        else:
            record["attempts"] = attempt + 2
    return record


def _write_config(
    bench: Bench, label: str, sections: dict[str, dict[str, object]], *, overrides: bool = True
) -> Path:
    """The component's config for one scenario: the workload's `sections`, then (for
    the project, not the baseline) the command line's `--set` values over them."""
    if overrides:
        for section, values in bench.args.overrides.items():
            sections.setdefault(section, {}).update(values)
    return write_config(
        bench.directory / f"{label}.toml", port=bench.server.port, sinks=bench.sinks, extra=sections
    )


async def _run_once(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    args = bench.args
    workload = bench.workload(scenario.service)
    await workload.prepare(bench.directory)
    config = _write_config(
        bench,
        scenario.label,
        workload.config_sections(),
        overrides=scenario.implementation == "project",
    )
    component = RunningComponent(
        IMPLEMENTATIONS[scenario.implementation], config, bench.directory / f"{scenario.label}.log"
    )
    what = f"{scenario.label}: {scenario.publishes:,} publishes"
    if scenario.rate:
        what += f" at {scenario.rate:,.0f}/s"
    waited = await _quiet(bench)
    bench.log(what)
    await component.start()
    profiler: PySpy | None = None
    try:
        link = await _connect(bench, component)
        warmup = await link.run(
            workload, label="warmup", start=0, count=args.warmup, window=scenario.window
        )
        if warmup.unanswered:
            raise ScenarioFailed(f"warm-up: {warmup.unanswered} unanswered\n{component.log_tail()}")
        if scenario.profile:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            raw = args.results_dir / f"{bench.stamp}-{scenario.label}.pyspy.txt"
            profiler = PySpy(component.pid, raw)
            await profiler.start()
        sink_clock = bench.sinks[scenario.service].cpu_clock()
        component_clock = CpuClock([component.pid])
        sampler = RssSampler(component.pid, scenario.sample_every)
        harness_cpu = _rusage_cpu()
        machine_busy = machine_busy_seconds()
        sink_clock.start()
        component_clock.start()
        sampler.start()
        result = await link.run(
            workload,
            label=scenario.label,
            start=args.warmup,
            count=scenario.publishes,
            window=scenario.window,
            rate=scenario.rate,
            stall_timeout=args.stall_timeout,
        )
        component_clock.stop()
        sink_clock.stop()
        machine_busy = machine_busy_seconds() - machine_busy
        await sampler.stop()
        harness_cpu = _rusage_cpu() - harness_cpu
        peak_kib = component.peak_rss_kib()
        profile: dict[str, Any] | None = None
        if profiler is not None:
            profile = await _finish_profile(profiler)
            profiler = None
    finally:
        if profiler is not None:
            await profiler.stop()
        await component.stop()
    record = _record(scenario, result, component_clock, sink_clock, harness_cpu, peak_kib)
    ours = component_clock.cpu + sink_clock.cpu + harness_cpu
    record["machine"] = {
        "busy_cores": machine_busy / component_clock.wall,
        "other_cores": max(0.0, machine_busy - ours) / component_clock.wall,
        "waited_for_quiet_s": round(waited, 1),
    }
    record["rss_samples_mib"] = [(round(t, 1), round(kib / 1024, 1)) for t, kib in sampler.samples]
    record["exit_code"] = component.exit_code
    if profile is not None:
        record["profile"] = profile
    latency = record["latency_ms"]
    bench.log(
        f"  {record['publishes_per_s']:,.0f}/s, p50 {latency['p50']:.1f} ms, "
        f"p99 {latency['p99']:.1f} ms, peak RSS {record['component']['peak_rss_mib']:.1f} MiB, "
        f"CPU {record['component']['cpu_cores']:.2f} cores"
        + (f", {result.unanswered} UNANSWERED" if result.unanswered else "")
        + (f", errors {result.errors}" if result.errors else "")
    )
    other = record["machine"]["other_cores"]
    if other > NOISY_CORES:
        bench.log(f"  WARNING: other processes used {other:.2f} cores during this run")
    return record


async def _quiet(bench: Bench) -> float:
    """Let other work on the machine (a test run, a build) finish before measuring."""
    if bench.args.quiet_wait <= 0:
        return 0.0
    waited, quiet = await wait_for_quiet(bench.args.quiet_wait, QUIET_CORES)
    if waited > 4:
        state = "quiet" if quiet else "still busy; measuring anyway"
        bench.log(f"waited {waited:.0f} s for the machine to quiet down ({state})")
    return waited


async def _finish_profile(profiler: PySpy) -> dict[str, Any]:
    if not await profiler.stop():
        return {"samples": 0, "error": profiler.log.read_text(errors="replace")[-500:]}
    summary = summarise(profiler.output)
    summary["raw"] = str(_relative(profiler.output))
    return summary


def _record(
    scenario: Scenario,
    result: RunResult,
    component_clock: CpuClock,
    sink_clock: CpuClock,
    harness_cpu: float,
    peak_kib: int,
) -> dict[str, Any]:
    latency = result.percentiles_ms(50, 99, 99.9, 100)
    latency["max"] = latency.pop("p100")
    latency["mean"] = (
        1000 * sum(result.latencies) / len(result.latencies) if result.latencies else float("nan")
    )
    answered = max(result.answered, 1)
    return {
        "label": scenario.label,
        "implementation": scenario.implementation,
        "service": scenario.service,
        "mode": scenario.mode,
        "profiled": scenario.profile,
        "window": scenario.window,
        "offered_rate": scenario.rate,
        **result.counts(),
        "late_sends": result.late_sends,
        "stalled": result.stalled,
        "seconds": round(result.seconds, 3),
        "publishes_per_s": result.rate,
        "send_rate": result.send_rate,
        "latency_ms": latency,
        "answers_per_second": result.timeline,
        "component": {
            "peak_rss_mib": peak_kib / 1024,
            "cpu_cores": component_clock.cores,
            "cpu_us_per_publish": 1e6 * component_clock.cpu / answered,
        },
        "sink": {
            "cpu_cores": sink_clock.cores,
            "cpu_us_per_request": 1e6 * sink_clock.cpu / answered,
        },
        "harness": {"cpu_cores": harness_cpu / max(component_clock.wall, 1e-9)},
    }


async def measure_ceiling(bench: Bench, service: str) -> dict[str, Any]:
    """Load the sink with `clients` processes of the project's provider client."""
    args = bench.args
    clients = args.ceiling_clients
    config = write_config(
        bench.directory / f"ceiling-{service}.toml", port=bench.server.port, sinks=bench.sinks
    )
    await _quiet(bench)
    bench.log(f"ceiling of the {service} sink: {clients} × {args.ceiling_requests:,} requests")
    command = [
        sys.executable,
        "-m",
        "bench.ceiling",
        "--config",
        str(config),
        "--service",
        service,
        "--count",
        str(args.ceiling_requests),
        "--concurrency",
        "1000" if service == "apns" else "200",
    ]
    clock = bench.sinks[service].cpu_clock()
    clock.start()
    processes = [
        await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        for _ in range(clients)
    ]
    outputs = await asyncio.gather(*(process.communicate() for process in processes))
    clock.stop()
    figures = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        if process.returncode != 0 or not out.strip():
            raise ScenarioFailed(f"ceiling client failed: {err.decode(errors='replace')[-2000:]}")
        figures.append(json.loads(out.decode().strip().splitlines()[-1]))
    requests = sum(int(f["sent"]) for f in figures)
    failed = sum(int(f["failed"]) for f in figures)
    rate = requests / clock.wall
    ceiling = {
        "clients": clients,
        "requests": requests,
        "failed": failed,
        "seconds": round(clock.wall, 3),
        "rate": rate,
        "per_client_rates": [round(float(f["rate"])) for f in figures],
        "sink_cores": clock.cores,
        "requests_per_sink_cpu_second": requests / clock.cpu if clock.cpu > 0 else float("inf"),
    }
    bench.log(
        f"  {rate:,.0f} req/s with the sink at {clock.cores:.3f} cores "
        f"({ceiling['requests_per_sink_cpu_second']:,.0f} req per sink CPU-second)"
    )
    return ceiling


# --------------------------------------------------------------------------------------
# Scale-out

BALANCING: Final = (
    "one component JID, one connection per process; each publish to a connection picked "
    "at random, one window of outstanding IQs over all of them (ejabberd's router without "
    "domain_balancing: phash2(system_time) per stanza, blind to each connection's backlog)"
)


async def scale_out(bench: Bench, single: Mapping[str, Any]) -> dict[str, Any] | None:
    """`--processes` project processes sharing the PostgreSQL database, each with its
    own connection of the one component JID, → APNs at the maximum rate; against
    `single`, the one-process APNs window run of this invocation. None when the
    database cannot be used (a note says why)."""
    args = bench.args
    scenario = Scenario(
        "project", "apns", "scaleout", args.publishes, args.window, processes=args.processes
    )
    workload = bench.workload(scenario.service)
    await workload.prepare(bench.directory)
    # Every process the same config, as a deployment behind one JID has.
    sections = workload.config_sections()
    sections.setdefault("storage", {})["url"] = args.postgresql_url
    config = _write_config(bench, scenario.label, sections)
    try:
        await prepare_postgresql(args.postgresql_url)
        upgraded = await upgrade_database(config)
    except DatabaseUnavailable as exc:
        bench.log(f"{scenario.label}: skipped: {exc}")
        bench.notes.append(f"scale-out skipped: {exc}")
        return None
    bench.log(f"database: {upgraded}")
    record = await _least_disturbed(
        bench, scenario.label, lambda: _scale_out_once(bench, scenario, config)
    )
    record["storage"] = _safe_url(args.postgresql_url)
    record["database_upgrade"] = upgraded
    record["single_process"] = {
        key: single[key]
        for key in ("label", "publishes_per_s", "latency_ms", "component", "window", "answered")
    }
    record["single_process"]["other_cores"] = single.get("machine", {}).get("other_cores")
    record["ratio"] = record["publishes_per_s"] / max(single["publishes_per_s"], 1e-9)
    record["noisy_cores"] = NOISY_CORES
    bench.log(
        f"  {record['processes']} processes: {record['ratio']:.2f}× the single process "
        f"({single['publishes_per_s']:,.0f}/s)"
    )
    return record


async def _scale_out_once(bench: Bench, scenario: Scenario, config: Path) -> dict[str, Any]:
    args = bench.args
    workload = bench.workload(scenario.service)
    count = scenario.processes
    components = [
        RunningComponent(
            IMPLEMENTATIONS["project"],
            config,
            bench.directory / f"{scenario.label}-process{slot + 1}.log",
        )
        for slot in range(count)
    ]
    waited = await _quiet(bench)
    bench.log(
        f"{scenario.label}: {scenario.publishes:,} publishes over {count} processes "
        f"(one window of {scenario.window})"
    )
    try:
        # One after the other, so that link i is process i's connection.
        links: list[ComponentLink] = []
        for component in components:
            await component.start()
            links.append(await _connect(bench, component))
        warmups = await asyncio.gather(
            *(
                link.run(
                    workload,
                    label="warmup",
                    start=slot * args.warmup,
                    count=args.warmup,
                    window=max(1, scenario.window // count),
                )
                for slot, link in enumerate(links)
            )
        )
        for slot, warmup in enumerate(warmups):
            if warmup.unanswered:
                raise ScenarioFailed(
                    f"warm-up of process {slot + 1}: {warmup.unanswered} unanswered\n"
                    + components[slot].log_tail()
                )
        pids = [component.pid for component in components]
        backends = await database_backends(args.postgresql_url)
        clocks = [CpuClock([pid]) for pid in pids]
        total = CpuClock(pids)
        database_clock = CpuClock(backends)
        sink_clock = bench.sinks[scenario.service].cpu_clock()
        harness_cpu = _rusage_cpu()
        machine_busy = machine_busy_seconds()
        for clock in [*clocks, total, database_clock, sink_clock]:
            clock.start()
        result = await run_on_links(
            links,
            workload,
            label=scenario.label,
            start=count * args.warmup,
            count=scenario.publishes,
            window=scenario.window,
            stall_timeout=args.stall_timeout,
        )
        for clock in [*clocks, total, database_clock, sink_clock]:
            clock.stop()
        machine_busy = machine_busy_seconds() - machine_busy
        harness_cpu = _rusage_cpu() - harness_cpu
        peaks_kib = [component.peak_rss_kib() for component in components]
    finally:
        await asyncio.gather(*(component.stop() for component in components))

    # "component": all the processes together (peak RSS: the sum of their peaks).
    record = _record(scenario, result, total, sink_clock, harness_cpu, sum(peaks_kib))
    record["processes"] = count
    record["component_jid"] = COMPONENT_JID
    record["balancing"] = BALANCING
    record["component"]["peak_rss_mib_max"] = max(peaks_kib) / 1024
    per_process: list[dict[str, Any]] = []
    for slot, component in enumerate(components):
        answered = result.link_answered[slot]
        latencies = result.link_latencies[slot] if count > 1 else result.latencies
        latency = percentiles_ms(latencies, 50, 99, 99.9)
        per_process.append(
            {
                "process": slot + 1,
                "sent": result.link_sent[slot],
                "answered": answered,
                "share": answered / max(result.answered, 1),
                "publishes_per_s": answered / result.seconds,
                "latency_ms": latency,
                "peak_rss_mib": peaks_kib[slot] / 1024,
                "cpu_cores": clocks[slot].cores,
                "cpu_us_per_publish": 1e6 * clocks[slot].cpu / max(answered, 1),
                "exit_code": component.exit_code,
            }
        )
    record["per_process"] = per_process
    record["database"] = {"backends": len(backends), "cpu_cores": database_clock.cores}
    ours = total.cpu + sink_clock.cpu + harness_cpu + database_clock.cpu
    record["machine"] = {
        "busy_cores": machine_busy / total.wall,
        "other_cores": max(0.0, machine_busy - ours) / total.wall,
        "waited_for_quiet_s": round(waited, 1),
    }
    latency = record["latency_ms"]
    bench.log(
        f"  {record['publishes_per_s']:,.0f}/s together, p50 {latency['p50']:.1f} ms, "
        f"p99 {latency['p99']:.1f} ms, CPU {total.cores:.2f} cores"
        + (f", {result.unanswered} UNANSWERED" if result.unanswered else "")
        + (f", errors {result.errors}" if result.errors else "")
    )
    for entry in per_process:
        bench.log(
            f"    process {entry['process']}: {entry['answered']:,} answered "
            f"({entry['share']:.0%}), {entry['publishes_per_s']:,.0f}/s, "
            f"peak RSS {entry['peak_rss_mib']:.1f} MiB, CPU {entry['cpu_cores']:.2f} cores"
        )
    other = record["machine"]["other_cores"]
    if other > NOISY_CORES:
        bench.log(f"  WARNING: other processes used {other:.2f} cores during this run")
    return record


def _safe_url(url: str) -> str:
    from xmpp_push.storage.migrate import safe_url

    return safe_url(url)


# --------------------------------------------------------------------------------------
# Direct mode

DIRECT_COUNTED: Final = (
    "each push is matched to its notify by the device token in its path; pushes/s = "
    "pushes / (first notify sent → last push at the sink); latency = notify handed to the "
    "socket → push answered by the sink (this machine's wall clock, in 1 ms steps); "
    "the window counts the notifies whose push has not reached the sink yet"
)


async def direct_mode(bench: Bench, single: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The component in direct mode on each of `--direct-backends` with `--direct-rows`
    registrations, at the maximum rate to APNs (bench.direct); against `single`, this
    invocation's app-server APNs max-rate run. Then, with `--enables`, delegated
    enables and disables on the same store (bench.enables). None when no backend could
    run (notes say why)."""
    args = bench.args
    sink = bench.sinks["apns"]
    if sink.request_log is None:
        bench.notes.append(
            "direct mode skipped: it counts pushes in the nginx APNs sink's request log, "
            "and this APNs sink is the Python stand-in"
        )
        return None
    runs: list[dict[str, Any]] = []
    enable_runs: list[dict[str, Any]] = []
    plan: EnablePlan | None = None
    workload: DirectWorkload | None = None
    for backend in args.direct_backends:
        if backend == "sqlite":
            database = args.direct_cache / f"registrations-{args.direct_rows}.db"
            url = f"sqlite+aiosqlite:///{database}"
        else:
            url = direct_database_url(args.postgresql_url, args.direct_rows)
        workload = DirectWorkload(
            backend,
            url,
            rows=args.direct_rows,
            notifies=args.warmup + args.publishes,
            cache=args.direct_cache,
        )
        label = f"project-direct-{backend}"
        bench.log(f"{label}: {args.direct_rows:,} registrations in {_safe_url(url)}")
        try:
            await workload.prepare(bench.directory)
        except DatabaseUnavailable as exc:
            bench.log(f"{label}: skipped: {exc}")
            bench.notes.append(f"direct mode on {backend} skipped: {exc}")
            continue
        loading = workload.loading
        if loading["reloaded"]:
            bench.log(f"  loaded in {loading['seconds']:.1f} s (kept for the next run)")
        else:
            bench.log("  loaded before (the marker and the row count match)")
        config = _write_config(bench, label, workload.config_sections())
        record = await _least_disturbed(
            bench, label, functools.partial(_direct_once, bench, workload, config, label)
        )
        record["storage"] = _safe_url(url)
        record["registrations"] = loading
        if single is not None:
            record["ratio"] = record["pushes_per_s"] / max(single["publishes_per_s"], 1e-9)
            record["cpu_ratio"] = record["component"]["cpu_us_per_push"] / max(
                single["component"]["cpu_us_per_publish"], 1e-9
            )
            bench.log(
                f"  {record['ratio']:.2f}× app-server mode's APNs rate "
                f"({single['publishes_per_s']:,.0f} publishes/s), "
                f"{record['cpu_ratio']:.2f}× its CPU per publish"
            )
        runs.append(record)
        if args.enables:
            plan = EnablePlan(workload.dataset, count=args.enables, warmup=args.enable_warmup)
            enable_label = f"{label}-enable"
            enable_record = await _least_disturbed(
                bench,
                enable_label,
                functools.partial(_enables_once, bench, workload, plan, config, enable_label),
            )
            enable_record["storage"] = _safe_url(url)
            enable_runs.append(enable_record)
    if not runs or workload is None:
        return None
    section: dict[str, Any] = {
        "rows": args.direct_rows,
        "notifies": args.publishes,
        "warmup": args.warmup,
        "window": args.window,
        "counted": DIRECT_COUNTED,
        "coalescing": "policy.coalesce_window at its default (2 s); each user is notified "
        "once per component process, so no two notifies merge",
        "workload": workload.describe(),
        "runs": runs,
        "noisy_cores": NOISY_CORES,
    }
    if plan is not None:
        section["enable"] = {
            "count": args.enables,
            "warmup": args.enable_warmup,
            "window": args.window,
            "counted": ENABLE_COUNTED,
            "workload": plan.describe(),
            "runs": enable_runs,
        }
    if single is not None:
        section["appserver"] = {
            key: single[key]
            for key in ("label", "publishes_per_s", "latency_ms", "component", "window", "answered")
        }
        section["appserver"]["other_cores"] = single.get("machine", {}).get("other_cores")
    return section


async def _direct_once(
    bench: Bench, workload: DirectWorkload, config: Path, label: str
) -> dict[str, Any]:
    args = bench.args
    sink = bench.sinks["apns"]
    assert sink.request_log is not None
    component = RunningComponent(
        IMPLEMENTATIONS["project"], config, bench.directory / f"{label}.log"
    )
    waited = await _quiet(bench)
    bench.log(
        f"{label}: {args.publishes:,} notifies, at most {args.window} not yet pushed at a time"
    )
    log = RequestLog(sink.request_log)
    bench.server.plugin = PLUGIN_SERVER
    try:
        await component.start()
        link = await _connect_configured(bench, component)
        _, warmup = await deliver(
            link,
            workload,
            log,
            label="warmup",
            start=0,
            count=args.warmup,
            window=args.window,
            stall_timeout=args.stall_timeout,
        )
        if warmup.pushes < args.warmup:
            raise ScenarioFailed(
                f"warm-up: {args.warmup - warmup.pushes} notifies not pushed\n"
                + component.log_tail()
            )
        backends = await database_backends(workload.url) if workload.backend != "sqlite" else []
        component_clock = CpuClock([component.pid])
        sink_clock = sink.cpu_clock()
        database_clock = CpuClock(backends)
        harness_cpu = _rusage_cpu()
        machine_busy = machine_busy_seconds()
        for clock in (component_clock, sink_clock, database_clock):
            clock.start()
        result, delivery = await deliver(
            link,
            workload,
            log,
            label=label,
            start=args.warmup,
            count=args.publishes,
            window=args.window,
            stall_timeout=args.stall_timeout,
        )
        for clock in (component_clock, sink_clock, database_clock):
            clock.stop()
        machine_busy = machine_busy_seconds() - machine_busy
        harness_cpu = _rusage_cpu() - harness_cpu
        peak_kib = component.peak_rss_kib()
        configures = link.plugin_configures
    finally:
        bench.server.plugin = None
        log.close()
        await component.stop()
    pushes = max(delivery.pushes, 1)
    refused = result.answered - result.results
    wall = max(component_clock.wall, 1e-9)
    record: dict[str, Any] = {
        "label": label,
        "backend": workload.backend,
        "rows": workload.dataset.rows,
        "window": args.window,
        **result.counts(),
        "pushes": delivery.pushes,
        "undelivered": result.sent - refused - delivery.pushes,
        "unexpected_pushes": delivery.unexpected,
        "stalled": delivery.stalled,
        "seconds": round(delivery.seconds, 3),
        "pushes_per_s": delivery.rate,
        "latency_ms": delivery.latency_ms(),
        "answer_latency_ms": result.percentiles_ms(50, 99),
        "pushes_per_second": delivery.timeline,
        "plugin_configures_answered": configures,
        "component": {
            "peak_rss_mib": peak_kib / 1024,
            "cpu_cores": component_clock.cores,
            "cpu_us_per_push": 1e6 * component_clock.cpu / pushes,
        },
        "sink": {
            "cpu_cores": sink_clock.cores,
            "cpu_us_per_request": 1e6 * sink_clock.cpu / pushes,
        },
        "database": {"backends": len(backends), "cpu_cores": database_clock.cores},
        "harness": {"cpu_cores": harness_cpu / wall},
        "exit_code": component.exit_code,
    }
    ours = component_clock.cpu + sink_clock.cpu + database_clock.cpu + harness_cpu
    record["machine"] = {
        "busy_cores": machine_busy / wall,
        "other_cores": max(0.0, machine_busy - ours) / wall,
        "waited_for_quiet_s": round(waited, 1),
    }
    latency = record["latency_ms"]
    bench.log(
        f"  {record['pushes_per_s']:,.0f} pushes/s at the sink, notify → push p50 "
        f"{latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms, "
        f"peak RSS {record['component']['peak_rss_mib']:.1f} MiB, "
        f"CPU {component_clock.cores:.2f} cores "
        f"({record['component']['cpu_us_per_push']:,.0f} µs/push)"
        + (f", {record['undelivered']} NOT PUSHED" if record["undelivered"] else "")
        + (f", errors {result.errors}" if result.errors else "")
    )
    other = record["machine"]["other_cores"]
    if other > NOISY_CORES:
        bench.log(f"  WARNING: other processes used {other:.2f} cores during this run")
    return record


ENABLE_COUNTED: Final = (
    "the component answers a delegated enable or disable once the store has it, so the "
    "answers are the figure: IQs/s = answered IQs / (first sent → last answer), the "
    "window counts IQs not answered yet; latency = IQ handed to the socket → its answer "
    "read; an answer counts as `result` when the client's answer inside the wrapper is "
    "one; rows counted in the database before and after each phase"
)


async def _enables_once(
    bench: Bench, workload: DirectWorkload, plan: EnablePlan, config: Path, label: str
) -> dict[str, Any]:
    """One component process on `workload`'s store: warm-up, then each phase of
    `plan` (bench.enables) with `--window` IQs outstanding, the rows counted between."""
    args = bench.args
    url = workload.url
    component = RunningComponent(
        IMPLEMENTATIONS["project"], config, bench.directory / f"{label}.log"
    )
    waited = await _quiet(bench)
    bench.log(
        f"{label}: {plan.count:,} delegated IQs a phase ({', '.join(PHASES)}), "
        f"{args.window} outstanding"
    )
    phases: list[dict[str, Any]] = []
    bench.server.plugin = PLUGIN_SERVER
    try:
        await component.start()
        link = await _connect_configured(bench, component)
        link.write(ADVERTISEMENT)
        for phase in PHASES:
            warm = plan.workload(phase, warmup=True)
            if not warm.users:
                continue
            warmup = await link.run(
                warm,
                label=f"warmup-{phase}",
                start=0,
                count=len(warm.users),
                window=args.window,
                stall_timeout=args.stall_timeout,
            )
            if warmup.unanswered or warmup.results != warmup.answered:
                raise ScenarioFailed(
                    f"warm-up {phase}: {warmup.unanswered} unanswered, errors {warmup.errors}\n"
                    + component.log_tail()
                )
        backends = await database_backends(url) if workload.backend != "sqlite" else []
        for phase in PHASES:
            phases.append(await _enable_phase(bench, component, link, plan, url, phase, backends))
        peak_kib = component.peak_rss_kib()
    finally:
        bench.server.plugin = None
        await component.stop()
    # The table as loaded, for the notifies of the next run; a phase that went wrong
    # may have left rows behind.
    left = (await count_phase_rows(url, [], 0)).table
    removed = 0
    if left != workload.dataset.rows:
        removed = await remove_added_rows(url, workload.dataset)
        bench.log(f"  WARNING: {left:,} rows after the run; removed {removed:,} not loaded")
    others = [entry["machine"]["other_cores"] for entry in phases]
    record: dict[str, Any] = {
        "label": label,
        "backend": workload.backend,
        "rows": workload.dataset.rows,
        "window": args.window,
        "phases": phases,
        "rows_after_run": left,
        "removed_after_run": removed,
        "component": {"peak_rss_mib": peak_kib / 1024},
        "exit_code": component.exit_code,
        "machine": {"other_cores": max(others), "waited_for_quiet_s": round(waited, 1)},
    }
    other = record["machine"]["other_cores"]
    if other > NOISY_CORES:
        bench.log(f"  WARNING: other processes used {other:.2f} cores during these runs")
    return record


async def _enable_phase(
    bench: Bench,
    component: RunningComponent,
    link: ComponentLink,
    plan: EnablePlan,
    url: str,
    phase: str,
    backends: Sequence[int],
) -> dict[str, Any]:
    args = bench.args
    owners = plan.owners(phase)
    before = await count_phase_rows(url, owners, 0)
    arms, disarms = link.plugin_arms, link.plugin_disarms
    since_micros = round(time.time() * 1_000_000)
    component_clock = CpuClock([component.pid])
    database_clock = CpuClock(backends)
    harness_cpu = _rusage_cpu()
    machine_busy = machine_busy_seconds()
    component_clock.start()
    database_clock.start()
    result = await link.run(
        plan.workload(phase),
        label=phase,
        start=0,
        count=plan.count,
        window=args.window,
        stall_timeout=args.stall_timeout,
    )
    component_clock.stop()
    database_clock.stop()
    machine_busy = machine_busy_seconds() - machine_busy
    harness_cpu = _rusage_cpu() - harness_cpu
    after = await count_phase_rows(url, owners, since_micros)
    count = plan.count
    expected = {
        "enable_new": (before.table + count, 0, count, count),
        "enable_again": (before.table, count, count, count),
        "disable": (before.table - count, count, 0, 0),
    }[phase]
    found = (after.table, before.users, after.users, after.written)
    wall = max(component_clock.wall, 1e-9)
    answered = max(result.answered, 1)
    latency = result.percentiles_ms(50, 99, 99.9, 100)
    latency["max"] = latency.pop("p100")
    latency["mean"] = (
        1000 * sum(result.latencies) / len(result.latencies) if result.latencies else float("nan")
    )
    record: dict[str, Any] = {
        "phase": phase,
        "title": PHASE_TITLES[phase],
        **result.counts(),
        "stalled": result.stalled,
        "seconds": round(result.seconds, 3),
        "iqs_per_s": result.rate,
        "latency_ms": latency,
        "answers_per_second": result.timeline,
        "plugin_arms": link.plugin_arms - arms,
        "plugin_disarms": link.plugin_disarms - disarms,
        "rows": {
            "table_before": before.table,
            "table_after": after.table,
            "users_before": before.users,
            "users_after": after.users,
            "users_written": after.written,
            "expected": dict(
                zip(
                    ("table_after", "users_before", "users_after", "users_written"),
                    expected,
                    strict=True,
                )
            ),
            "as_expected": found == expected,
        },
        "component": {
            "cpu_cores": component_clock.cores,
            "cpu_us_per_iq": 1e6 * component_clock.cpu / answered,
        },
        "database": {"backends": len(backends), "cpu_cores": database_clock.cores},
        "harness": {"cpu_cores": harness_cpu / wall},
    }
    ours = component_clock.cpu + database_clock.cpu + harness_cpu
    record["machine"] = {
        "busy_cores": machine_busy / wall,
        "other_cores": max(0.0, machine_busy - ours) / wall,
    }
    bench.log(
        f"  {PHASE_TITLES[phase]}: {result.rate:,.0f} IQs/s, p50 {latency['p50']:.1f} ms, "
        f"p99 {latency['p99']:.1f} ms, {record['component']['cpu_us_per_iq']:,.0f} µs CPU/IQ, "
        f"rows {before.table:,} → {after.table:,}"
        + (f", {result.unanswered} UNANSWERED" if result.unanswered else "")
        + (f", errors {result.errors}" if result.errors else "")
        + ("" if found == expected else f", ROWS {found} EXPECTED {expected}")
    )
    return record


# --------------------------------------------------------------------------------------
# Plans


async def benchmark(bench: Bench) -> dict[str, Any]:
    args = bench.args
    runs: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    services = args.services
    for service in services:
        record = await run_scenario(
            bench, Scenario("project", service, "window", args.publishes, args.window)
        )
        runs.append(record)
        best[service] = record["publishes_per_s"]
    for service in services:
        rate = best[service] / 2
        count = max(int(rate * args.paced_seconds), 100)
        runs.append(
            await run_scenario(
                bench,
                Scenario("project", service, "paced", count, args.paced_cap, rate=rate),
            )
        )
    scaled: dict[str, Any] | None = None
    if args.scale_out:
        single = next((r for r in runs if r["service"] == "apns" and r["mode"] == "window"), None)
        if single is None:
            bench.notes.append("scale-out skipped: it loads APNs, and --services has no apns")
        else:
            scaled = await scale_out(bench, single)
    baseline: dict[str, float] = {}
    if args.baseline:
        for service in services:
            sink = bench.sinks[service]
            if service == "apns" and not sink.accepts_without_alpn:
                bench.notes.append(
                    "baseline → APNs skipped: this sink needs ALPN and aioapns offers none"
                )
                continue
            record = await run_scenario(
                bench, Scenario("baseline", service, "window", args.publishes, args.window)
            )
            runs.append(record)
            baseline[service] = record["publishes_per_s"]
    direct: dict[str, Any] | None = None
    if args.direct:
        single = next((r for r in runs if r["service"] == "apns" and r["mode"] == "window"), None)
        direct = await direct_mode(bench, single)
    sinks: dict[str, dict[str, Any]] = {}
    for service in services:
        sinks[service] = bench.sinks[service].describe()
        project_max = next(
            r for r in runs if r["implementation"] == "project" and r["service"] == service
        )
        sinks[service]["during_project_max_cores"] = project_max["sink"]["cpu_cores"]
        if args.ceiling:
            sinks[service]["ceiling"] = await measure_ceiling(bench, service)
    profiles: dict[str, Any] = {}
    if args.profile:
        for service in services:
            record = await run_scenario(
                bench,
                Scenario(
                    "project", service, "window", args.profile_publishes, args.window, profile=True
                ),
            )
            name = "APNs" if service == "apns" else "FCM"
            profiles[f"project → {name}, max rate"] = record.pop("profile", {})
            record.pop("rss_samples_mib", None)
            bench.notes.append(
                f"profiled run project → {name}: "
                f"{record['publishes_per_s']:,.0f} publishes/s under py-spy (not in the table)"
            )
    ratios = {service: best[service] / baseline[service] for service in baseline}
    results: dict[str, Any] = {
        "runs": runs,
        "ratios": ratios,
        "sinks": sinks,
        "profiles": profiles,
        "targets": _targets(runs, ratios),
    }
    if scaled is not None:
        results["scale_out"] = scaled
    if direct is not None:
        results["direct"] = direct
    return results


def _targets(runs: Sequence[dict[str, Any]], ratios: dict[str, float]) -> list[dict[str, Any]]:
    def project(service: str, mode: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in runs
                if r["implementation"] == "project"
                and r["service"] == service
                and r["mode"] == mode
            ),
            None,
        )

    # The issue sets both throughput targets for the APNs sink; FCM's ratio is reported
    # beside them without one.
    targets: list[dict[str, Any]] = []
    ratio = ratios.get("apns")
    targets.append(
        {
            "target": f"APNs: ≥ {TARGET_RATIO:g}× baseline publishes/s",
            "measured": f"{ratio:.2f}×" if ratio is not None else "–",
            "met": None if ratio is None else ratio >= TARGET_RATIO,
        }
    )
    apns = project("apns", "window")
    targets.append(
        {
            "target": f"APNs: ≥ {TARGET_RATE:,.0f} publishes/s",
            "measured": f"{apns['publishes_per_s']:,.0f}/s" if apns else "–",
            "met": None if apns is None else apns["publishes_per_s"] >= TARGET_RATE,
        }
    )
    for service in ("apns", "fcm"):
        paced = project(service, "paced")
        targets.append(
            {
                "target": f"{'APNs' if service == 'apns' else 'FCM'}: "
                f"p99 ≤ {TARGET_P99_MS:g} ms at half the max rate",
                "measured": (
                    f"{paced['latency_ms']['p99']:.1f} ms at {paced['offered_rate']:,.0f}/s"
                    if paced
                    else "–"
                ),
                "met": None if paced is None else paced["latency_ms"]["p99"] <= TARGET_P99_MS,
            }
        )
    peaks = [r["component"]["peak_rss_mib"] for r in runs if r["implementation"] == "project"]
    targets.append(
        {
            "target": f"project peak RSS ≤ {TARGET_RSS_MIB:g} MiB",
            "measured": f"{max(peaks):.1f} MiB" if peaks else "–",
            "met": None if not peaks else max(peaks) <= TARGET_RSS_MIB,
        }
    )
    return targets


async def soak(bench: Bench) -> dict[str, Any]:
    args = bench.args
    rate = args.soak_rate
    probe: dict[str, Any] | None = None
    if rate is None:
        probe = await run_scenario(
            bench, Scenario("project", "apns", "window", args.soak_probe, args.window)
        )
        rate = probe["publishes_per_s"] / 2
    count = int(rate * args.soak)
    record = await run_scenario(
        bench,
        Scenario(
            "project",
            "apns",
            "soak",
            count,
            args.paced_cap,
            rate=rate,
            sample_every=args.sample_every,
        ),
    )
    rss = soak_rss(record["rss_samples_mib"], args.soak, record["component"]["peak_rss_mib"])
    return {"seconds": args.soak, "run": record, "rss": rss, "probe": probe}


def soak_rss(samples: Sequence[Sequence[float]], seconds: float, peak_mib: float) -> dict[str, Any]:
    """How RSS moved over a soak: after the first minute (warm-up), and over the second
    half alone, which tells a plateau from steady growth."""
    points = [(float(t), float(mib)) for t, mib in samples]
    warmup_seconds = min(60.0, seconds / 5)
    steady = [(t, mib) for t, mib in points if t >= warmup_seconds] or points
    second_half = [(t, mib) for t, mib in points if t >= seconds / 2] or points
    first_t, first_mib = steady[0]
    final_mib = points[-1][1]
    return {
        "samples_mib": points,
        "warmup_seconds": first_t,
        "after_warmup_mib": first_mib,
        "final_mib": final_mib,
        "growth_mib": final_mib - first_mib,
        "second_half_growth_mib": final_mib - second_half[0][1],
        "slope_mib_per_10min": _slope(steady) * 600,
        "peak_mib": peak_mib,
        "flat": final_mib - first_mib <= SOAK_FLAT_MIB,
        "flat_means": f"growth after warm-up ≤ {SOAK_FLAT_MIB:g} MiB",
    }


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    variance = sum((t - mean_t) ** 2 for t, _ in points)
    if variance == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / variance


# --------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark xmpp-push against a baseline (see bench/README.md).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 5,000 publishes, 5 s paced, no profile, no quiet wait, docs untouched",
    )
    parser.add_argument("--publishes", type=int, help="per max-rate scenario (default 50,000)")
    parser.add_argument("--window", type=int, default=500, help="IQs outstanding at max rate (500)")
    parser.add_argument(
        "--tokens", type=int, default=100_000, help="distinct device tokens (100,000)"
    )
    parser.add_argument("--warmup", type=int, help="publishes before measuring (default 1,000)")
    parser.add_argument("--paced-seconds", type=float, help="length of each paced run (20)")
    parser.add_argument(
        "--paced-cap", type=int, default=10_000, help="most IQs outstanding in a paced run"
    )
    parser.add_argument("--services", default="apns,fcm", help="comma-separated: apns,fcm")
    parser.add_argument(
        "--mode", choices=sorted(WORKLOADS), default="appserver", help="component mode"
    )
    parser.add_argument(
        "--sink",
        choices=["auto", "nginx", "python"],
        default="auto",
        help="nginx (fast), python (tests/standins; ~2,100 req/s), auto: nginx if installed",
    )
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the baseline"
    )
    parser.add_argument(
        "--no-ceiling", dest="ceiling", action="store_false", help="skip the sink ceilings"
    )
    parser.add_argument(
        "--no-scale-out",
        dest="scale_out",
        action="store_false",
        help="skip the scale-out scenario (several processes on one PostgreSQL database)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="component processes in the scale-out scenario (2), one connection each",
    )
    parser.add_argument(
        "--postgresql-url",
        default=POSTGRESQL_URL,
        help="the scale-out processes' [storage] url; created if missing, then "
        f"`xmpp-push db upgrade` ({POSTGRESQL_URL})",
    )
    parser.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="skip direct mode (the server plugin's notifies → lookups → pushes)",
    )
    parser.add_argument(
        "--direct-rows",
        type=int,
        help=f"registrations loaded for direct mode ({DEFAULT_ROWS:,}; quick {QUICK_ROWS:,})",
    )
    parser.add_argument(
        "--direct-backends",
        default=",".join(BACKENDS),
        help="comma-separated stores for direct mode: sqlite,postgresql (PostgreSQL: "
        "--postgresql-url's server, database <name>_direct, created if missing)",
    )
    parser.add_argument(
        "--enables",
        type=int,
        help="direct mode: delegated IQs in each enable/disable phase on each store "
        "(5,000; quick 2,000 or --publishes if fewer; 0 skips them)",
    )
    parser.add_argument(
        "--direct-cache",
        type=Path,
        default=REPO / "bench" / "results" / "direct-cache",
        help="where direct mode keeps its loaded SQLite databases between runs "
        "(bench/results/direct-cache)",
    )
    parser.add_argument(
        "--ceiling-clients", type=int, default=2, help="client processes loading a sink (2)"
    )
    parser.add_argument("--ceiling-requests", type=int, help="per client (default 15,000)")
    parser.add_argument(
        "--profile",
        dest="profile",
        action="store_true",
        default=None,
        help="py-spy profiles in extra runs (default on, except --quick and --soak)",
    )
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--profile-publishes", type=int, help="per profiled run (20,000)")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="instead of the benchmark: project → APNs paced for SECONDS, RSS sampled",
    )
    parser.add_argument("--soak-rate", type=float, help="publishes/s (default: half the max)")
    parser.add_argument("--soak-probe", type=int, default=10_000, help="publishes to find max")
    parser.add_argument("--sample-every", type=float, default=5.0, help="soak RSS interval, s")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="give up on a run after this long without an answer (30)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="run a scenario again when other load disturbed it, at most this often "
        "(2; quick 0); the least disturbed run counts",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each scenario, wait up to this long for other load to stop (120; quick 0)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=REPO / "bench" / "results", help="(bench/results)"
    )
    parser.add_argument(
        "--docs", type=Path, help="Markdown file to update (docs/performance.md; implies writing)"
    )
    parser.add_argument(
        "--no-docs",
        dest="write_docs",
        action="store_false",
        default=None,
        help="do not touch the docs",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config key for the project's component, e.g. apns.connections=4 (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--from-results",
        type=Path,
        metavar="FILE",
        help="measure nothing: print FILE (bench/results/*.json) and write its block of the docs",
    )
    return parser


def _override(text: str) -> tuple[str, str, object]:
    key, equals, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not equals or not dot:
        raise SystemExit(f"--set wants SECTION.KEY=VALUE, got {text!r}")
    value: object = raw
    with contextlib.suppress(ValueError):
        value = json.loads(raw)  # numbers and booleans as such; anything else stays text
    return section, name, value


def _settle(args: argparse.Namespace) -> None:
    quick = args.quick
    overrides: dict[str, dict[str, object]] = {}
    for text in args.overrides:
        section, name, value = _override(text)
        overrides.setdefault(section, {})[name] = value
    args.overrides = overrides
    args.services = [s.strip() for s in args.services.split(",") if s.strip()]
    for service in args.services:
        if service not in SERVICES:
            raise SystemExit(f"unknown service {service!r}")
    if args.processes < 1:
        raise SystemExit("--processes wants at least 1")
    args.direct_backends = [b.strip() for b in args.direct_backends.split(",") if b.strip()]
    for backend in args.direct_backends:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown direct-mode store {backend!r}")
    if args.direct_rows is None:
        args.direct_rows = QUICK_ROWS if quick else DEFAULT_ROWS
    args.direct_cache = args.direct_cache.resolve()
    if args.publishes is None:
        args.publishes = 5_000 if quick else 50_000
    if args.warmup is None:
        args.warmup = min(1_000, max(100, args.publishes // 10)) if quick else 1_000
    if args.paced_seconds is None:
        args.paced_seconds = 5.0 if quick else 20.0
    if args.ceiling_requests is None:
        args.ceiling_requests = 3_000 if quick else 15_000
    if args.profile is None:
        args.profile = not quick and args.soak is None and pyspy_path() is not None
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if quick else 120.0
    if args.retries is None:
        args.retries = 0 if quick or args.soak is not None else 2
    if args.profile_publishes is None:
        args.profile_publishes = 20_000
    if args.write_docs is None:
        args.write_docs = not quick or args.docs is not None
    if args.enables is None:
        args.enables = min(2_000, args.publishes) if quick else 5_000
    if args.enables < 0:
        raise SystemExit("--enables wants 0 or more")
    args.enable_warmup = min(args.warmup, args.enables)
    if args.direct and args.soak is None and args.enable_warmup + args.enables > args.direct_rows:
        raise SystemExit(
            f"direct mode enables loaded users again, each once: --direct-rows "
            f"{args.direct_rows:,} is fewer than the {args.enable_warmup + args.enables:,} "
            "warm-up and measured enables"
        )
    if args.direct and args.soak is None and args.warmup + args.publishes > args.direct_rows:
        raise SystemExit(
            f"direct mode notifies each user once: --direct-rows {args.direct_rows:,} is "
            f"fewer than the {args.warmup + args.publishes:,} warm-up and measured notifies"
        )
    if args.docs is None:
        args.docs = REPO / "docs" / "performance.md"


async def _main(args: argparse.Namespace, command: str) -> dict[str, Any]:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    results_file = args.results_dir / f"{stamp}.json"
    directory = Path(tempfile.mkdtemp(prefix="xmpp-push-bench-"))
    server = LoadServer(SECRET)
    await server.start()
    sinks: dict[str, Sink] = {}
    bench = Bench(args, directory, server, sinks, stamp)
    results: dict[str, Any] = {
        "version": 1,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "results_file": str(_relative(results_file)),
        "machine": report.machine(),
        "source": report.source_state(REPO),
        "settings": {
            key: value for key, value in vars(args).items() if not isinstance(value, Path)
        },
    }
    results["settings"]["postgresql_url"] = _safe_url(args.postgresql_url)
    try:
        for service in SERVICES:
            # Both sinks run in every scenario, as both providers are configured.
            sinks[service] = start_sink(service, args.sink, directory / f"sink-{service}")
        bench.log(
            "sinks: " + ", ".join(f"{s} {sink.kind} {sink.endpoint}" for s, sink in sinks.items())
        )
        results["workloads"] = {s: bench.workload(s).describe() for s in args.services}
        if args.soak is not None:
            results["soak"] = await soak(bench)
            results["soak"].update(command=command, date=results["date"], source=results["source"])
        else:
            results.update(await benchmark(bench))
        results["notes"] = bench.notes
    finally:
        await server.stop()
        for sink in sinks.values():
            sink.stop()
        if args.keep:
            print(f"work directory kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    report.write_json(results, args.results_dir, stamp)
    return results


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(arguments)
    _settle(args)
    # bench/run says so; `python -m bench` is the same program without the set-up.
    command = shlex.join([os.environ.get("BENCH_INVOKED_AS", "python -m bench"), *arguments])
    if args.from_results is not None:
        results = json.loads(args.from_results.read_text())
        if "soak" in results:  # figures derived from the samples may have been added since
            soak_run = results["soak"]
            soak_run.setdefault("source", results.get("source", {}))
            soak_run["rss"] = soak_rss(
                soak_run["rss"]["samples_mib"], soak_run["seconds"], soak_run["rss"]["peak_mib"]
            )
        args.write_docs = args.write_docs is not False
    else:
        results = asyncio.run(_main(args, command))
    print(report.render_console(results))
    print(f"\nresults: {results['results_file']}")
    if args.write_docs:
        report.update_docs(
            args.docs,
            results if "runs" in results else None,
            results.get("soak"),
        )
        print(f"docs:    {_relative(args.docs)}")
    unanswered = sum(run["unanswered"] for run in results.get("runs", []))
    if "scale_out" in results:
        unanswered += results["scale_out"]["unanswered"]
    for run in results.get("direct", {}).get("runs", []):
        unanswered += run["unanswered"] + run["undelivered"]
    for run in results.get("direct", {}).get("enable", {}).get("runs", []):
        for phase in run["phases"]:
            # Every delegated IQ must be answered `result` and change the rows it names.
            unanswered += phase["answered"] - phase["results"] + phase["unanswered"]
            unanswered += 0 if phase["rows"]["as_expected"] else 1
    if "soak" in results:
        unanswered += results["soak"]["run"]["unanswered"]
    return 1 if unanswered else 0
