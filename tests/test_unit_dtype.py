"""The backends' GPU decisions without a GPU: the weights' dtype rule
(:mod:`workers.backends.dtypes`, fake capabilities), llama.cpp's threads and multi-GPU split,
and the captured log of a failed llama.cpp load (:mod:`workers.backends.llama_setup`)."""
from __future__ import annotations

import json
import os
import struct
import sys
import types
from pathlib import Path

import pytest

from workers.backends.dtypes import bf16_supported, choose_dtype, safetensors_dtype, saved_dtype
from workers.backends.llama_setup import GPU_THREADS, choose_threads, gpu_split, load_verbose, native_log
from workers.backends.model import InvalidParams


# -- dtype ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("explicit", "device", "bf16", "saved", "chosen"), [
    (None, "cpu", False, None, "float32"),             # the CPU stays float32
    (None, "cpu", True, "float16", "float32"),         # whatever the model was saved in
    (None, "cuda", True, None, "bfloat16"),            # Ampere and later: bfloat16
    (None, "cuda:1", True, "float16", "bfloat16"),
    (None, "cuda", True, "float32", "bfloat16"),
    (None, "cuda", False, "float16", "float16"),       # older GPU, model saved in float16
    (None, "cuda", False, "bfloat16", "float32"),      # older GPU, anything else: float32
    (None, "cuda", False, "float32", "float32"),
    (None, "cuda", False, None, "float32"),
    ("float16", "cuda", True, "bfloat16", "float16"),  # the manifest always wins
    ("float16", "cpu", False, None, "float16"),
    ("bfloat16", "cuda", False, None, "bfloat16"),
    ("float32", "cuda", True, None, "float32"),
])
def test_the_dtype_rule(explicit: str | None, device: str, bf16: bool, saved: str | None, chosen: str) -> None:
    assert choose_dtype(explicit, device, bf16, saved) == chosen


def test_an_unknown_dtype_is_refused_naming_the_choices() -> None:
    with pytest.raises(InvalidParams, match=r"dtype must be one of float32, float16, bfloat16, got 'fp8'"):
        choose_dtype("fp8", "cuda", True, None)


class FakeTorch:
    """torch.cuda as :func:`bf16_supported` asks it: availability and a compute capability."""

    def __init__(self, available: bool, capability: tuple[int, int]) -> None:
        self.cuda = types.SimpleNamespace(is_available=lambda: available,
                                          get_device_capability=lambda device: capability)

    @staticmethod
    def device(name: str) -> str:
        return name


@pytest.mark.parametrize(("available", "capability", "device", "expected"), [
    (True, (9, 0), "cuda", True), (True, (8, 0), "cuda:0", True), (True, (8, 9), "cuda", True),
    (True, (7, 5), "cuda", False), (True, (7, 0), "cuda", False),
    (False, (9, 0), "cuda", False), (True, (9, 0), "cpu", False),
])
def test_bf16_support_is_compute_capability_8_or_more(available: bool, capability: tuple[int, int], device: str,
                                                      expected: bool) -> None:
    assert bf16_supported(FakeTorch(available, capability), device) is expected


def write_safetensors(path: Path, dtypes: list[str]) -> None:
    header = {f"t{i}": {"dtype": d, "shape": [1], "data_offsets": [0, 2]} for i, d in enumerate(dtypes)}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)


def test_saved_dtype_from_config_or_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert saved_dtype(tmp_path) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))  # transformers' newer key
    assert saved_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert saved_dtype(tmp_path) is None
    write_safetensors(tmp_path / "model.safetensors", ["F16", "F16", "F32"])
    assert saved_dtype(tmp_path) == "float16"
    # A diffusers pipeline: the first folder that says decides.
    (tmp_path / "unet").mkdir()
    write_safetensors(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", ["BF16"])
    assert saved_dtype(tmp_path, ("transformer", "unet", "")) == "bfloat16"
    assert saved_dtype(tmp_path / "nowhere") is None


def test_an_unreadable_safetensors_header_says_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x01")
    assert safetensors_dtype(bad) is None
    bad.write_bytes(struct.pack("<Q", 10**12))  # a header too large to read
    assert safetensors_dtype(bad) is None
    write_safetensors(bad, ["I64"])
    assert safetensors_dtype(bad) is None


# -- llama.cpp: threads, several GPUs, the load's log -----------------------------------------

@pytest.mark.parametrize(("explicit", "share", "affinity", "layers", "threads"), [
    (None, 0, 16, 0, 16),          # CPU: every CPU the process may run on
    (None, 4, 16, 0, 4),           # CPU: its share (modelbay up --workers 4)
    (None, 64, 16, 0, 16),         # a share larger than the affinity set: the affinity
    (None, 0, 16, -1, GPU_THREADS),  # every layer on the GPU: a few threads
    (None, 2, 16, -1, 2),
    (None, 0, 16, 20, 16),         # some layers on the CPU: CPU rules
    (6, 2, 16, -1, 6),             # the option wins
    (None, 0, 1, 0, 1),
])
def test_llama_threads(explicit: int | None, share: int, affinity: int, layers: int, threads: int) -> None:
    assert choose_threads(explicit, share, affinity, layers) == threads


def test_llama_gpu_split() -> None:
    assert gpu_split(1, None, True, -1) == {}
    assert gpu_split(1, None, False, 0) == {}  # one GPU or the CPU: nothing to split
    assert gpu_split(2, None, True, -1) == {}  # llama.cpp splits over the visible GPUs by free memory
    assert gpu_split(1, [3, 1], True, -1) == {"tensor_split": [3.0, 1.0]}
    assert gpu_split(2, [0.5, 0.5], True, 10) == {"tensor_split": [0.5, 0.5]}
    for args, words in (((2, None, False, -1), "GPU offload"), ((2, None, True, 0), "n_gpu_layers is 0"),
                        ((1, "3,1", True, -1), "tensor_split"), ((1, [], True, -1), "tensor_split"),
                        ((1, [-1, 2], True, -1), "tensor_split"), ((1, [0, 0], True, -1), "tensor_split"),
                        ((1, [True], True, -1), "tensor_split"), ((3, [1, 1], True, -1), "gpu_count is 3")):
        with pytest.raises(InvalidParams, match=words):
            gpu_split(*args)


def test_native_log_captures_file_descriptor_2() -> None:
    with native_log(lines=2) as tail:
        os.write(2, b"one\ntwo\n")
        print("three", file=sys.stderr, flush=True)
        assert tail() == "two\nthree"
    assert os.fstat(2)  # restored


def test_a_failed_load_quotes_what_llama_cpp_logged() -> None:
    quiet: list[bool] = []
    lib = types.SimpleNamespace(llama=types.SimpleNamespace(set_verbose=quiet.append))

    def failing(**kwargs: object) -> object:
        assert kwargs["verbose"] is True and kwargs["n_gpu_layers"] == -1
        os.write(2, b"ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n")
        raise ValueError("Failed to load model from file: /m/x.gguf")

    with pytest.raises(RuntimeError) as caught:
        load_verbose(lib, failing, n_gpu_layers=-1)
    message = str(caught.value)
    assert message.startswith("Failed to load model from file: /m/x.gguf; llama.cpp said:")
    assert "no CUDA-capable device is detected" in message and quiet == [False]

    def refused(**kwargs: object) -> object:
        raise InvalidParams("n_ctx is too large")

    with pytest.raises(InvalidParams, match="n_ctx"):
        load_verbose(lib, refused)

    made = types.SimpleNamespace(verbose=True)
    assert load_verbose(lib, lambda **kw: made) is made and made.verbose is False  # quiet generations


# -- several GPUs for one model: honoured or refused clearly, per backend -----------------------

def test_sentence_transformers_refuses_several_gpus() -> None:
    from workers.backends.sentence_transformers import SentenceTransformerModel

    with pytest.raises(InvalidParams, match="gpu_count: sentence-transformers runs one model on one GPU"):
        SentenceTransformerModel().load([], "", {"gpu_count": 2}, "cuda")


def test_diffusers_needs_cuda_and_enough_gpus_for_several() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from workers.backends.diffusers import DiffusersModel

    with pytest.raises(InvalidParams, match="gpu_count 2 needs CUDA"):
        DiffusersModel().load([], "", {"gpu_count": 2, "device": "cpu"}, "cpu")
    with pytest.raises(InvalidParams, match="gpu_count must be >= 1"):
        DiffusersModel().load([], "", {"gpu_count": 0}, "cpu")


def test_llama_refuses_a_split_without_gpu_offload(tmp_path: Path) -> None:
    lib = pytest.importorskip("llama_cpp")
    if lib.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python offloads to a GPU")
    from workers.backends.llama_cpp import LlamaModel

    for options in ({"gpu_count": 2}, {"tensor_split": [1, 1]}):
        with pytest.raises(InvalidParams, match="need llama.cpp built with GPU offload"):
            LlamaModel().load([str(tmp_path / "m.gguf")], str(tmp_path), options, "cuda")
