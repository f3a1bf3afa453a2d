"""Serving under load: continuous batching against one request at a time, over loopback HTTP.

    python bench/bench_serve.py            # writes the serve section of RESULTS.md
    python bench/bench_serve.py --quick    # fewer requests and tokens (seconds), no RESULTS.md

Two `pyengine serve` processes run the same small LM checkpoint (byte vocabulary, embed 64,
hidden 128, 2 layers, untrained: speed does not depend on the weights): one with continuous
batching (--max-batch 16), one decoding a single sequence at a time (--max-batch 1). This
process is the load: C concurrent clients (httpx, asyncio) send a fixed number of requests in
all, each a prompt of 8-40 bytes and a fixed number of new tokens, every request waiting for its
answer before the client sends the next. The two servers are loaded in alternating rounds
(medians over the rounds). Reported: tokens/s and requests/s (all the tokens of a round over
its wall time), p50 and p99 request latency (all rounds pooled), and the speedup = batching's
tokens/s over one-at-a-time's. A round that passes its time limit stops and is marked.
Scaling: p50 latency against the number of clients (1, 4, 16; 1 and 16 with --quick).
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

import pyengine
from pyengine.data import ByteTokenizer
from pyengine.train import save_model

from harness import (
    Report,
    checkout_env,
    info_line,
    machine_info,
    markdown_table,
    run_main,
    scaling_table,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHED, SERIAL = "continuous batching (max batch 16)", "one at a time (max batch 1)"
BASELINE = SERIAL
WORDS = "the quick brown fox jumps over the lazy dog while a small model serves many".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m pyengine serve` in a child process on a loopback port; killed on exit."""

    def __init__(self, checkpoint: str, max_batch: int, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "pyengine", "serve", "--model", checkpoint,
                   "--device", "cpu", "--port", str(self.port), "--max-batch", str(max_batch),
                   "--max-queue", "256", "--threads", str(threads), "--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=checkout_env())

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server on port {self.port} was not ready in {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


def prompts(count: int) -> list[str]:
    """Fixed prompts of 8 to 40 bytes, the same for every server."""
    out = []
    for i in range(count):
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(2 + i % 6)]
        out.append(" ".join(words)[:40].ljust(8))
    return out


async def load(url: str, clients: int, texts: list[str], new_tokens: int,
               time_limit: float) -> dict:
    """`clients` concurrent clients share the requests; returns tokens, seconds, latencies."""
    latencies: list[float] = []
    tokens = 0
    next_index = 0
    deadline = time.monotonic() + time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens, next_index
        while next_index < len(texts) and time.monotonic() < deadline:
            text = texts[next_index]
            next_index += 1
            body = {"prompt": text, "max_new_tokens": new_tokens, "temperature": 0.8,
                    "top_k": 40}
            start = time.perf_counter()
            response = await client.post("/generate", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["new_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=time_limit) as client:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))),
                               time_limit + 30)
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "latencies": latencies,
            "complete": len(latencies) == len(texts)}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_case(servers: dict[str, Server], clients: int, requests: int, new_tokens: int,
             rounds: int, time_limit: float) -> dict[str, dict]:
    """Alternating rounds of the same load on each server; medians and pooled latencies."""
    texts = prompts(requests)
    for server in servers.values():  # warm-up: first requests pay for lazy initialisation
        asyncio.run(load(server.url, min(clients, 4), texts[:4], new_tokens, time_limit))
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(rounds):
        for name, server in servers.items():
            runs[name].append(asyncio.run(load(server.url, clients, texts, new_tokens,
                                               time_limit)))
    summary = {}
    for name, results in runs.items():
        latencies = [x for r in results for x in r["latencies"]]
        summary[name] = {
            "tokens/s": statistics.median(r["tokens"] / r["seconds"] for r in results),
            "requests/s": statistics.median(len(r["latencies"]) / r["seconds"]
                                            for r in results),
            "p50 ms": 1e3 * percentile(latencies, 50),
            "p99 ms": 1e3 * percentile(latencies, 99),
            "complete": all(r["complete"] for r in results),
        }
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each server (1: the load runs on the other core)")


def report(args) -> Report:
    requests, new_tokens, rounds = (32, 16, 1) if args.quick else (128, 64, 3)
    time_limit = 60.0 if args.quick else 300.0
    sweep_clients = [1, args.clients] if args.quick else [1, 4, args.clients]

    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = pyengine.LSTMLanguageModel(tokenizer.vocab_size, embed_dim=64, hidden_size=128,
                                       num_layers=2)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        checkpoint = os.path.join(folder, "model.pt")
        save_model(checkpoint, model, tokenizer)
        servers = {BATCHED: Server(checkpoint, 16, args.threads),
                   SERIAL: Server(checkpoint, 1, args.threads)}
        try:
            for server in servers.values():
                server.wait_ready()
            main_case = run_case(servers, args.clients, requests, new_tokens, rounds,
                                 time_limit)
            points = []
            for clients in sweep_clients:
                sweep = (main_case if clients == args.clients else
                         run_case(servers, clients, max(clients * 2, requests // 4),
                                  new_tokens, rounds, time_limit))
                for name, result in sweep.items():
                    points.append({"sweep": "concurrent clients (p50 latency)", "x": clients,
                                   "impl": name, "ms": round(result["p50 ms"], 2),
                                   "speedup": round(result["tokens/s"]
                                                    / sweep[BASELINE]["tokens/s"], 3)})
        finally:
            for server in servers.values():
                server.stop()

    case = f"{args.clients} clients, {requests} requests x {new_tokens} new tokens"
    rows = []
    base = main_case[BASELINE]["tokens/s"]
    for name, result in main_case.items():
        rows.append({
            "case": case,
            "implementation": name,
            "tokens/s": f"{result['tokens/s']:,.0f}",
            "requests/s": f"{result['requests/s']:.1f}",
            "p50 ms": f"{result['p50 ms']:.1f}",
            "p99 ms": f"{result['p99 ms']:.1f}",
            f"speedup vs {BASELINE}": f"{result['tokens/s'] / base:.2f}x",
            "complete": "yes" if result["complete"] else "no: time limit",
        })
    info = machine_info("cpu") | {"server torch threads": args.threads, "rounds": rounds}
    if not all(r["complete"] for r in main_case.values()):
        raise RuntimeError(f"a server did not finish its requests within {time_limit} s")
    table = markdown_table(rows, list(rows[0]))
    table += "\n\nScaling (p50 latency against concurrent clients):\n\n" + scaling_table(points)
    header = (
        "## Serving (pyengine serve over loopback HTTP; LM embed 64, hidden 128, 2 layers, "
        "byte vocabulary; sampling temperature 0.8, top-k 40)\n\n"
        "`python bench/bench_serve.py`; " + info_line(info)
        + "\n\nThe load (httpx clients) runs on the same machine as the servers. tokens/s and "
        "requests/s: medians over the rounds; p50/p99: request latency over all rounds. "
        f"speedup vs {BASELINE} = this server's tokens/s over that one's (x faster: above 1 "
        "is faster).\n\n"
    )
    return Report("serve-cpu", header + table, rows, info, "case", "implementation",
                  f"speedup vs {BASELINE}", scaling=points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, device=False, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
