"""Serving throughput: dynamic batching vs one request at a time, same requests, one run.

Builds a random-init Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, character vocabulary
of 99 tokens padded to 128; about 25M parameters) with 4 rank-16 LoRA experts on all seven
projections and an X-LoRA head (depth 1), saves it, and serves it with ``xlora serve`` in its own
process on 127.0.0.1. 16 client threads (the official ``openai`` client, streaming, greedy,
``ignore_eos`` so every request yields exactly ``--tokens`` tokens) send their requests at once; the
wall time from release to the last byte gives tokens/s (tokens counted from the streams' usage
chunks). Each server setting (``--max-batch`` values, 1 = one at a time) is measured ``--repeats``
times, interleaved, and medians are reported. The greedy texts of every setting must be identical.

``--replicas 1 2`` adds rows served by ``xlora serve --replicas N --cpus-per-replica 1`` on a fresh
local Ray instance (Ray Serve's proxy in front; each replica one torch thread and the largest
``--max-batch``), next to one process on one thread: on 2 cores, 2 replicas can at most double the
tokens/s of 1, less what the proxy, Ray and the clients take from the same cores.

    python benchmarks/serve.py                    # full run (a few minutes on 2 cores)
    python benchmarks/serve.py --threads 1        # the server on one torch thread (better on a busy machine)
    python benchmarks/serve.py --max-batch 16 --replicas 1 2 --threads 1   # Ray Serve replicas (cluster extra)
    python benchmarks/serve.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def char_tokenizer():
    """Printable ASCII, one token per character, with a minimal chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_model(root: Path, hidden: int, layers: int, experts: int, rank: int) -> tuple[Path, int]:
    from generate import make_experts
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from xlora import XLoraConfig, XLoraModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=128, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(str(root / "base"))
    char_tokenizer().save_pretrained(str(root / "base"))
    paths = make_experts(base, root, experts, rank)  # the same experts as benchmarks/generate.py
    base = AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()
    n_params = sum(p.numel() for p in base.parameters())
    XLoraModel(base, XLoraConfig(experts=paths)).save_pretrained(root / "xlora")
    return root / "xlora", n_params


def prompts(n: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    return [" ".join(words[(i * 3) % len(words):] + words[: (i * 3) % len(words)])[: 12 + 3 * i] for i in range(n)]


def metric(url: str, name: str) -> float:
    import httpx

    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


def measure(model_dir: Path, max_batch: int, window_ms: float, texts: list[str], tokens: int,
            threads: int | None, replicas: int | None = None) -> dict:
    """Start ``xlora serve`` (its own process; ``replicas``: on Ray Serve), fire every request at once;
    wall time, tokens, latencies."""
    import httpx
    from openai import OpenAI

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "xlora", "serve", str(model_dir), "--port", str(port), "--model-name", "bench",
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--log-level", "warning"]
    if replicas:
        cmd += ["--replicas", str(replicas), "--cpus-per-replica", "1", "--object-store-mb", "100"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, "the server failed to start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.1)
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        ask = dict(model="bench", max_tokens=tokens, temperature=0, stream=True,
                   stream_options={"include_usage": True}, extra_body={"xlora": {"ignore_eos": True}})
        with ThreadPoolExecutor(4) as pool:  # warm every replica up (the proxy spreads concurrent requests)
            list(pool.map(lambda _: list(client.completions.create(prompt="warm up", **{**ask, "max_tokens": 4})),
                          range(4 * (replicas or 1))))
        batches0 = metric(url, "xlora_batch_size_count")
        out: dict[int, str] = {}
        ttft: dict[int, float] = {}
        done: dict[int, float] = {}
        usage: dict[int, int] = {}
        barrier = threading.Barrier(len(texts) + 1)

        def run(i: int) -> None:
            barrier.wait()
            t0, pieces = time.perf_counter(), []
            for chunk in client.completions.create(prompt=texts[i], **ask):
                if chunk.choices and chunk.choices[0].text:
                    ttft.setdefault(i, time.perf_counter() - t0)
                    pieces.append(chunk.choices[0].text)
                if chunk.usage:
                    usage[i] = chunk.usage.completion_tokens
            done[i] = time.perf_counter() - t0
            out[i] = "".join(pieces)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
        for t in workers:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in workers:
            t.join()
        wall = time.perf_counter() - start
        batches = metric(url, "xlora_batch_size_count") - batches0
    finally:
        proc.terminate()
        proc.wait(60)
    generated = sum(usage.values())
    return {"wall": wall, "tokens": generated, "tok_s": generated / wall, "texts": [out[i] for i in range(len(texts))],
            "ttft": statistics.median(ttft.values()), "latency": statistics.median(done.values()),
            "batches": int(batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[16, 8, 1], help="settings to compare (1 = serial)")
    ap.add_argument("--window-ms", type=float, default=20.0, help="the server's --batch-window-ms")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: torch's)")
    ap.add_argument("--replicas", type=int, nargs="*", default=[],
                    help="also serve on Ray Serve with these replica counts (one thread each)")
    ap.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 8 clients, 16 tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.clients, args.tokens, args.repeats = 128, 2, 8, 16, 1
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, server on {threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, n_params = build_model(Path(tmp), args.hidden, args.layers, args.experts, 16)
        print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f}M base parameters; "
              f"{args.experts} rank-16 experts on 7 projections; {args.clients} streaming clients x {args.tokens} "
              f"tokens, greedy, ignore_eos; batch window {args.window_ms} ms")
        texts = prompts(args.clients)
        settings = [(str(b), b, None) for b in args.max_batch]
        settings += [(f"{n} replica{'s' * (n > 1)}", max(args.max_batch), n) for n in args.replicas]
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in settings}
        for _ in range(args.repeats):
            for label, b, n in settings:
                runs[label].append(measure(model_dir, b, args.window_ms, texts, args.tokens, args.threads, n))
    print(f"\n{'setting':>10} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'TTFT s':>8} {'latency s':>10} {'batches':>8}")
    med = {}
    for label, rs in runs.items():
        med[label] = statistics.median(r["tok_s"] for r in rs)
        r = rs[0]
        print(f"{label:>10} {statistics.median(x['wall'] for x in rs):>8.2f} {r['tokens']:>7} {med[label]:>8.1f} "
              f"{statistics.median(x['ttft'] for x in rs):>8.2f} {statistics.median(x['latency'] for x in rs):>10.2f}"
              f" {r['batches']:>8}")
    first = settings[0][0]
    same = all(r["texts"] == runs[first][0]["texts"] for rs in runs.values() for r in rs)
    print(f"\ngreedy texts identical across settings and repeats: {same}")
    # baselines by setting, not by label: one process serving one request at a time, and one replica
    serial = next((label for label, b, n in settings if n is None and b == 1), None)
    single = next((label for label, _, n in settings if n == 1), None)
    for label, b, n in settings:
        if serial is not None and n is None and label != serial:
            print(f"throughput ratio, max_batch {b} vs 1: {med[label] / med[serial]:.2f}x")
        if single is not None and n is not None and n > 1:
            print(f"throughput ratio, {label} vs 1 replica: {med[label] / med[single]:.2f}x")


if __name__ == "__main__":
    main()
