"""Benchmark `mgpt4 serve`: N concurrent `openai` clients vs the same requests sent one at a time.

    python bench/serve.py                                   # micro preset on CPU, 32 requests, 8 clients
    python bench/serve.py --preset vicuna-7b --device cuda --requests 64 --max-tokens 64

The server runs ``run_serve`` (what ``mgpt4 serve`` runs) in a child process on 127.0.0.1, with a
random-weight model of the preset's shape, so the clients and the server do not share a GIL. Every
request is greedy (``temperature=0``), carries its own image as a base64 data URL plus a question, and
asks for ``--max-tokens`` tokens. The same requests are sent

  (a) one at a time: each waits for the previous answer (a one-request-at-a-time server's throughput);
  (b) by ``--clients`` threads at once, each with its own ``openai.OpenAI`` client.

It prints requests/s and completion tokens/s for both, the ratio (target ≥ 3× at 8 clients), whether
every concurrent answer equals the sequential one, and the batch sizes the server logged. Timings are
medians over ``--repeats`` runs after a warm-up; the machine's load average is recorded with them.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
QUESTIONS = ("what is in the picture?", "which shapes do you see?", "describe the colours", "where is it?")


# --------------------------------------------------------------------------------------------------
# the server (child process)
# --------------------------------------------------------------------------------------------------


def serve_main(args: argparse.Namespace) -> None:
    """Child process: build a random model of the preset's shape and serve it; print the URL."""
    import logging

    import torch

    from mgpt4.config import ModelConfig
    from mgpt4.infer.loading import load_model
    from mgpt4.serve import ServeConfig, run_serve

    if args.threads:
        torch.set_num_threads(args.threads)
    handler = logging.FileHandler(args.request_log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("mgpt4.serve.requests").addHandler(handler)
    logging.getLogger("mgpt4.serve.requests").setLevel(logging.INFO)
    torch.manual_seed(0)
    model = load_model(ModelConfig(preset=args.preset, dtype=args.dtype), device=args.device)
    cfg = ServeConfig(
        port=0,
        json=True,
        max_batch_size=args.clients,
        batch_wait_ms=args.batch_wait_ms,
        max_tokens=max(args.max_tokens, 1),
    )
    run_serve(cfg, model, ready=lambda handle: print(handle.url, flush=True))


def start_server(args: argparse.Namespace, request_log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, __file__, "--serve", "--request-log", str(request_log)]
    for name in ("preset", "device", "dtype", "clients", "batch_wait_ms", "max_tokens", "threads"):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    url = server.stdout.readline().strip()
    if not url.startswith("http"):
        server.kill()
        raise SystemExit(f"the server did not start (exit code {server.wait()})")
    return server, url


# --------------------------------------------------------------------------------------------------
# the clients
# --------------------------------------------------------------------------------------------------


def make_requests(count: int, image_size: int) -> list[list[dict]]:
    """One user message per request: its own noise-and-blobs PNG as a data URL, and a question."""
    rng = np.random.default_rng(0)
    requests = []
    for index in range(count):
        pixels = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)] + f" (#{index})"},
        ]
        requests.append([{"role": "user", "content": content}])
    return requests


STREAM = False  # --stream: every request streams (SSE), as chat UIs ask


def ask(client, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    params = dict(model="bench", messages=messages, temperature=0, max_tokens=max_tokens)
    if not STREAM:
        reply = client.chat.completions.create(**params)
        return reply.choices[0].message.content, reply.usage.completion_tokens
    text, tokens = "", 0
    for chunk in client.chat.completions.create(
        **params, stream=True, stream_options={"include_usage": True}
    ):
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return text, tokens


def one_at_a_time(url: str, requests: list, max_tokens: int) -> tuple[float, list]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    start = time.perf_counter()
    answers = [ask(client, messages, max_tokens) for messages in requests]
    return time.perf_counter() - start, answers


def concurrently(url: str, requests: list, max_tokens: int, clients: int) -> tuple[float, list]:
    import openai

    pool_clients = [
        openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
        for _ in range(clients)
    ]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(ask, pool_clients[index % clients], messages, max_tokens)
            for index, messages in enumerate(requests)
        ]
        answers = [future.result() for future in futures]
    return time.perf_counter() - start, answers


def batch_sizes(request_log: Path, skip: int) -> list[int]:
    lines = request_log.read_text().splitlines()[skip:]
    return [json.loads(line)["batch_size"] for line in lines if line.startswith("{")]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        request_log = Path(folder) / "requests.jsonl"
        load_before = os.getloadavg()
        server, url = start_server(args, request_log)
        try:
            requests = make_requests(args.requests, args.image_size)
            one_at_a_time(url, requests[: args.clients], args.max_tokens)  # warm-up
            sequential, batched, sizes = [], [], []
            for _ in range(args.repeats):
                sequential.append(one_at_a_time(url, requests, args.max_tokens))
                logged = len(request_log.read_text().splitlines())
                batched.append(concurrently(url, requests, args.max_tokens, args.clients))
                sizes += batch_sizes(request_log, logged)
        finally:
            server.terminate()
            server.wait(60)
        load_after = os.getloadavg()
    seq_seconds = statistics.median(s for s, _ in sequential)
    bat_seconds = statistics.median(s for s, _ in batched)
    tokens = sum(t for _, t in sequential[0][1])
    equal = all(answers == sequential[0][1] for _, answers in sequential + batched)
    return {
        "preset": args.preset,
        "device": args.device,
        "requests": args.requests,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "stream": args.stream,
        "completion_tokens": tokens,
        "one_at_a_time": {"seconds": seq_seconds, "requests_per_s": args.requests / seq_seconds,
                          "tokens_per_s": tokens / seq_seconds},
        "concurrent": {"seconds": bat_seconds, "requests_per_s": args.requests / bat_seconds,
                       "tokens_per_s": tokens / bat_seconds},
        "ratio": seq_seconds / bat_seconds,
        "answers_equal": equal,
        "batch_sizes": {str(size): sizes.count(size) for size in sorted(set(sizes))},
        "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
                    "platform": platform.platform(), "threads": args.threads},
        "repeats": args.repeats,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, and the max batch size")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="server's torch intra-op threads")
    parser.add_argument("--stream", action="store_true", help="every request streams its answer (SSE)")
    parser.add_argument(
        "--output", help="write the JSON result here (default: bench/results/serve_PRESET_DEVICE.json)"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--request-log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(args)
        return
    global STREAM
    STREAM = args.stream
    result = run(args)
    one, many = result["one_at_a_time"], result["concurrent"]
    print(
        f"mgpt4 serve · preset {args.preset} on {args.device} · {args.requests} "
        f"{'streamed ' if args.stream else ''}requests × "
        f"{args.max_tokens} tokens max · {result['completion_tokens']} tokens generated"
    )
    print(f"{'':>16} {'requests/s':>11} {'tokens/s':>10}")
    print(f"{'one at a time':>16} {one['requests_per_s']:>11.2f} {one['tokens_per_s']:>10.1f}")
    print(f"{f'{args.clients} concurrent':>16} {many['requests_per_s']:>11.2f} {many['tokens_per_s']:>10.1f}")
    print(f"ratio {result['ratio']:.2f}x · answers equal: {result['answers_equal']} · "
          f"batch sizes {result['batch_sizes']} · load {result['machine']['load_before'][0]:.2f} → "
          f"{result['machine']['load_after'][0]:.2f} on {result['machine']['cpus']} CPUs")  # fmt: skip
    name = f"serve_{args.preset}_{args.device.replace(':', '')}{'_stream' if args.stream else ''}.json"
    output = Path(args.output or HERE / "results" / name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
