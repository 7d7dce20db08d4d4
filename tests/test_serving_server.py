"""The OpenAI-compatible server, live on a tiny model, answered by the official ``openai`` client."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from effinfer.core.experiment import Experiment  # noqa: E402
from effinfer.core.testing import tiny_model  # noqa: E402
from effinfer.plugins.system.serving.loadtest import http_client_module  # noqa: E402
from effinfer.plugins.system.serving.server import ServingApp, create_app  # noqa: E402
from effinfer.plugins.system.serving.stack import build_served, encode_text  # noqa: E402


httpx = http_client_module()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live():
    import uvicorn

    model, tokenizer = tiny_model("llama", layers=2, seed=0)
    experiment = Experiment.checked(model="tiny", techniques=["paged_kv:block_size=4,kv_cache_mb=1",
                                                              "continuous_batching:max_batched_tokens=32", "fcfs"])
    served = build_served(experiment, model, tokenizer)
    serving = ServingApp(served.engine, tokenizer, "tiny", default_max_tokens=8)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(serving), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    yield {"client": client, "url": f"http://127.0.0.1:{port}", "serving": serving, "model": model,
           "tokenizer": tokenizer, "server": server, "thread": thread}
    server.should_exit = True
    thread.join(timeout=20)


def _greedy(model, tokenizer, text, tokens):
    ids = torch.tensor([encode_text(tokenizer, text)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_completions_streaming_and_not_match_greedy_generation(live):
    client = live["client"]
    expected = _greedy(live["model"], live["tokenizer"], "Hello there", 6)
    plain = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text == expected
    assert plain.usage.completion_tokens == 6 and plain.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completions_streaming_and_not(live):
    client = live["client"]
    messages = [{"role": "user", "content": "Say hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    assert client.models.list().data[0].id == "tiny"


def test_concurrent_requests_are_batched_and_each_exact(live):
    client = live["client"]
    prompts = [f"prompt number {i} " * (i + 1) for i in range(5)]
    results: dict[int, str] = {}

    def ask(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=7, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(5)] == [_greedy(live["model"], live["tokenizer"], p, 7) for p in prompts]


def test_bad_requests_get_a_4xx_with_a_clear_message(live):
    client = live["client"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-7", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="x", max_tokens=30000)
    response = httpx.post(live["url"] + "/v1/completions", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_a_client_that_disconnects_frees_its_blocks(live):
    engine = live["serving"].engine
    engine.cache.clear_prefix_cache()
    total = engine.cache.num_blocks
    with httpx.stream("POST", live["url"] + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "a long one", "max_tokens": 400, "stream": True,
                            "ignore_eos": True}) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass
        assert engine.cache.allocator.num_free < total
    deadline = time.time() + 10
    while (engine.running or engine.waiting) and time.time() < deadline:
        time.sleep(0.05)
    engine.cache.clear_prefix_cache()
    assert engine.cache.allocator.num_free == total
    assert engine.finished[-1].finish_reason == "abort" and len(engine.finished[-1].output) < 400


def test_loadtest_replays_a_trace_against_the_live_server_and_files_it_in_the_store(live, tmp_path):
    from typer.testing import CliRunner

    from effinfer.core import cli
    from effinfer.core.registry import get_registry
    from effinfer.evaluation.store import ResultsStore

    get_registry().register_commands(cli.app)
    database = tmp_path / "results.db"
    result = CliRunner().invoke(cli.app, ["loadtest", "--url", live["url"], "--rates", "8", "--requests", "3",
                                          "--output-scale", "0.05", "--label", "tiny-served", "--store",
                                          str(database), "--out", str(tmp_path / "load.json")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with ResultsStore(database) as store:
        bench = store.latest_bench_id()
        (run,) = store.bench_runs(bench)
        assert store.benches()[0]["suite"] == "loadtest"
    assert run.name == "tiny-served" and run.suite == "loadtest" and run.ok
    assert run.value("serving.completed@8") == 3
    assert run.value("serving.throughput@8") > 0 and run.value("serving.ttft_p99@8") > 0
    assert run.metrics["serving.throughput@8"].params["rate"] == 8.0


def test_graceful_shutdown_finishes_running_requests_then_refuses_new_ones():
    model, tokenizer = tiny_model("llama", layers=1, seed=0)
    served = build_served(Experiment.checked(model="tiny"), model, tokenizer)
    serving = ServingApp(served.engine, tokenizer, "tiny")
    serving.start()
    from effinfer.plugins.system.serving.engine import ServeRequest

    request = ServeRequest("r", encode_text(tokenizer, "hi"), max_tokens=20, ignore_eos=True)
    served.engine.add(request)
    serving.shutdown()
    assert request.finish_reason == "length" and len(request.output) == 20
    assert not serving.accepting and not serving._thread.is_alive()


def test_a_speculative_stack_is_served_one_request_at_a_time_through_its_strategy():
    from effinfer.plugins.system.serving.engine import ServeRequest

    model, tokenizer = tiny_model("llama", layers=1, seed=0)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        served = build_served(Experiment.checked(model="tiny", techniques=["prompt_lookup"]), model, tokenizer)
    assert served.engine.name == "strategy"
    prompt = encode_text(tokenizer, "abcabcabc")
    request = ServeRequest("s", prompt, max_tokens=6, ignore_eos=True)
    served.engine.add(request)
    served.engine.run_until_done()
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert request.output == expected
    served.composed.restore()
