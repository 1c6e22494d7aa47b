"""`serve` as users' tools reach it: the official openai client against a live server on a free
loopback port, serving the real stories260K model; the completions protocol lm-eval-harness
and vLLM's clients speak (batched and token-id prompts, echo, log-probabilities); errors in
OpenAI's shape for every status; API keys and /metrics; and the engine itself: a seeded answer
equals `sample`'s alone and beside busy slots, and a short request overtakes a long one."""

import concurrent.futures
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from conftest import STORIES_CONTEXT as CONTEXT  # tokens per slot

from limajax.errors import UserError
from limajax.perplexity import token_logprobs
from limajax.sampling import Job, Request, Settings, TextStream, generate
from limajax.sampling.sampler import stop_ids
from limajax.serving import api_key_from, running


@pytest.fixture(scope="module")
def server(stories_server):
    return stories_server.removesuffix("/v1")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def post(url, body: bytes | None, headers=None, method="POST"):
    request = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                                 **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def alone(engine, request):
    """`sample`'s answer: the sampler's batch path (generate), one request."""
    out = dict(next(generate(engine.model, engine.mesh, [request], 1, stop_ids(engine.tokenizer))))
    return out[0].tokens


def through_engine(engine, requests):
    """Submit jobs together; each one's generated ids, read back from its text events."""
    results = []
    for r in requests:
        events = queue.Queue()
        engine.submit(Job(r, events.put, TextStream(engine.tokenizer)))
        results.append(events)
    out = []
    for events in results:
        ids = []
        while "finish" not in (event := events.get(timeout=120)):
            ids += event["ids"]
        out.append((ids, event))
    return out


def test_a_seeded_engine_answer_is_samples_alone_and_beside_busy_slots(stories_engine):
    tok = stories_engine.tokenizer
    lima = Settings(seed=5, max_new_tokens=40)  # LIMA's sampling: T 0.7, p 0.9, penalty 1.2
    request = Request(tok.encode_prompt(["Once upon a time"], raw=True), lima, "p", 0)
    expected = alone(stories_engine, request)
    assert len(expected) > 10
    (ids, finish), = through_engine(stories_engine, [request])
    assert ids == expected[:len(ids)] and finish["completion_tokens"] == len(expected)
    # Beside other answers (other prompts, settings and lengths), admitted in the same prefill.
    others = [Request(tok.encode_prompt([f"Tom had {i} dogs and a very big red ball"], raw=True),
                      Settings(seed=i, max_new_tokens=30 + 5 * i, temperature=1.0), "o", i)
              for i in range(5)]
    answers = through_engine(stories_engine, [others[0], others[1], request, *others[2:]])
    assert answers[2][0] == expected[:len(answers[2][0])]
    assert answers[2][1]["completion_tokens"] == len(expected)
    for r, (ids, _) in zip([others[0], others[1], *others[2:]], answers[:2] + answers[3:],
                           strict=True):
        assert ids == alone(stories_engine, r)[:len(ids)]


def test_prompt_scoring_runs_while_every_slot_is_busy(stories_engine):
    tok = stories_engine.tokenizer
    finished = queue.Queue()
    jobs = [Job(Request(tok.encode_prompt(["Once upon a time"], raw=True),
                        Settings(seed=i, max_new_tokens=CONTEXT - 16), "busy", i),
                lambda e: "finish" in e and finished.put(e), TextStream(tok))
            for i in range(stories_engine.max_batch)]
    for job in jobs:
        stories_engine.submit(job)
    while stories_engine.busy() < stories_engine.max_batch:
        time.sleep(0.01)
    scores = stories_engine.call(lambda: stories_engine.prompt_logprobs([[1, 400, 300]]))
    assert len(scores.result(timeout=60)[0][0]) == 2 and finished.empty()
    for job in jobs:
        job.cancelled = True
    for _ in jobs:
        finished.get(timeout=60)


def test_the_http_repetition_penalty_reaches_the_processor(client, stories_engine):
    tok = stories_engine.tokenizer
    ids = tok.encode_prompt(["Once upon a time"], raw=True)

    def served(**extra):
        return client.completions.create(model="stories", prompt="Once upon a time",
                                         max_tokens=60, temperature=0, extra_body=extra
                                         ).choices[0].text

    def sampled(**settings):
        tokens = alone(stories_engine, Request(ids, Settings(temperature=0, max_new_tokens=60,
                                                             **settings)))
        return tok.decode(ids + tokens)[len("Once upon a time"):]

    plain, penalised = served(), served(repetition_penalty=2.0)
    generated_only = served(repetition_penalty=2.0, repetition_penalty_scope="generated")
    assert plain == sampled() and penalised == sampled(repetition_penalty=2.0)
    assert generated_only == sampled(repetition_penalty=2.0, penalty_scope="generated")
    assert len({plain, penalised, generated_only}) == 3


def test_chat_and_completions_with_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == ["stories"]
    chat = client.chat.completions.create(
        model="stories", messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=20, seed=1, n=2)
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    assert 2 <= chat.usage.completion_tokens <= 40 and chat.choices[0].finish_reason
    assert chat.usage.prompt_tokens > 5 and chat.usage.total_tokens == (
        chat.usage.prompt_tokens + chat.usage.completion_tokens)

    # A raw continuation keeps the space it has in context ("The cat" + " and ...").
    done = client.completions.create(model="stories", prompt="The cat", max_tokens=40,
                                     temperature=0)
    assert done.choices[0].text.startswith(" ") and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 40

    # Streaming gives the same text in pieces, spaces included, and usage at the end.
    pieces, usage = [], None
    for chunk in client.completions.create(model="stories", prompt="The cat", max_tokens=40,
                                           temperature=0, stream=True):
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


def test_echo_and_logprobs_as_lm_eval_asks_for_them(client, stories_engine):
    tok = stories_engine.tokenizer
    texts = ["Once upon a time, there was a dog", "The cat sat on the mat"]
    ids = [tok.encode_prompt([t], raw=True) for t in texts]
    # lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 1, token ids as one batch.
    got = client.completions.create(model="stories", prompt=ids, echo=True, logprobs=1,
                                    max_tokens=1, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    for text, p, choice in zip(texts, ids, got.choices, strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(p) + 1 and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
        reference = np.asarray(token_logprobs(stories_engine.model, np.asarray([p])))[0]
        np.testing.assert_allclose(lp.token_logprobs[1:len(p)], reference, atol=1e-5)
        assert "".join(lp.tokens[:len(p)]) == text and choice.text.startswith(text)
        assert lp.text_offset[:len(p)] == [len("".join(lp.tokens[:i])) for i in range(len(p))]
        greedy = max(lp.top_logprobs[-1].values())  # the generated token: greedy, the top one
        assert lp.token_logprobs[-1] == pytest.approx(greedy)
    # Strings give the same as their ids; max_tokens 0 with echo only scores.
    scored = client.completions.create(model="stories", prompt=texts, echo=True, logprobs=3,
                                       max_tokens=0)
    for choice, text, want in zip(scored.choices, texts, got.choices, strict=True):
        assert choice.text == text and len(choice.logprobs.top_logprobs[1]) == 3
        np.testing.assert_allclose(choice.logprobs.token_logprobs[1:],
                                   want.logprobs.token_logprobs[1:-1], atol=1e-6)
    # Without echo: the answer's tokens concatenate to its text, spaces included.
    plain = client.completions.create(model="stories", prompt="The cat", max_tokens=12,
                                      temperature=0, logprobs=2).choices[0]
    assert "".join(plain.logprobs.tokens) == plain.text and plain.text.startswith(" ")
    assert len(plain.logprobs.tokens) == 12 and plain.logprobs.text_offset[0] == 0


def test_chat_logprobs_and_top_logprobs(client):
    chat = client.chat.completions.create(
        model="stories", messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=15, temperature=0, logprobs=True, top_logprobs=3).choices[0]
    content = chat.logprobs.content
    assert "".join(t.token for t in content) == chat.message.content and len(content) >= 1
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_tokenize_and_detokenize_in_vllms_shapes(server, stories_engine):
    status, got = post(f"{server}/tokenize", json.dumps({"model": "stories",
                                                         "prompt": "The cat"}).encode())
    tok = stories_engine.tokenizer
    assert status == 200 and got["tokens"] == [tok.bos_id] + tok.encode("The cat")
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == CONTEXT
    status, back = post(f"{server}/detokenize", json.dumps({"model": "stories",
                                                            "tokens": got["tokens"]}).encode())
    assert status == 200 and back == {"prompt": "The cat"}


def test_malformed_requests_get_openai_errors_and_serving_goes_on(server, client):
    url = f"{server}/v1/chat/completions"
    chat = {"model": "stories", "messages": [{"role": "user", "content": "hi"}]}
    for body in [json.dumps({"model": "stories", "messages": "hi"}).encode(),
                 json.dumps({**chat, "top_p": 0}).encode(),
                 json.dumps({**chat, "top_logprobs": 21, "logprobs": True}).encode(),
                 json.dumps({"model": "stories", "messages": [{"role": "assistant",
                                                               "content": "hi"}]}).encode()]:
        status, answer = post(url, body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
        assert answer["error"]["message"]
    status, answer = post(url, b"{not json")
    assert status == 400 and answer["error"]["param"] is None
    assert "not valid JSON" in answer["error"]["message"] and "0:" not in answer["error"]["message"]

    completions = f"{server}/v1/completions"
    cases = [({"prompt": "Once upon a time " * 200}, "maximum context length is 512"),
             ({"prompt": "Hi", "max_tokens": 100000}, "maximum context length is 512"),
             ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
             ({"prompt": ["Hi"] * 9, "echo": True, "logprobs": 1}, "at most 8 per request"),
             ({"prompt": [1, 600, 3]}, "token id 600 is outside the vocabulary"),
             ({"prompt": "Hi", "max_tokens": 0}, "only meaningful with echo")]
    for body, words in cases:
        status, answer = post(completions, json.dumps({"model": "stories", **body}).encode())
        assert status == 400 and words in answer["error"]["message"], (body, answer)
    status, answer = post(completions, json.dumps({"model": "gpt-4", "prompt": "Hi"}).encode())
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert "'stories'" in answer["error"]["message"]
    status, answer = post(completions, None, method="GET")
    assert status == 405 and answer["error"]["message"]
    status, answer = post(f"{server}/v1/nothing", b"{}")
    assert status == 404 and answer["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="stories", prompt="x", temperature=-1)
    capped = client.completions.create(model="stories", prompt="Hi", max_tokens=100000,
                                       extra_body={"cap_max_tokens": True}, temperature=0)
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens <= CONTEXT
    ok = client.completions.create(model="stories", prompt="The cat", max_tokens=5)
    assert ok.usage.completion_tokens == 5


def test_an_api_key_is_required_and_never_logged_and_metrics_count(stories_engine, capfd,
                                                                    monkeypatch):
    monkeypatch.setenv("LIMAJAX_TEST_KEY", "sekrit-7d1f")
    key = api_key_from("LIMAJAX_TEST_KEY", "127.0.0.1", no_auth=False)
    with running(stories_engine, "stories", api_key=key) as url:
        base = url.removesuffix("/v1")
        status, answer = post(f"{url}/completions", json.dumps(
            {"model": "stories", "prompt": "Hi", "max_tokens": 2}).encode())
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        for _ in range(3):
            good.completions.create(model="stories", prompt="The cat", max_tokens=3)
        request = urllib.request.Request(f"{base}/metrics",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            metrics = r.read().decode()
    line = 'limajax_requests_total{path="/v1/completions",status="200"} 3.0'
    assert line in metrics and 'status="401"} 1.0' in metrics
    assert "limajax_time_to_first_token_seconds_count 3.0" in metrics
    assert "limajax_generated_tokens_total 9.0" in metrics and "limajax_busy_slots" in metrics
    out, err = capfd.readouterr()
    assert key not in out + err
    with pytest.raises(UserError, match="--no-auth"):
        api_key_from(None, "0.0.0.0", no_auth=False)
    assert api_key_from(None, "0.0.0.0", no_auth=True) is None
    with pytest.raises(UserError, match="LIMAJAX_UNSET"):
        api_key_from("LIMAJAX_UNSET", "127.0.0.1", no_auth=False)


def test_serving_is_announced_only_once_the_port_accepts_connections():
    import uvicorn
    from fastapi import FastAPI

    from limajax.serving import announcing_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    connected = []

    def announce():
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            connected.append(True)
        server.should_exit = True

    server = announcing_server(uvicorn.Config(FastAPI(), host="127.0.0.1", port=port,
                                              log_level="warning"), announce)
    thread = threading.Thread(target=server.run)
    thread.start()
    thread.join(timeout=30)
    assert connected == [True]


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
