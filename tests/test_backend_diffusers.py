"""Real-process tests of the diffusers image backend over a tiny local pipeline.

The pipeline (:mod:`tinydiffusion`) is built once per module, randomly initialised and
entirely offline. Every test starts real ``python -m workers.backends.diffusers``
processes through :class:`BackendProcess`; the ``backends`` fixture stops each one and
checks that none is left behind. Waiting is done by polling with a deadline.
"""
from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from helpers import poll
from tinydiffusion import build_tiny_pipeline

from workers.supervisor.calls import BackendCallError, BackendCancelled, ImageCall, ImageEvent
from workers.supervisor.process import BackendProcess

LOAD_TIMEOUT_S = 180.0  # importing torch and diffusers in a fresh process is slow on a busy CPU
CALL_TIMEOUT_S = 120.0
SMALL = {"width": 16, "height": 16, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tinysd") / "pipeline")


def files_of(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*") if p.is_file())


def loaded(make: Callable[..., BackendProcess], pipeline: Path, options: dict[str, Any] | None = None,
           **kwargs: Any) -> tuple[BackendProcess, dict[str, Any]]:
    """A started diffusers backend with the tiny pipeline loaded on the CPU (the files as
    staged, the model directory one level above the pipeline, so the backend must find it)."""
    bp = make("diffusers", "tiny-sd", **kwargs)
    bp.start()
    info = bp.load(files_of(pipeline), str(pipeline.parent), options or {}, "cpu", timeout_s=LOAD_TIMEOUT_S)
    return bp, info


def image(bp: BackendProcess, params: dict[str, Any], prompt: str = "a red square") -> list[ImageEvent]:
    events = list(bp.generate_image(prompt, params, timeout_s=CALL_TIMEOUT_S))
    assert events and events[-1].png is not None
    assert all(e.png is None for e in events[:-1])
    return events


def decode(png: bytes | None) -> Any:
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png))


class Consumer:
    """Iterates an :class:`ImageCall` in a thread, keeping its events and its error."""

    def __init__(self, call: ImageCall) -> None:
        self.call = call
        self.events: list[ImageEvent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the image call did not end"


def test_image_size_progress_seed(backends: Callable[..., BackendProcess], pipeline_dir: Path) -> None:
    bp, info = loaded(backends, pipeline_dir)
    assert info["ok"] and info["device"] == "cpu" and info["memory_mb"] >= 1
    status = bp.status()
    assert status["state"] == "ready" and status["device"] == "cpu"
    assert status["stats"] == {"images": 0, "steps_run": 0, "last_steps": 0}

    params = {"width": 64, "height": 48, "steps": 4, "seed": 1234, "guidance": 7.5, "negative_prompt": "blue"}
    events = image(bp, params)
    assert [(e.step, e.steps) for e in events[:-1]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    last = events[-1]
    assert (last.width, last.height, last.seed) == (64, 48, 1234)
    picture = decode(last.png)
    assert picture.size == (64, 48) and picture.mode == "RGB"

    # The same seed and params give the same bytes; another seed another picture.
    assert image(bp, params)[-1].png == last.png
    assert image(bp, {**params, "seed": 99})[-1].png != last.png

    # Defaults: the pipeline's native size (sample_size 8 x VAE factor 8), a random seed
    # reported back; guidance 0 turns classifier-free guidance off.
    events = image(bp, {"steps": 1, "guidance": 0})
    assert [(e.step, e.steps) for e in events[:-1]] == [(1, 1)]
    assert decode(events[-1].png).size == (64, 64) and (events[-1].width, events[-1].height) == (64, 64)
    seed = events[-1].seed
    assert 0 <= seed < 2**63
    assert image(bp, {"steps": 1, "guidance": 0, "seed": seed})[-1].png == events[-1].png

    status = bp.status()
    assert status["stats"] == {"images": 5, "steps_run": 4 * 3 + 1 + 1, "last_steps": 1}
    assert (status["generations_started"], status["generations_completed"], status["active_calls"]) == (5, 5, 0)
    assert bp.free() and bp.status()["state"] == "empty"


def test_cancel_stops_mid_generation(backends: Callable[..., BackendProcess], pipeline_dir: Path) -> None:
    bp, _ = loaded(backends, pipeline_dir)
    long = Consumer(bp.generate_image("a long one", {"steps": 500, "width": 64, "height": 64, "seed": 3},
                                      timeout_s=CALL_TIMEOUT_S))
    poll(lambda: len(long.events) >= 2, 60, "two progress events")
    # A second call meanwhile waits for the pipeline, then runs once the first is cancelled.
    waiting = Consumer(bp.generate_image("next", SMALL, timeout_s=CALL_TIMEOUT_S))
    poll(lambda: bp.status()["active_calls"] == 2, 10, "the second call to arrive")

    t0 = time.monotonic()
    long.call.cancel()
    long.join(10)
    assert isinstance(long.error, BackendCancelled), long.error
    assert all(e.png is None and e.steps == 500 for e in long.events)
    assert [e.step for e in long.events] == list(range(1, len(long.events) + 1))

    waiting.join(60)
    assert waiting.error is None and [(e.step, e.steps) for e in waiting.events[:-1]] == [(1, 2), (2, 2)]
    assert decode(waiting.events[-1].png).size == (16, 16)

    status = poll(lambda: (s := bp.status())["active_calls"] == 0 and s, 30, "no active call")
    assert time.monotonic() - t0 < 30
    assert (status["generations_cancelled"], status["generations_completed"]) == (1, 1)
    stats = status["stats"]
    assert stats["images"] == 1 and stats["last_steps"] == 2
    cancelled_steps = stats["steps_run"] - 2
    assert len(long.events) <= cancelled_steps < 500

    # The backend still serves after the cancel.
    events = image(bp, {**SMALL, "width": 24})
    assert decode(events[-1].png).size == (24, 16)
    assert bp.status()["stats"]["images"] == 2


def test_bad_options_and_params(backends: Callable[..., BackendProcess], pipeline_dir: Path,
                                tmp_path: Path) -> None:
    bp = backends("diffusers", "tiny-sd")
    bp.start()
    bad_loads: list[tuple[list[str], str, dict[str, Any], str]] = [
        ([], str(pipeline_dir.parent), {"dtype": "float8"}, "dtype"),
        ([], str(pipeline_dir.parent), {"dtype": 16}, "dtype"),
        ([], str(pipeline_dir.parent), {"path": "../elsewhere"}, "path"),
        ([], str(pipeline_dir.parent), {"path": "nope"}, "model_index.json"),
        ([], str(tmp_path), {}, "model_index.json"),
        ([], str(pipeline_dir.parent), {"device": "tpu"}, "device"),
    ]
    for files, model_dir, options, named in bad_loads:
        with pytest.raises(BackendCallError) as info:
            bp.load(files, model_dir, options, "cpu", timeout_s=LOAD_TIMEOUT_S)
        assert info.value.grpc_code == "INVALID_ARGUMENT", (options, info.value)
        assert named in str(info.value)
    assert bp.status()["state"] == "empty"

    # The option path names the pipeline directory explicitly (no files needed).
    info_ok = bp.load([], str(pipeline_dir.parent), {"path": pipeline_dir.name, "dtype": "float32"}, "cpu",
                      timeout_s=LOAD_TIMEOUT_S)
    assert info_ok["device"] == "cpu"

    bad_params: list[tuple[dict[str, Any], str]] = [
        ({"width": 30}, "width"), ({"height": 4096}, "height"), ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"), ({"guidance": "x"}, "guidance"), ({"guidance": 51}, "guidance"),
        ({"seed": -1}, "seed"), ({"negative_prompt": 5}, "negative_prompt"),
    ]
    for params, named in bad_params:
        with pytest.raises(BackendCallError) as info:
            list(bp.generate_image("x", params, timeout_s=CALL_TIMEOUT_S))
        assert info.value.grpc_code == "INVALID_ARGUMENT", (params, info.value)
        assert named in str(info.value)
    events = image(bp, SMALL)
    assert decode(events[-1].png).size == (16, 16)
    assert bp.status()["stats"]["images"] == 1


def test_missing_extra_names_it(backends: Callable[..., BackendProcess], pipeline_dir: Path,
                                tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    (shadow / "diffusers").mkdir(parents=True)
    (shadow / "diffusers" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'diffusers\'", name="diffusers")\n')
    bp = backends("diffusers", "tiny-sd", env={"PYTHONPATH": str(shadow)})
    bp.start()  # the module itself imports without diffusers
    with pytest.raises(BackendCallError) as info:
        bp.load(files_of(pipeline_dir), str(pipeline_dir.parent), {}, "cpu", timeout_s=LOAD_TIMEOUT_S)
    assert info.value.grpc_code == "INTERNAL"
    assert "modelbay[images]" in str(info.value) and "diffusers" in str(info.value)
    assert bp.status()["state"] == "empty" and bp.alive()
