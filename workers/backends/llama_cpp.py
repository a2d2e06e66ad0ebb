"""The llama-cpp backend: chat and text completion from a GGUF file with llama-cpp-python.

Run as ``python -m workers.backends.llama_cpp --socket PATH --model NAME --instance ID``
(manifest backend name ``llama-cpp``; the library comes with ``pip install 'modelbay[llama]'``).

LoadModel options (``options_json``):

- ``file`` (str): the GGUF file, relative to the model directory; default: the first staged
  file whose name ends in ``.gguf``.
- ``n_ctx`` (int, tokens, default 2048): context window, prompt and completion together;
  0 takes the model's training context.
- ``n_gpu_layers`` (int, layers, default -1 = all when the worker did not ask for "cpu"
  and llama.cpp can offload to a visible GPU, else 0): layers offloaded to the GPU.
- ``n_threads`` (int, default: the process's share of the CPUs, at most 4 with every layer on
  the GPU; :mod:`workers.backends.llama_setup`): CPU threads.
- ``gpu_count`` (int >= 1, default 1; the worker sets it for a manifest with ``gpus`` > 1) and
  ``tensor_split`` (list of proportions, one per visible GPU): the layers over several GPUs
  (see :mod:`workers.backends.llama_setup`).

A load that fails quotes the last lines llama.cpp logged (a CUDA error, an unknown
architecture), not only llama-cpp-python's "Failed to load model from file".
- ``n_batch`` (int, tokens, default 512): prompt tokens evaluated per batch.
- ``chat_format`` (str, optional): a llama-cpp-python built-in prompt format ("chatml",
  "llama-2", ...) instead of the chat template stored in the GGUF (``tokenizer.chat_template``).
- ``seed`` (int, optional): seed of generations that send none; default: a random seed each.
- ``repack`` (bool, optional): repack the weights into the CPU's faster layouts (llama.cpp's
  "extra buffer types"). Default: on, except on CPUs with AMX (``amx_int8`` and ``amx_tile``
  among the flags of ``/proc/cpuinfo``, or of ``MODELBAY_CPU_FLAGS`` when set), where ggml's
  AMX matmul path crashes (SIGSEGV on the first decode); true or false forces the choice.
  ``stats()["repack"]`` says what the load chose, and why.

LoadModel ends with a warm-up: the prompt "Hi" evaluated and one token sampled, so a model
that cannot run fails its load instead of every job after it.

Generate params (``params_json``):

- ``max_tokens`` (int >= 1, tokens, default 256): capped by what the context has left.
- ``temperature`` (float >= 0, default 0.8; 0 = greedy), ``top_p`` (float in [0, 1],
  default 0.95), ``top_k`` (int >= 0, default 40; 0 = off).
- ``seed`` (int in [0, 2**32)): with a seed (or the load option) the prompt is evaluated
  afresh, without reusing the previous generation's KV cache, so the same seed gives the
  same text; without one a prompt prefix shared with the previous generation is reused.
- ``stop`` (str or list of str): the text ends before the first of them; never streamed.

Chat (non-empty ``messages``) renders the chat template itself, as llama-cpp-python's
``create_chat_completion`` does (Jinja2ChatFormatter with the GGUF's bos/eos tokens, the
generation prompt added, the template's stop token), then streams ``create_completion`` on
the token ids; so :meth:`LlamaModel.prompt_tokens` is exact. One piece is streamed per
token, except where llama-cpp-python holds text back (a possible stop-sequence prefix, an
incomplete UTF-8 character) and sends it with a later token. A Llama object is not
thread-safe: generations take turns (a waiting one gives up when cancelled).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tasks.settings import load_settings
from workers.backends.model import BackendModel, InvalidParams, LoadInfo
from workers.backends.libs import option, require
from workers.backends.llama_setup import affinity_cpus, choose_threads, gpu_split, load_verbose
from workers.backends.server import main as base_main

MAX_SEED = 2**32 - 1
AMX_FLAGS = frozenset({"amx_int8", "amx_tile"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: ``MODELBAY_CPU_FLAGS`` (space-separated) when set, else the
    ``flags`` line of ``/proc/cpuinfo`` (empty where there is none)."""
    override = load_settings().cpu_flags
    if override:
        return frozenset(override.split())
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def choose_repack(option_value: bool | None, flags: frozenset[str]) -> tuple[bool, str]:
    """Whether to repack weights (llama.cpp's ``use_extra_bufts``), and why: the option when
    given, else on unless the CPU has AMX, whose repacked matmul path crashes in ggml."""
    if option_value is not None:
        return option_value, "the repack option"
    if AMX_FLAGS <= flags:
        return False, "the CPU has AMX (amx_int8, amx_tile): ggml's AMX path crashes, so repacking is off"
    return True, "the CPU has no AMX"


def new_llama(lib: ModuleType, use_extra_bufts: bool, **kwargs: Any) -> Any:
    """``lib.Llama(**kwargs)`` with ``llama_model_params.use_extra_bufts`` set (weight
    repacking): llama-cpp-python's constructor takes its model params from
    ``llama_model_default_params()`` and has no argument for it, so that function is wrapped
    while the model loads. A backend process loads one model, so nothing else constructs a
    Llama meanwhile; the tests and benchmarks build their reference models with it too."""
    bindings = lib.llama_cpp
    default = bindings.llama_model_default_params
    if not hasattr(default(), "use_extra_bufts"):
        if not use_extra_bufts:
            raise InvalidParams("repack=false needs llama-cpp-python >= 0.3.16 (llama_model_params.use_extra_bufts)")
        return lib.Llama(**kwargs)

    def params() -> Any:
        made = default()
        made.use_extra_bufts = use_extra_bufts
        return made

    bindings.llama_model_default_params = params
    try:
        return lib.Llama(**kwargs)
    finally:
        bindings.llama_model_default_params = default


def _llama() -> ModuleType:
    return require("llama_cpp", "llama-cpp", "llama")


@dataclass(frozen=True)
class _Prompt:
    tokens: list[int]
    stop: list[str]
    stopping_criteria: Any


@dataclass(frozen=True)
class _Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]


def _sampling(params: dict[str, Any]) -> _Sampling:
    stop = params.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidParams(f"stop must be a string or a list of strings, got {stop!r}")
    return _Sampling(max_tokens=option(params, "max_tokens", int, 256, minimum=1),
                     temperature=option(params, "temperature", float, 0.8, minimum=0.0),
                     top_p=option(params, "top_p", float, 0.95, minimum=0.0, maximum=1.0),
                     top_k=option(params, "top_k", int, 40, minimum=0),
                     seed=option(params, "seed", int, None, minimum=0, maximum=MAX_SEED),
                     stop=[s for s in stop if s])


def _builtin_formatter(lib: ModuleType, name: str) -> Any:
    """The ChatFormatter behind llama-cpp-python's registered format ``name``: the registry
    keeps only the completion handler, which closes over its formatter."""
    try:
        handler = lib.llama_chat_format.get_chat_completion_handler(name)
    except Exception as exc:  # LlamaChatCompletionHandlerNotFoundException lists the valid names
        raise InvalidParams(f"chat_format: {exc}") from exc
    code, closure = getattr(handler, "__code__", None), getattr(handler, "__closure__", None) or ()
    cells = dict(zip(code.co_freevars, closure)) if code is not None else {}
    if "chat_formatter" not in cells:
        raise InvalidParams(f"chat_format {name!r} is not a plain prompt format (it needs its own handler)")
    return cells["chat_formatter"].cell_contents


class LlamaModel(BackendModel):
    """A GGUF model in llama.cpp; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._llm: Any = None
        self._formatter: Any = None
        self._seed: int | None = None
        self._slot = threading.Lock()  # one generation at a time per Llama object
        self._stats_lock = threading.Lock()
        self._generations = self._tokens = self._last_tokens = 0
        self._repack: tuple[bool, str] | None = None

    # -- load / free -------------------------------------------------------------------
    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str) -> LoadInfo:
        lib = _llama()  # first: a missing library is the error to report
        path = self._gguf_path(files, model_dir, options)
        n_ctx = option(options, "n_ctx", int, 2048, minimum=0)
        n_batch = option(options, "n_batch", int, 512, minimum=1)
        chat_format = option(options, "chat_format", str, None)
        seed = option(options, "seed", int, None, minimum=0, maximum=MAX_SEED)
        gpu_ok = bool(lib.llama_supports_gpu_offload())
        n_gpu_layers = option(options, "n_gpu_layers", int, -1 if gpu_ok and device != "cpu" else 0, minimum=-1)
        n_threads = choose_threads(option(options, "n_threads", int, None, minimum=1), load_settings().backend_cpus,
                                   affinity_cpus(), n_gpu_layers if gpu_ok else 0)
        split = gpu_split(option(options, "gpu_count", int, 1, 1, 64), options.get("tensor_split"), gpu_ok,
                          n_gpu_layers)
        formatter = _builtin_formatter(lib, chat_format) if chat_format else None
        repack, why = choose_repack(option(options, "repack", bool, None), cpu_flags())
        llm = load_verbose(lib, lambda **kw: new_llama(lib, repack, **kw), model_path=path, n_ctx=n_ctx,
                           n_batch=n_batch, n_threads=n_threads, n_threads_batch=n_threads,
                           n_gpu_layers=n_gpu_layers, **split)
        self._repack = (bool(getattr(llm.model_params, "use_extra_bufts", True)), why)  # what llama.cpp got
        if formatter is None:
            formatter = self._gguf_formatter(lib, llm)
        self._llm, self._formatter, self._seed = llm, formatter, seed
        memory_mb = math.ceil(os.path.getsize(path) / 2**20) + self._kv_cache_mb(llm)
        return LoadInfo(memory_mb=memory_mb, device="cuda" if gpu_ok and n_gpu_layers != 0 else "cpu")

    @staticmethod
    def _gguf_path(files: list[str], model_dir: str, options: dict[str, Any]) -> str:
        name = option(options, "file", str, None)
        if name is not None:
            root = os.path.realpath(model_dir)
            path = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
                raise InvalidParams(f"file: {name!r} is not a file in the model directory {model_dir!r}")
            return path
        for candidate in files:
            if candidate.lower().endswith(".gguf"):
                return candidate if os.path.isabs(candidate) else os.path.join(model_dir, candidate)
        raise InvalidParams(f"no .gguf file among the staged files {files!r}; name one with the option file")

    @staticmethod
    def _gguf_formatter(lib: ModuleType, llm: Any) -> Any:
        """A Jinja2ChatFormatter for the GGUF's own template, or None if it has none."""
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = llm.token_eos(), llm.token_bos()  # token texts as Llama.__init__ gives its template
        return lib.llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])

    @staticmethod
    def _kv_cache_mb(llm: Any) -> int:
        """KV cache estimate in MiB: K and V in f16 for every layer and context position."""
        meta = llm.metadata
        arch = meta.get("general.architecture", "")
        try:
            layers = int(meta[f"{arch}.block_count"])
            heads = int(meta.get(f"{arch}.attention.head_count", 1))
            kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        except (KeyError, ValueError):
            return 0
        kv_dim = llm.n_embd() * kv_heads // max(heads, 1)
        return math.ceil(2 * llm.n_ctx() * layers * kv_dim * 2 / 2**20)

    def warmup(self) -> None:
        """Evaluate a two-token prompt and sample one token (greedy), then forget it."""
        llm = self._loaded()
        with self._slot:
            for _ in llm.create_completion(llm.tokenize(b"Hi", add_bos=True), max_tokens=1, temperature=0.0,
                                           stream=True):
                pass
            llm.reset()

    def free(self) -> None:
        with self._slot:
            llm, self._llm, self._formatter = self._llm, None, None
        if llm is not None:
            llm.close()

    # -- tokens ------------------------------------------------------------------------
    def _loaded(self) -> Any:
        if self._llm is None:
            raise RuntimeError("no model loaded")
        return self._llm

    def _prompt(self, prompt: str, messages: list[dict[str, str]]) -> _Prompt:
        llm = self._loaded()
        if not messages:
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            if not tokens:
                raise InvalidParams("prompt is empty (send a prompt or messages)")
            return _Prompt(tokens, [], None)
        if self._formatter is None:
            raise InvalidParams("messages: the GGUF has no chat template (tokenizer.chat_template); "
                                "set the LoadModel option chat_format or send a prompt")
        try:
            result = self._formatter(messages=messages)
        except Exception as exc:  # a template's raise_exception, a Jinja error
            raise InvalidParams(f"messages: the chat template refused them: {exc}") from exc
        tokens = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = [] if result.stop is None else [result.stop] if isinstance(result.stop, str) else list(result.stop)
        return _Prompt(tokens, [s for s in stop if s], result.stopping_criteria)

    def prompt_tokens(self, prompt: str, messages: list[dict[str, str]]) -> int:
        return len(self._prompt(prompt, messages).tokens)

    def count_tokens(self, text: str) -> int:
        if self._llm is None:
            return super().count_tokens(text)
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False))

    # -- generate ----------------------------------------------------------------------
    def generate(
        self, prompt: str, messages: list[dict[str, str]], params: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> Generator[str, None, str]:
        sampling = _sampling(params)
        llm = self._loaded()
        rendered = self._prompt(prompt, messages)
        room = llm.n_ctx() - len(rendered.tokens)
        if room < 1:
            raise InvalidParams(f"prompt is {len(rendered.tokens)} tokens; the context (n_ctx) holds {llm.n_ctx()}")
        while not self._slot.acquire(timeout=0.05):  # wait for the slot, giving up when cancelled
            if cancelled():
                return "stop"
        pieces, reason = 0, "stop"
        try:
            if self._llm is not llm:
                raise RuntimeError("the model was freed")
            seed = sampling.seed if sampling.seed is not None else self._seed
            if seed is not None:  # a reused prompt prefix changes the numerics: same seed, same text
                llm.reset()
            stream = llm.create_completion(
                rendered.tokens, max_tokens=min(sampling.max_tokens, room), temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k, stop=sampling.stop + rendered.stop,
                stopping_criteria=rendered.stopping_criteria, stream=True,
                seed=seed if seed is not None else random.randrange(MAX_SEED + 1))
            try:
                for chunk in stream:
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        pieces += 1
                        yield choice["text"]
                    reason = choice.get("finish_reason") or reason
                    if cancelled():  # before llama computes the next token
                        return "stop"
            finally:
                stream.close()  # a closed stream stops llama at its next token
            return "length" if reason == "length" else "stop"
        finally:
            self._slot.release()
            with self._stats_lock:
                self._generations += 1
                self._tokens += pieces
                self._last_tokens = pieces

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            stats: dict[str, Any] = {"generations": self._generations, "tokens": self._tokens,
                                     "last_tokens": self._last_tokens}
        if self._repack is not None:
            stats["repack"], stats["repack_reason"] = self._repack
        return stats


def main(argv: Sequence[str] | None = None) -> int:
    return base_main(LlamaModel, argv, backend_name="llama_cpp")


if __name__ == "__main__":
    sys.exit(main())
