"""Serving under load: ``mmlm serve`` on loopback (a separate process), called by the official
``openai`` client from client threads.

    python benchmarks/serve.py                          # the demo model (run `mmlm demo` first)
    python benchmarks/serve.py --checkpoint CKPT --results /tmp/serve.md

Measured, in this order, each after a warm-up:

- ``direct``: ``MultimodalLM.ask`` in this process on the same image question (the same model,
  no HTTP), median seconds per call: what the API adds is measured against it;
- chat, 1 client: the same question over HTTP, one request at a time (latency and rate);
- chat, 8 clients: 8 threads sending at once; the batching gain is this rate over the 1-client rate;
- chat, 64 concurrent: 64 requests sent at once (each its own image and question);
- embeddings, 64 concurrent: 64 requests at once, half texts, half images (data URLs).

Every answer is checked: no request may fail (errors are counted and printed), and every chat
answer over HTTP must equal the direct answer for the same image and question (greedy).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def start_server(checkpoint: Path, port: int, threads: int, limits: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mmlm.cli", "serve", str(checkpoint), "--port", str(port), "--no-ui"]
    cmd += [f"--limit={x}" for x in limits]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start in 120 s")


def timed(fn, jobs: list, clients: int) -> tuple[list[float], list, float, list[str]]:
    """Run ``fn(job)`` for every job from ``clients`` threads: latencies, results, wall seconds, errors."""

    def one(job):
        t = time.perf_counter()
        try:
            result = fn(job)
            return result, time.perf_counter() - t, None
        except Exception as err:  # counted, not hidden
            return None, time.perf_counter() - t, f"{type(err).__name__}: {err}"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return [o[1] for o in out], [o[0] for o in out], wall, [o[2] for o in out if o[2]]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/final")
    ap.add_argument("--data", default="runs/demo/data/heldout", help="a shapes world: questions.jsonl and images")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the direct calls")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--limit", action="append", default=[], help="a server limit, as mmlm serve --limit takes it")
    ap.add_argument(
        "--client",
        choices=("openai", "http"),
        default="openai",
        help="the official openai client, or a plain keep-alive HTTP client (less client CPU on the shared cores)",
    )
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)

    import openai
    import torch
    from PIL import Image

    import mmlm

    ckpt, data = Path(args.checkpoint), Path(args.data)
    if not (ckpt / "mmlm.yaml").is_file() or not (data / "questions.jsonl").is_file():
        raise SystemExit(f"{ckpt} or {data} is missing: run `mmlm demo` first (or pass --checkpoint and --data)")
    torch.set_num_threads(args.threads)
    rows = [json.loads(x) for x in (data / "questions.jsonl").read_text().splitlines()[: args.requests]]
    jobs = [(data / r["image"], r["question"]) for r in rows]
    model = mmlm.load(ckpt).eval()
    n_tok = args.max_tokens

    # direct: the model in this process
    direct_answers = [model.ask(q, Image.open(p), max_new_tokens=n_tok) for p, q in jobs]
    direct_t = []
    for p, q in jobs[:24]:
        im = Image.open(p).convert("RGB")
        t = time.perf_counter()
        model.ask(q, im, max_new_tokens=n_tok)
        direct_t.append(time.perf_counter() - t)
    direct = statistics.median(direct_t)

    # the engine alone (in this process, no HTTP): what batching does for the model's part
    from mmlm.serve.engine import Engine, Sampling

    engine = Engine(model, max_batch=8, window_s=0.01)
    decoded = [(Image.open(p).convert("RGB"), q) for p, q in jobs]

    def engine_chat(job):
        im, q = job
        msgs = [{"role": "user", "content": "<image>\n" + q}]
        return engine.chat(msgs, [im], Sampling(max_tokens=n_tok, temperature=0)).result().text

    timed(engine_chat, decoded[:8], 8)
    _, e1, wall1, _ = timed(engine_chat, decoded, 1)
    _, e8, wall8, _ = timed(engine_chat, decoded, 8)
    engine.close()
    engine_gain = (len(decoded) / wall8) / (len(decoded) / wall1)
    assert e1 == e8 == direct_answers, "the engine's answers differ from model.ask's"
    print(
        f"engine alone: {len(decoded) / wall1:.1f} req/s with 1 client, {len(decoded) / wall8:.1f} with 8: "
        f"{engine_gain:.2f}x",
        flush=True,
    )
    del model

    port = free_port()
    server = start_server(ckpt, port, args.threads, args.limit)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        name = client.models.list().data[0].id

        local = threading.local()

        def post(path: str, body: dict) -> dict:
            """A plain keep-alive HTTP/1.1 client per thread (--client http): little client CPU."""
            if getattr(local, "conn", None) is None:
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            local.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = local.conn.getresponse()
            data = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data}")
            return data

        def chat(job):
            path, question = job
            msgs = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(path)}},
                        {"type": "text", "text": question},
                    ],
                }
            ]
            if args.client == "http":
                body = {"model": name, "messages": msgs, "max_tokens": n_tok, "temperature": 0}
                return post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
            r = client.chat.completions.create(model=name, messages=msgs, max_tokens=n_tok, temperature=0)
            return r.choices[0].message.content

        def embed(i):
            item = data_url(jobs[i][0]) if i % 2 else jobs[i][1]
            if args.client == "http":
                return len(post("/v1/embeddings", {"model": name, "input": [item]})["data"][0]["embedding"])
            r = client.embeddings.create(model=name, input=[item])
            return len(r.data[0].embedding)

        timed(chat, jobs[:8], 8)  # warm-up
        timed(embed, list(range(8)), 8)
        results = {}
        wrong = []
        for label, clients, fn, work in (
            ("chat, 1 client", 1, chat, jobs[:24]),
            ("chat, 8 clients", 8, chat, jobs),
            (f"chat, {len(jobs)} concurrent", len(jobs), chat, jobs),
            (f"embeddings, {len(jobs)} concurrent", len(jobs), embed, list(range(len(jobs)))),
        ):
            lat, out, wall, errors = timed(fn, work, clients)
            if fn is chat:
                wrong += [(j, a) for j, a in zip(work, out, strict=True) if a != direct_answers[jobs.index(j)]]
            results[label] = {
                "requests": len(work),
                "p50_ms": 1000 * statistics.median(lat),
                "p99_ms": 1000 * pct(lat, 0.99),
                "rps": len(work) / wall,
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
            }
            r = results[label]
            print(
                f"{label:28s} p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  {r['rps']:6.1f} req/s  "
                f"errors {r['errors']}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    one, eight = results["chat, 1 client"], results["chat, 8 clients"]
    gain = eight["rps"] / one["rps"]
    overhead_ms = one["p50_ms"] - 1000 * direct
    total_errors = sum(r["errors"] for r in results.values())
    print(f"direct model.ask: {1000 * direct:.1f} ms per call (median of 24)")
    print(f"batching gain (8 clients / 1 client): {gain:.2f}x (the engine alone: {engine_gain:.2f}x)")
    print(f"API overhead over a direct call: {overhead_ms:.1f} ms ({one['p50_ms'] / (1000 * direct):.2f}x)")
    print(f"errors: {total_errors}; chat answers different from the direct answer: {len(wrong)}")

    if args.results is None and argv is not None:
        return 0 if total_errors == 0 and not wrong else 1
    out = Path(args.results) if args.results else HERE / "results" / "serve.md"
    import transformers

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.machine(),
    )
    lines = [
        "# Serving under load: `mmlm serve` on loopback",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} with `python benchmarks/serve.py"
        + ("".join(" " + a for a in (argv if argv is not None else sys.argv[1:])))
        + "`.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPUs, CPU only, torch threads {args.threads} (server and direct), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}. The client threads run on the "
        "same two cores as the server; client: "
        + ("the official `openai` client." if args.client == "openai" else "a plain keep-alive HTTP client."),
        "",
        f"Model: {ckpt} (the shapes demo: 96 px images, a 3-layer 128-wide LLM). Chat: one held-out image "
        f"question per request (image as a data URL), greedy, max_tokens {n_tok}; embeddings: one item per "
        "request, texts and images alternating. Engine: max_batch 8; a batch waits up to 10 ms for requests "
        "the server is still reading (the defaults).",
        "",
        "| load | requests | p50 ms | p99 ms | requests/s | errors |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {k} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rps']:.1f} | {r['errors']} |"
            for k, r in results.items()
        ),
        "",
        f"- direct `model.ask` in-process: {1000 * direct:.1f} ms per call (median of 24).",
        f"- batching gain, 8 clients over 1: **{gain:.2f}x** requests/s over HTTP; the engine alone (in-process, "
        f"decoded images, no HTTP): {len(decoded) / wall1:.1f} -> {len(decoded) / wall8:.1f} requests/s, "
        f"**{engine_gain:.2f}x**.",
        f"- API overhead over the direct call: {overhead_ms:.1f} ms per request "
        f"({one['p50_ms'] / (1000 * direct):.2f}x the direct time).",
        f"- errors: {total_errors}; HTTP answers different from the direct answers: {len(wrong)}.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if total_errors == 0 and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
