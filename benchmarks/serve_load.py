"""Load test for `leanseq serve`: N concurrent streams, each pushing one token at a time, on loopback.

    python benchmarks/serve_load.py                                   # the documented run (docs/serve.md)
    python benchmarks/serve_load.py --streams 64 --pushes 20 --contexts 64 --quick

For each model and context C: a fresh `leanseq serve` process (1 torch thread, SQLite store in a temporary folder)
is started; N sessions are opened, each with a prompt of C random token ids (untimed); then N WebSocket clients
push one token per message and wait for its answer (the next-token prediction, the state already written to the
store), `--pushes` times each. Latency is the time from sending a push to receiving its answer, as the client sees
it; the first `--warmup` pushes of each stream are not counted. Throughput is counted pushes over the wall time of
the timed part. Each configuration stops after `--max-seconds` whatever it has reached (and says so).

Models: the bundled induction Mamba (66,496 parameters) and the bundled induction transformer (70,976 parameters,
2 layers x 64, 8 heads), both trained on the same task with a 16-token vocabulary, so the comparison is one of
architecture: the Mamba's state is a constant 20 KB per stream, the transformer's KV cache 512 bytes per token.
`--busy-core` repeats every configuration with one extra process spinning on a core (a shared machine).
The client runs in this process (asyncio), on the same machine as the server: both share its cores.

Two modes (--modes): "ws" is the whole stack above; "engine" drives the server's engine in this process with no
HTTP at all (the same Engine, SessionPool, SQLite store and durability per push; all N pushes of a step are
submitted at once and each one's latency runs from its submission to its answer), which shows what the model step
and the store cost apart from the Python WebSocket stack on both ends.

Where the time goes (ws mode): each result carries the CPU microseconds per push (warm-up pushes included) spent
by the server's event-loop thread, by its other threads (the engine, the store's WAL thread) and by the client
process, each split into user and system (kernel: socket calls, loopback TCP) time, read from /proc; and the
engine's rows per batched step (from /metrics). `--append` merges into an existing OUT.json (a long plan split
into runs that each hold the measurement lock for a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
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
MODELS = {"mamba": "induction-mamba", "transformer": "induction-transformer"}
LIMIT_MS = 50.0


def start_server(model_dir: str, db: Path, threads: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "leanseq.cli", "serve", model_dir, "--no-auth", "--db", str(db), "--port", "0",
           "--threads", str(threads), "--no-access-log", "--max-tokens-per-request", str(max_tokens),
           "--max-concurrent-streams", "100000", "--max-live", "100000", "--max-body-bytes", str(64 << 20)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            # keep draining stderr, or a chatty server would block on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, found.group(1)
    proc.kill()
    raise RuntimeError("leanseq serve did not start:\n" + "".join(lines))


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> dict:
    """CPU seconds so far of each thread of a process, user and system (the kernel: socket calls, loopback TCP):
    "main" is the thread that runs the event loop, "other" the rest (the engine, the store's WAL thread).
    Linux /proc; {} elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"main_user": 0.0, "main_sys": 0.0, "other_user": 0.0, "other_sys": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        which = "main" if int(tid) == pid else "other"
        out[which + "_user"] += int(fields[11]) / tick  # utime
        out[which + "_sys"] += int(fields[12]) / tick  # stime
    return out


async def engine_counts(http) -> dict:
    """The server's batched steps and rows so far, from /metrics (rows per step = how well rounds batch)."""
    text = (await http.get("/metrics")).text
    found = {k: re.search(rf"^leanseq_batched_{k}_total (\S+)", text, re.MULTILINE) for k in ("steps", "rows")}
    return {k: float(m.group(1)) if m else 0.0 for k, m in found.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def load(url: str, streams: int, pushes: int, warmup: int, context: int, vocab: int,
               max_seconds: float, seed: int, server_pid: int | None = None) -> dict:
    import httpx
    import websockets

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(streams)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        gate = asyncio.Semaphore(8)

        async def open_one(prompt):
            async with gate:
                r = await http.post("/v1/sessions", json={"tokens": prompt})
                r.raise_for_status()
                return r.json()["id"]

        t_open = time.perf_counter()
        sids = await asyncio.gather(*(open_one(p) for p in prompts))
        open_s = time.perf_counter() - t_open
        steps_before = await engine_counts(http)
    ws_url = url.replace("http://", "ws://")
    latencies: list[float] = []
    counted = {"pushes": 0}
    start = asyncio.Event()
    deadline = {"t": float("inf")}

    async def stream(sid: str, i: int):
        async with websockets.connect(f"{ws_url}/v1/sessions/{sid}/ws", max_size=None, compression=None) as ws:
            ready.append(sid)
            await start.wait()
            for k in range(warmup + pushes):
                if time.perf_counter() > deadline["t"]:
                    return
                message = json.dumps({"tokens": [(i + k) % vocab]})
                t0 = time.perf_counter()
                await ws.send(message)
                answer = json.loads(await ws.recv())
                elapsed = time.perf_counter() - t0
                if "error" in answer:
                    raise RuntimeError(f"push refused: {answer['error']}")
                if k >= warmup:
                    latencies.append(elapsed)
                    counted["pushes"] += 1

    ready: list[str] = []
    tasks = [asyncio.create_task(stream(sid, i)) for i, sid in enumerate(sids)]
    while len(ready) < streams:
        await asyncio.sleep(0.01)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
    server_before = cpu_seconds(server_pid) if server_pid else {}
    client_before = cpu_seconds(os.getpid())
    t0 = time.perf_counter()
    deadline["t"] = t0 + max_seconds
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    # where the CPU went during the timed part (warm-up pushes included: every push is in the same loop)
    server_after, client_after = (cpu_seconds(server_pid) if server_pid else {}), cpu_seconds(os.getpid())
    total = max(1, streams * (warmup + pushes))
    cpu = {f"server_{k}_us_per_push": round((server_after[k] - server_before[k]) / total * 1e6, 1)
           for k in server_after if k in server_before}
    for kind in ("user", "sys"):
        used = sum(client_after[k] - client_before[k] for k in client_after if k.endswith(kind))
        cpu[f"client_{kind}_us_per_push"] = round(used / total * 1e6, 1)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        steps_after = await engine_counts(http)
    steps = steps_after["steps"] - steps_before["steps"]
    cpu["rows_per_step"] = round((steps_after["rows"] - steps_before["rows"]) / max(1, steps), 1)
    ms = [x * 1000 for x in latencies]
    return {**cpu, "streams": streams, "context": context, "pushes": counted["pushes"],
            "planned_pushes": streams * pushes, "stopped_by_time": counted["pushes"] < streams * pushes,
            "wall_s": round(wall, 3), "pushes_per_s": round(counted["pushes"] / wall, 1),
            "p50_ms": round(statistics.median(ms), 2), "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(max(ms), 2), "open_s": round(open_s, 2)}


def engine_load(model_dir: str, db: Path, streams: int, pushes: int, warmup: int, context: int, vocab: int,
                max_seconds: float, seed: int, threads: int) -> dict:
    import torch

    import leanseq
    from leanseq.serve.batching import Engine, Job
    from leanseq.serve.commands import settle_garbage_collector
    from leanseq.serve.store import SQLiteStore

    torch.set_num_threads(threads)
    engine = Engine(leanseq.load(model_dir), SQLiteStore(db))
    settle_garbage_collector()  # as `leanseq serve` does before it serves
    try:
        rng = random.Random(seed)
        t_open = time.perf_counter()
        opened = [engine.submit(Job("open", "bench", tokens=[rng.randrange(vocab) for _ in range(context)]))
                  for _ in range(streams)]
        sids = [f.result(3600)["id"] for f in opened]
        open_s = time.perf_counter() - t_open
        latencies, counted = [], 0
        t0 = time.perf_counter()
        for k in range(warmup + pushes):
            if k == warmup:
                t0, latencies, counted = time.perf_counter(), [], 0
            if time.perf_counter() - t0 > max_seconds and k > warmup:
                break
            done_at = [0.0] * streams
            start = time.perf_counter()
            futures = []
            for i, sid in enumerate(sids):
                f = engine.submit(Job("push", "bench", session_id=sid, tokens=[(i + k) % vocab]))
                f.add_done_callback(lambda _, i=i, done_at=done_at: done_at.__setitem__(i, time.perf_counter()))
                futures.append(f)
            for f in futures:
                f.result(600)
            latencies += [(t - start) * 1000 for t in done_at]
            counted += streams
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    return {"streams": streams, "context": context, "pushes": counted, "planned_pushes": streams * pushes,
            "stopped_by_time": counted < streams * pushes, "wall_s": round(wall, 3),
            "pushes_per_s": round(counted / wall, 1), "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(percentile(latencies, 99), 2), "max_ms": round(max(latencies), 2),
            "open_s": round(open_s, 2)}


def spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_one(kind: str, context: int, args, busy: bool, mode: str) -> dict:
    from leanseq.models.commands import bundled_checkpoint

    model_dir = str(bundled_checkpoint(MODELS[kind]))
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop,), daemon=True) if busy else None
    with tempfile.TemporaryDirectory(prefix="leanseq-serve-load-") as tmp:
        if spinner:
            spinner.start()
        try:
            if mode == "engine":
                result = engine_load(model_dir, Path(tmp) / "sessions.db", args.streams, args.pushes, args.warmup,
                                     context, 16, args.max_seconds, args.seed, args.threads)
            else:
                proc, url = start_server(model_dir, Path(tmp) / "sessions.db", args.threads, max(4096, context))
                try:
                    result = asyncio.run(load(url, args.streams, args.pushes, args.warmup, context, 16,
                                              args.max_seconds, args.seed, server_pid=proc.pid))
                finally:
                    stop_server(proc)
        finally:
            if spinner:
                stop.set()
                spinner.join(10)
    result.update(model=kind, busy_core=busy, threads=args.threads, mode=mode)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {("ws", False): "-", ("ws", True): "--", ("engine", False): ":", ("engine", True): "-."}
    for kind, color in (("mamba", "tab:green"), ("transformer", "tab:red")):
        for (mode, busy), style in styles.items():
            rows = sorted((r for r in results if r["model"] == kind and r["busy_core"] == busy and r["mode"] == mode),
                          key=lambda r: r["context"])
            if rows:
                what = "WebSocket" if mode == "ws" else "engine only"
                ax.plot([r["context"] for r in rows], [r["p99_ms"] for r in rows], style, marker="o", color=color,
                        label=f"{kind}, {what}{', a core busy' if busy else ''}")
    ax.axhline(LIMIT_MS, color="grey", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], LIMIT_MS * 1.05, "50 ms", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens already in each stream)")
    ax.set_ylabel("latency per push, p99 (ms)")
    streams = results[0]["streams"] if results else 0
    ax.set_title(f"leanseq serve: {streams} concurrent streams, one token per push")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--pushes", type=int, default=40, help="timed pushes per stream")
    p.add_argument("--warmup", type=int, default=3, help="untimed pushes per stream first")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--mamba-contexts", type=int, nargs="+", default=None,
                   help="contexts for the Mamba (default: the same as --contexts)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop a configuration after this long")
    p.add_argument("--busy-core", action="store_true", help="also measure with one core kept busy")
    p.add_argument("--busy-contexts", type=int, nargs="+", default=None,
                   help="contexts measured with a core busy (default: all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", choices=("ws", "engine"), default=["ws", "engine"])
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--quick", action="store_true", help="a small smoke run (16 streams, 5 pushes, context 64)")
    p.add_argument("--out", default=str(ROOT / "docs" / "serve_load"), help="writes OUT.json and OUT.png")
    p.add_argument("--append", action="store_true", help="keep OUT.json's results for configurations this run does "
                   "not measure (a long plan split into several runs), and plot them all")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.pushes, args.contexts = 16, 5, [64]
    from tqdm import tqdm

    plan = [(kind, c, busy, mode) for mode in args.modes for busy in ([False, True] if args.busy_core else [False])
            for kind, contexts in (("mamba", args.mamba_contexts or args.contexts), ("transformer", args.contexts))
            if kind in args.models for c in contexts if not busy or args.busy_contexts is None or c in args.busy_contexts]
    results = []
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine, for the record
    for kind, context, busy, mode in tqdm(plan, desc="configurations"):
        r = run_one(kind, context, args, busy, mode)
        results.append(r)
        tqdm.write(f"{mode:6s} {kind:11s} context {context:5d} {'busy core ' if busy else ''}{r['streams']} streams: "
                   f"{r['pushes_per_s']:8.1f} pushes/s, p50 {r['p50_ms']:7.2f} ms, p99 {r['p99_ms']:7.2f} ms"
                   f"{' (stopped by time)' if r['stopped_by_time'] else ''}")
    runs = [{"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]}]
    previous = Path(args.out + ".json")
    if args.append and previous.is_file():  # keep the earlier run's other configurations (e.g. the other mode)
        earlier = json.loads(previous.read_text())
        key = ("mode", "model", "context", "busy_core")
        new = {tuple(r[k] for k in key) for r in results}
        results = [r for r in earlier["results"] if tuple(r[k] for k in key) not in new] + results
        runs = earlier.get("runs", []) + runs
    modes = sorted({r["mode"] for r in results})
    crossing = {}
    for mode in modes:
        for busy in sorted({r["busy_core"] for r in results}):
            over = sorted(r["context"] for r in results if r["model"] == "transformer" and r["mode"] == mode
                          and r["busy_core"] == busy and r["p99_ms"] > LIMIT_MS)
            crossing[f"{mode}, {'a core busy' if busy else 'no extra load'}"] = over[0] if over else None
    out = {"runs": runs, "machine": f"{os.cpu_count()} CPUs", "results": results,
           "transformer_first_context_over_50ms_p99": crossing}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, Path(args.out + ".png"))
    print(json.dumps(crossing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
