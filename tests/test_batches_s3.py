"""A batch whose files live in S3 (SeaweedFS, tests/s3server.py): a web and a worker of their own
on a Valkey database of their own, the official SDK for the whole flow, and nothing of the batch
left in the bucket but its input and its two files."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers import start_worker, unique
from modelbay.stack import LocalStack
from tasks.settings import load_settings
from tasks.store import Store
from test_batches import every_id_once, jsonl, line, register, run_batch, sdk

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def s3_stack(local_stack: LocalStack, stack_env: dict[str, str], s3_server, artifacts) -> Iterator[dict]:
    prefix = f"batches-{unique('s3')}"
    redis_url = stack_env["MODELBAY_REDIS_URL"].rsplit("/", 1)[0] + "/5"
    env = {**stack_env, **s3_server.env(prefix), "MODELBAY_REDIS_URL": redis_url}
    store = Store.from_settings(load_settings(env))
    worker = start_worker(env, f"s3{os.getpid()}", artifacts, store, concurrency=4)
    web = local_stack.start_web(env=env, log_name="web-batches-s3.log")
    try:
        yield {"url": web.url, "prefix": prefix, "server": s3_server}
    finally:
        local_stack.stop(web)
        worker.stop(10)


def test_an_embeddings_batch_with_its_files_in_s3(s3_stack: dict) -> None:
    url, server, prefix = s3_stack["url"], s3_stack["server"], s3_stack["prefix"]
    client = sdk(url)
    name = register(url)
    lines = [line(f"s{i}", "/v1/embeddings", {"model": name, "input": f"text {i}"}) for i in range(300)]
    lines.append(line("bad", "/v1/embeddings", {"model": name, "input": []}))
    batch = run_batch(client, jsonl(lines), "/v1/embeddings")
    assert batch.status == "completed" and batch.request_counts.completed == 300, batch
    out, err = every_id_once(client, batch, [x["custom_id"] for x in lines])
    assert len(out) == 300 and [e["custom_id"] for e in err] == ["bad"]
    keys = server.keys(f"{prefix}/")
    assert not [k for k in keys if "/batches/" in k], keys  # chunk inputs and parts are gone
    assert {f"{prefix}/files/{batch.input_file_id}", f"{prefix}/files/{batch.output_file_id}",
            f"{prefix}/files/{batch.error_file_id}"} <= set(keys), keys
