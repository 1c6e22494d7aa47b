"""`serve` as users' tools reach it: the official openai client against a live server on a free
loopback port, serving the real stories260K model; errors in OpenAI's shape; concurrency; and
continuous batching (a short request overtakes a long one that is decoding)."""

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.serving import Engine, make_app

CONTEXT = 512  # tokens per slot


@pytest.fixture(scope="module")
def server(stories):
    mesh = sharding.single_device_mesh()
    model, tokenizer = load_for_inference(stories / "model", mesh)
    engine = Engine(model, tokenizer, mesh, max_batch=8, cache_length=CONTEXT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, "stories"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def post(url, body: bytes):
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_and_completions_with_the_openai_client(client, stories):
    assert [m.id for m in client.models.list().data] == ["stories"]
    chat = client.chat.completions.create(
        model="stories", messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=20, seed=1, n=2)
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    assert 2 <= chat.usage.completion_tokens <= 40 and chat.choices[0].finish_reason
    assert chat.usage.prompt_tokens > 5 and chat.usage.total_tokens == (
        chat.usage.prompt_tokens + chat.usage.completion_tokens)

    # A raw continuation, greedy, equals `limajax sample --raw --greedy` (the same sampler).
    done = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=40,
                                     temperature=0)
    assert done.choices[0].text.startswith(", there was a little girl named Lily.")
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 40

    # Streaming gives the same text in pieces, and usage at the end.
    pieces, usage = [], None
    for chunk in client.completions.create(model="stories", prompt="Once upon a time",
                                           max_tokens=40, temperature=0, stream=True):
        pieces += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert len([p for p in pieces if p]) > 3 and "".join(pieces) == done.choices[0].text
    assert usage.completion_tokens == 40

    deltas, finish = [], None
    for chunk in client.chat.completions.create(
            model="stories", messages=[{"role": "user", "content": "Hi"}], max_tokens=30,
            seed=7, stream=True, extra_body={"repetition_penalty": 1.3}):
        for c in chunk.choices:
            deltas.append(c.delta.content or "")
            finish = c.finish_reason or finish
    again = client.chat.completions.create(
        model="stories", messages=[{"role": "user", "content": "Hi"}], max_tokens=30, seed=7,
        extra_body={"repetition_penalty": 1.3})
    assert "".join(deltas) == again.choices[0].message.content and finish in ("stop", "length")

    # A stop string ends the answer before it; the slot is freed.
    stopped = client.completions.create(model="stories", prompt="Once upon a time",
                                        max_tokens=40, temperature=0, stop=["Lily"])
    assert stopped.choices[0].text == ", there was a little girl named "
    assert stopped.choices[0].finish_reason == "stop"


def test_malformed_requests_get_openai_errors_and_serving_goes_on(server, client):
    url = f"{server}/v1/chat/completions"
    for body in [b"{not json", json.dumps({"messages": "hi"}).encode(),
                 json.dumps({"messages": [{"role": "user", "content": "hi"}],
                             "top_p": 0}).encode(),
                 json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode()]:
        status, answer = post(url, body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
        assert answer["error"]["message"]
    status, answer = post(f"{server}/v1/completions", json.dumps(
        {"prompt": "Once upon a time " * 200}).encode())
    assert status == 400 and "maximum context length is 512" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="stories", prompt="x", temperature=-1)
    ok = client.completions.create(model="stories", prompt="The cat", max_tokens=5)
    assert ok.usage.completion_tokens == 5


def test_concurrent_requests_all_complete(client):
    def ask(i):
        return client.completions.create(model="stories", prompt=f"Tom had {i} dogs",
                                         max_tokens=30 + 3 * i, seed=i)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(a.choices[0].text and a.usage.completion_tokens == 30 + 3 * i
               for i, a in enumerate(answers))


def test_a_short_request_overtakes_a_long_one(client):
    finished = {}

    def long():
        stream = client.completions.create(model="stories", prompt="Once upon a time",
                                           max_tokens=CONTEXT - 16, seed=3, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and "started" not in finished:
                finished["started"] = time.monotonic()
            if chunk.choices and chunk.choices[0].finish_reason:
                finished["long"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    while "started" not in finished:
        time.sleep(0.01)
    short = client.completions.create(model="stories", prompt="The dog", max_tokens=5)
    finished["short"] = time.monotonic()
    thread.join()
    assert short.usage.completion_tokens == 5
    assert finished["short"] < finished["long"]
