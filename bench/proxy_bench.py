#!/usr/bin/env python3
"""Side-by-side proxy benchmark: direct, sagamesh-sidecar, Envoy, HAProxy.

Run through scripts/bench-proxy.sh, which installs the tools and builds the binaries and then
calls this with their paths in the environment. Everything listens on 127.0.0.1; every process
started here is stopped by its PID on the way out, whatever happens.

Per round (the target order rotates every round, so no proxy always runs first or last):
  h1    wrk, 1 thread, 32 keep-alive connections, closed loop for DURATION s: max req/s,
        proxy CPU (utime+stime from /proc/PID/stat) and peak RSS during the run
  lat   oha, fixed open-loop rate RATE req/s over 32 connections for LAT_DURATION s, with
        latency correction (coordinated omission): p50/p99/p99.9
  h2c   h2load, ONE connection, 32 concurrent streams, for H2_DURATION s: req/s, proxy CPU,
        and which backends got requests (read from each backend's /__hits)
  grpc  the same with gRPC unary requests (POST, application/grpc, one 7-byte message)
Medians over the rounds are reported.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "bench" / "config"

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "8"))
LAT_DURATION = int(os.environ.get("LAT_DURATION", "10"))
H2_DURATION = int(os.environ.get("H2_DURATION", "5"))
RATE = int(os.environ.get("RATE", "2000"))
CONNS = 32
STREAMS = 32

SIDECAR = os.environ["SIDECAR_BIN"]
# Another sidecar build (e.g. of an earlier commit) run beside the current one in the same
# rounds, for a before/after comparison on the same noisy machine.
BASELINE = os.environ.get("SIDECAR_BASELINE_BIN")
BACKEND = os.environ["BACKEND_BIN"]
ENVOY = os.environ.get("ENVOY_BIN", "envoy")
HAPROXY = os.environ.get("HAPROXY_BIN", "haproxy")
WRK = os.environ.get("WRK_BIN", "wrk")
OHA = os.environ.get("OHA_BIN", "oha")
H2LOAD = os.environ.get("H2LOAD_BIN", "h2load")
DOC = os.environ.get("DOC")  # where to write the markdown (unset: print only)
COMMAND = os.environ.get("BENCH_COMMAND", "scripts/bench-proxy.sh")

BACKENDS = [18081, 18082, 18083]
# target -> (HTTP/1.1 port, h2c port, pid key)
TARGETS = {
    "direct": (18081, 18081, None),
    "sidecar": (14140, 14140, "sidecar"),
    "envoy": (14150, 14150, "envoy"),
    "haproxy": (14160, 14161, "haproxy"),
}
ORDER = ["direct", "sidecar", "envoy", "haproxy"]
if BASELINE:
    TARGETS["baseline"] = (14240, 14240, "baseline")
RUN_ORDER = ORDER + (["baseline"] if BASELINE else [])
CLK_TCK = os.sysconf("SC_CLK_TCK")

procs: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(name: str, argv: list[str], workdir: Path) -> subprocess.Popen:
    out = open(workdir / f"{name}.log", "wb")
    p = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir
    )
    procs.append(p)
    log(f"started {name} pid {p.pid}")
    return p


def stop_all() -> None:
    # Only the processes started here, by PID: TERM, then KILL after a grace period.
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line; here after "pid (comm)".
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Peak RSS of a process while a run lasts (sampled every 100 ms)."""

    def __init__(self, pid: int | None):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                return
            self._stop.wait(0.1)

    def __enter__(self):
        if self.pid:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.pid:
            self._t.join()


def get(port: int, path: str = "/", host: str = "bench") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_ok(port: int, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            status, _ = get(port)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{what} on :{port} not ready after {timeout}s: {last}")


def hits() -> list[int]:
    return [int(get(p, "/__hits")[1]) for p in BACKENDS]


def run(argv: list[str], timeout: float) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def measure(pid: int | None, fn):
    """Runs fn(), returning (its result, proxy CPU seconds used, peak RSS KiB during it)."""
    before = cpu_seconds(pid) if pid else 0.0
    with RssSampler(pid) as s:
        res = fn()
    after = cpu_seconds(pid) if pid else 0.0
    return res, after - before, s.peak


def wrk(port: int) -> dict:
    out = run(
        [WRK, "-t1", f"-c{CONNS}", f"-d{DURATION}s", "-H", "Host: bench", f"http://127.0.0.1:{port}/"],
        DURATION + 30,
    )
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "requests": total, "bad": int(bad.group(1)) if bad else 0, "socket_errors": errs.group(1) if errs else ""}


def oha(port: int) -> dict:
    out = run(
        [
            OHA, "--no-tui", "--output-format", "json", "-z", f"{LAT_DURATION}s",
            "-q", str(RATE), "--latency-correction", "-c", str(CONNS),
            "-H", "Host: bench", f"http://127.0.0.1:{port}/",
        ],
        LAT_DURATION + 30,
    )
    j = json.loads(out)
    pct = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # Requests still open when the run's time is up are cut by oha: not failures.
    errors = {k: v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k}
    return {
        "p50": pct["p50"] * 1000,
        "p99": pct["p99"] * 1000,
        "p99.9": pct["p99.9"] * 1000,
        "ok": ok,
        "not_ok": sum(codes.values()) - ok + sum(errors.values()),
        "errors": errors,
    }


GRPC_BODY = bytes([0, 0, 0, 0, 2, 0x08, 0x01])


def h2load(port: int, grpc: bool, workdir: Path) -> dict:
    argv = [H2LOAD, "-c1", f"-m{STREAMS}", f"-D{H2_DURATION}", "--warm-up-time=1", "-H", ":authority: bench"]
    url = f"http://127.0.0.1:{port}/"
    if grpc:
        body = workdir / "grpc-request.bin"
        body.write_bytes(GRPC_BODY)
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{port}/bench.v1.Bench/Call"
    out = run(argv + [url], H2_DURATION + 30)
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if not m or not done:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    return {"rps": float(m.group(1)), "requests": int(done.group(3)), "ok": int(codes.group(1)) if codes else 0,
            "failed": int(done.group(5))}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sagamesh-bench-"))
    log(f"work directory {workdir}")
    results: dict = {t: {} for t in RUN_ORDER}
    idle_rss: dict = {}
    pids: dict = {}
    try:
        for port in BACKENDS:
            start(f"backend-{port}", [BACKEND, f"127.0.0.1:{port}"], workdir)
        for port in BACKENDS:
            wait_ok(port, "backend")
        def start_sidecar(name: str, binary: str, port: int, admin_port: int) -> None:
            pids[name] = start(
                name,
                [binary, "--manifests", str(CFG / "sidecar.yaml"), "--outbound-addr", f"127.0.0.1:{port}",
                 "--admin-addr", f"127.0.0.1:{admin_port}", "--worker-threads", "1"],
                workdir,
            ).pid

        start_sidecar("sidecar", SIDECAR, TARGETS["sidecar"][0], 14191)
        if BASELINE:
            start_sidecar("baseline", BASELINE, TARGETS["baseline"][0], 14291)
        # RUST_LOG stays at the default (info): the sidecar logs nothing per request.
        pids["envoy"] = start(
            "envoy",
            [ENVOY, "-c", str(CFG / "envoy.yaml"), "--concurrency", "1", "--log-level", "error",
             "--disable-hot-restart"],
            workdir,
        ).pid
        pids["haproxy"] = start("haproxy", [HAPROXY, "-f", str(CFG / "haproxy.cfg"), "-db"], workdir).pid
        measured = ["sidecar", "envoy", "haproxy"] + (["baseline"] if BASELINE else [])
        for t in measured:
            wait_ok(TARGETS[t][0], t)
        wait_ok(TARGETS["haproxy"][1], "haproxy h2")
        time.sleep(1)
        for t in measured:
            idle_rss[t] = rss_kib(pids[t])
        log(f"idle RSS KiB: {idle_rss}")
        # Warm-up: connections, pools, allocator arenas.
        for t in RUN_ORDER:
            port = TARGETS[t][0]
            run([WRK, "-t1", f"-c{CONNS}", "-d2s", "-H", "Host: bench", f"http://127.0.0.1:{port}/"], 30)

        for rnd in range(ROUNDS):
            order = RUN_ORDER[rnd % len(RUN_ORDER):] + RUN_ORDER[: rnd % len(RUN_ORDER)]
            for t in order:
                h1_port, h2_port, key = TARGETS[t]
                pid = pids.get(key) if key else None
                r = results[t]
                log(f"round {rnd + 1}/{ROUNDS} {t}: h1 max")
                res, cpu, peak = measure(pid, lambda: wrk(h1_port))
                r.setdefault("h1", []).append({**res, "cpu": cpu, "rss": peak})
                log(f"  {res['rps']:.0f} req/s, cpu {cpu:.2f}s, rss {peak} KiB, bad {res['bad']} {res['socket_errors']}")
                log(f"round {rnd + 1}/{ROUNDS} {t}: latency at {RATE} req/s")
                res, cpu, peak = measure(pid, lambda: oha(h1_port))
                r.setdefault("lat", []).append({**res, "cpu": cpu, "rss": peak})
                log(f"  p50 {res['p50']:.3f} p99 {res['p99']:.3f} p99.9 {res['p99.9']:.3f} ms, not ok {res['not_ok']} {res['errors'] or ''}")
                for kind in ("h2c", "grpc"):
                    before = hits()
                    res, cpu, peak = measure(pid, lambda: h2load(h2_port, kind == "grpc", workdir))
                    spread = [a - b for a, b in zip(hits(), before)]
                    # The proxy's CPU window covers h2load's warm-up second too: count what
                    # the backends served in that window.
                    res["requests"] = sum(spread)
                    r.setdefault(kind, []).append({**res, "cpu": cpu, "rss": peak, "spread": spread})
                    log(f"  {kind}: {res['rps']:.0f} req/s, cpu {cpu:.2f}s, failed {res['failed']}, backends {spread}")
        for t in ("sidecar", "envoy", "haproxy"):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a process died during the run")
    finally:
        stop_all()
    report = render(results, idle_rss)
    print(report)
    (workdir / "results.json").write_text(json.dumps({"results": results, "idle_rss": idle_rss}, indent=1))
    log(f"raw results in {workdir / 'results.json'}")
    if DOC:
        write_doc(Path(DOC), report)
        log(f"wrote {DOC}")
    return 0


def fmt(x, nd=0):
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}"


def ratio(a, b, nd=2):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{nd}f}×"


def render(results: dict, idle_rss: dict) -> str:
    def med(t, kind, field):
        return median([x[field] for x in results[t].get(kind, [])])

    def per_cpu(t, kind):
        rows = results[t].get(kind, [])
        vals = [x["requests"] / x["cpu"] for x in rows if x.get("cpu")]
        return median(vals)

    def cpu_per_10k(t, kind):
        rows = results[t].get(kind, [])
        vals = [x["cpu"] / x["requests"] * 10_000 for x in rows if x.get("cpu") is not None and x["requests"]]
        return median(vals)

    def added(t, field):
        # Median over rounds of (proxy − direct) in the same round.
        d = results["direct"].get("lat", [])
        p = results[t].get("lat", [])
        return median([a[field] - b[field] for a, b in zip(p, d)])

    def spread(t, kind):
        rows = results[t].get(kind, [])
        if not rows:
            return "n/a"
        tot = [sum(col) for col in zip(*[x["spread"] for x in rows])]
        s = sum(tot) or 1
        return " / ".join(f"{100 * v / s:.0f}%" for v in tot)

    proxies = ["sidecar", "envoy", "haproxy"]
    rows = []

    def row(name, vals: dict, nd=0, lower_better=False, ratios=True):
        cells = [fmt(vals.get(t), nd) for t in ORDER]
        s = vals.get("sidecar")
        if ratios:
            cells += [ratio(s, vals.get("direct")), ratio(s, vals.get("envoy")), ratio(s, vals.get("haproxy"))]
        else:
            cells += ["", "", ""]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    row("HTTP/1.1 max req/s (32 conns)", {t: med(t, "h1", "rps") for t in ORDER})
    row("HTTP/1.1 requests per proxy CPU-second", {t: per_cpu(t, "h1") for t in proxies})
    row("proxy CPU s per 10,000 requests (HTTP/1.1)", {t: cpu_per_10k(t, "h1") for t in proxies}, nd=3)
    for f in ("p50", "p99", "p99.9"):
        row(f"latency {f} at {RATE:,} req/s (ms)", {t: med(t, "lat", f) for t in ORDER}, nd=3)
    for f in ("p50", "p99", "p99.9"):
        row(f"added {f} over direct (ms)", {t: added(t, f) for t in proxies}, nd=3)
    row("RSS idle (MiB)", {t: idle_rss.get(t, 0) / 1024 for t in proxies}, nd=1)
    row("RSS under load, peak (MiB)",
        {t: max(x["rss"] for k in ("h1", "lat", "h2c", "grpc") for x in results[t].get(k, [])) / 1024 for t in proxies}, nd=1)
    for kind, label in (("h2c", "h2c"), ("grpc", "gRPC unary")):
        row(f"{label} req/s, 1 connection × {STREAMS} streams", {t: med(t, kind, "rps") for t in ORDER})
        row(f"{label} requests per proxy CPU-second", {t: per_cpu(t, kind) for t in proxies})
    head = ("| figure | direct | sidecar | Envoy | HAProxy | sidecar/direct | sidecar/Envoy | sidecar/HAProxy |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    spreads = "\n".join(
        f"- {kind}: share of requests per backend (all rounds) — "
        + "; ".join(f"{t}: {spread(t, kind)}" for t in proxies)
        for kind in ("h2c", "grpc")
    )
    errors = []
    for t in RUN_ORDER:
        for kind in ("h1", "lat", "h2c", "grpc"):
            for i, x in enumerate(results[t].get(kind, [])):
                bad = x.get("bad", 0) + x.get("not_ok", 0) + x.get("failed", 0)
                if bad or x.get("socket_errors"):
                    errors.append(f"- {t} {kind} round {i + 1}: {bad} failed {x.get('socket_errors', '')}")
    per_round = []
    for t in RUN_ORDER:
        per_round.append(
            f"- {t}: h1 req/s "
            + ", ".join(fmt(x["rps"]) for x in results[t].get("h1", []))
            + "; p99 ms "
            + ", ".join(fmt(x["p99"], 3) for x in results[t].get("lat", []))
            + "; h2c req/s "
            + ", ".join(fmt(x["rps"]) for x in results[t].get("h2c", []))
            + "; gRPC req/s "
            + ", ".join(fmt(x["rps"]) for x in results[t].get("grpc", []))
        )
    if BASELINE:
        rows_b = []
        pairs = [
            ("HTTP/1.1 requests per proxy CPU-second", lambda t: per_cpu(t, "h1")),
            ("h2c requests per proxy CPU-second", lambda t: per_cpu(t, "h2c")),
            ("gRPC unary requests per proxy CPU-second", lambda t: per_cpu(t, "grpc")),
            ("HTTP/1.1 max req/s", lambda t: med(t, "h1", "rps")),
            (f"latency p99 at {RATE:,} req/s (ms)", lambda t: med(t, "lat", "p99")),
            ("RSS idle (MiB)", lambda t: idle_rss.get(t, 0) / 1024),
            ("RSS under load, peak (MiB)",
             lambda t: max(x["rss"] for k in ("h1", "lat", "h2c", "grpc") for x in results[t].get(k, [])) / 1024),
        ]
        for name, f in pairs:
            b, s = f("baseline"), f("sidecar")
            rows_b.append(f"| {name} | {fmt(b, 3 if b and b < 100 else 0)} | {fmt(s, 3 if s and s < 100 else 0)} | {ratio(s, b, 3)} |")
        rows += ["", f"Before/after (baseline: {BASELINE}), same rounds:", "",
                 "| figure | baseline | sidecar | sidecar/baseline |", "| --- | ---: | ---: | ---: |", *rows_b]
    return "\n".join([
        head, *rows, "", "Per-request balancing over one h2c connection:", spreads, "",
        "Per round (to judge the noise):", *per_round, "",
        "Failed requests: " + ("none" if not errors else "\n" + "\n".join(errors)),
    ])


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:,} MiB memory, Linux {platform.release()}"


def versions() -> str:
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"unknown ({e})"

    envoy = re.search(r"/(\d+\.\d+\.\d+)/", first([ENVOY, "--version"]))
    return "; ".join([
        f"Envoy {envoy.group(1) if envoy else 'unknown'}",
        first([HAPROXY, "-v"]).split(" - ")[0],
        first([WRK, "--version"]).split(" Copyright")[0],
        first([OHA, "--version"]),
        first([H2LOAD, "--version"]),
    ])


def write_doc(path: Path, report: str) -> None:
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- bench-proxy:begin -->", "<!-- bench-proxy:end -->"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join([
        begin,
        f"Run: {now}, on {machine()}.",
        f"Command: `{COMMAND}` (ROUNDS={ROUNDS}, DURATION={DURATION}s, LAT_DURATION={LAT_DURATION}s, "
        f"H2_DURATION={H2_DURATION}s, RATE={RATE}).",
        f"Tools: {versions()}.",
        "",
        report,
        end,
    ])
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    # SIGTERM/SIGHUP unwind through main's `finally`, which stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
