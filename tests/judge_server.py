"""A deterministic OpenAI-compatible judge on loopback, for the evaluation tests.

Its verdict depends on the answers' content: each answer states "quality N", and the higher one
wins ("Neither" when equal); answers without one (a model's) are judged by length, the longer
winning. A prompt containing "biased" gets the answer shown first, whatever
it says (a position bias, so the two orders disagree). A prompt's "form:NAME" picks how the
verdict is phrased (the forms judges really use) and "fault:NAME" makes the server misbehave on
that prompt's first request(s) in each order. Every request is logged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FORMS = {
    # how each form says "first", "second", "neither"
    "words": ("Answer A is significantly better.", "Answer B is significantly better.",
              "Neither is significantly better."),
    "brackets": ("[[A]]", "[[B]]", "[[C]]"),
    "bare": ("A", "B", "Neither"),
    "reasoned": ("Answer B looks longer, but on reflection Answer A is significantly better.",
                 "Both are fine. Still, I'd say Answer B is significantly better.",
                 "A covers more ground and B is tidier. Neither is significantly better."),
    "verdict": ("Reasons: ...\nVerdict: A", "Reasons: ...\nVerdict: B",
                "Reasons: ...\nVerdict: tie"),
}


@dataclasses.dataclass
class Logged:
    key: str  # the prompt's id marker and the order it was shown in, e.g. "p3:AB"
    status: int
    time: float
    reask: bool
    authorization: str


class JudgeServer:
    def __init__(self, *, hang_s: float = 0.0, delay_s: float = 0.0, retry_after: str = "1",
                 models: tuple[str, ...] = ("judge-1", "bench"), key: str | None = None):
        self.hang_s, self.delay_s, self.retry_after = hang_s, delay_s, retry_after
        self.models = models  # what GET /v1/models lists
        self.key = key  # if set, GET /v1/models wants it (401 otherwise)
        self.log: list[Logged] = []
        self.faulted: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *args):
                pass

            def do_GET(self):
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return server.send(self, 401, b'{"error": {"message": "invalid key"}}')
                if self.path.rstrip("/") != "/v1/models":
                    return server.send(self, 404, b'{"error": {"message": "not found"}}')
                server.send(self, 200, json.dumps({"object": "list", "data": [
                    {"id": m, "object": "model", "owned_by": "test"} for m in server.models]
                }).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- the judge -------------------------------------------------------------------------

    @staticmethod
    def decide(text: str) -> tuple[str, str]:
        """(key, which) for a pairwise prompt: which in {"first", "second", "neither"}."""
        if "quality" not in text:  # a model's answers (select): the longer one wins
            first, second = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\nWhich "
                                      r"answer is better", text, re.DOTALL).groups()
            which = ("neither" if len(first) == len(second) else
                     "first" if len(first) > len(second) else "second")
            return f"free:{hash(text)}", which
        ident = re.search(r"\b(p\d+)\b", text).group(1)
        qualities = [int(q) for q in re.findall(r"quality (\d)", text)]
        shown = "AB" if text.index("from-a") < text.index("from-b") else "BA"
        if "biased" in text:
            which = "first"
        elif qualities[0] == qualities[1]:
            which = "neither"
        else:
            which = "first" if qualities[0] > qualities[1] else "second"
        return f"{ident}:{shown}", which

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        text = body["messages"][0]["content"]
        if "[Reply]" in text:  # a rating: grades and scale follow the answer's quality
            # the answer's own marker (a multi-turn question holds the earlier answers' too)
            marker = re.search(r"quality (\d)", text.split("[Reply]", 1)[1])
            # a model's answer (select) has none: its length in characters decides, 1-3
            q = int(marker.group(1)) if marker else 1 + min(2, len(
                text.split("[Reply]\n", 1)[1].split("\n\n1 - ", 1)[0]) // 40)
            content = (f"Reasons.\n{('Fail', 'Pass', 'Excellent')[q - 1]}" if "Excellent" in text
                       else f"Reasons.\n{q + 2}")
            with self.lock:
                self.log.append(Logged("rate", 200, time.monotonic(), False, ""))
            return self.reply(h, body, content)
        reask = len(body["messages"]) > 1
        key, which = self.decide(text)
        fault = re.search(r"fault:(\w+)", text)
        fault = fault.group(1) if fault else None
        form = re.search(r"form:(\w+)", text)
        form = form.group(1) if form else "words"
        with self.lock:
            n = self.faulted.get(key, 0)
            self.faulted[key] = n + 1
        first_try = n == 0
        status = 200
        if self.delay_s:
            time.sleep(self.delay_s)
        if fault == "e500" and n < 2:
            status = 500
        elif fault == "e429" and first_try:
            status = 429
        elif fault == "hang" and first_try:
            status = -1
        elif fault == "drop" and first_try:
            status = -2
        elif fault == "garbage" and first_try:
            status = -3
        with self.lock:
            self.log.append(Logged(key, status, time.monotonic(), reask,
                                   h.headers.get("Authorization", "")))
        if status == -2:  # the connection dies before any answer
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        if status == -1:  # hang past the client's time-out; by then it has gone
            time.sleep(self.hang_s)
            h.close_connection = True
            return
        if status == -3:
            self.send(h, 200, b"<html>upstream proxy error</html>", "text/html")
            return
        if status != 200:
            headers = {"Retry-After": self.retry_after} if status == 429 else {}
            self.send(h, status, json.dumps({"error": {"message": "try later"}}).encode(),
                      headers=headers)
            return
        if form == "never" or (form == "late" and not reask):
            content = "Both answers have their merits and their flaws."
        else:
            content = FORMS["words" if form == "late" else form][
                ("first", "second", "neither").index(which)]
        self.reply(h, body, content)

    def reply(self, h, body, content):
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        self.send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def send(h, status, data, content_type="application/json", headers=None):
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


def write_samples(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def pairwise_case(tmp_path, specs):
    """Two sample files from specs [(id, quality_a, quality_b, markers)]: the expected outcome
    per id follows from the judge's rule above, combined over both orders."""
    a_rows, b_rows, expected = [], [], {}
    for ident, qa, qb, markers in specs:
        prompt = f"Question {ident}: tell me something. {markers}".strip()
        a_rows.append({"id": ident, "conversations": [prompt],
                       "response": f"from-a says things, quality {qa}."})
        b_rows.append({"id": ident, "conversations": [prompt],
                       "response": f"from-b says other things, quality {qb}."})
        if "biased" in markers:
            expected[ident] = "tie"  # A in one order, B in the other
        elif "form:never" in markers:
            expected[ident] = "unparsed"
        else:
            expected[ident] = "tie" if qa == qb else ("A" if qa > qb else "B")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_samples(a, a_rows)
    write_samples(b, b_rows)
    return str(a), str(b), expected


class AnswerServer(JudgeServer):
    """A deterministic OpenAI-compatible model server on loopback, for `sample --endpoint`.

    `answers` maps each model name it serves to its answer as a function of the prompt's text
    (the last user message, or the /completions prompt), so every answer is known in advance.
    A prompt's "fault:NAME" makes it misbehave: e500 (two 500s, then the answer), e429 (one 429
    with Retry-After), hang (the first try outlasts the client's time-out), refuse (a 400 while
    `refusing`), filter (finish_reason content_filter while `refusing`). Each request is logged
    with its prompt id ("p3"), status and Authorization header; `bodies` keeps what was sent."""

    def __init__(self, answers: dict, **kwargs):
        super().__init__(models=tuple(answers), **kwargs)
        self.answers = answers
        self.refusing = True
        self.bodies: list[dict] = []

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        chat = h.path.rstrip("/").endswith("/chat/completions")
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        key = re.search(r"\b(p\d+)\b", text).group(1)
        fault = re.search(r"fault:(\w+)", text)
        fault = fault.group(1) if fault else None
        with self.lock:
            n = self.faulted.get(key, 0)
            self.faulted[key] = n + 1
            self.bodies.append({"path": h.path, **body})
        status = 200
        if fault == "e500" and n < 2:
            status = 500
        elif fault == "e429" and n == 0:
            status = 429
        elif fault == "hang" and n == 0:
            status = -1
        elif fault == "refuse" and self.refusing:
            status = 400
        with self.lock:  # logged as it arrives, before any delay
            self.log.append(Logged(key, status, time.monotonic(), False,
                                   h.headers.get("Authorization", "")))
        if self.delay_s:
            time.sleep(self.delay_s)
        if status == -1:
            time.sleep(self.hang_s)
            h.close_connection = True
            return
        if status != 200:
            headers = {"Retry-After": self.retry_after} if status == 429 else {}
            message = "this prompt violates the usage policy" if status == 400 else "try later"
            self.send(h, status, json.dumps({"error": {"message": message}}).encode(),
                      headers=headers)
            return
        content = self.answers[body["model"]](text)
        finish = "content_filter" if fault == "filter" and self.refusing else "stop"
        choice = ({"index": 0, "finish_reason": finish,
                   "message": {"role": "assistant", "content": content}} if chat else
                  {"index": 0, "finish_reason": finish, "text": content, "logprobs": None})
        reply = {"id": "x", "object": "chat.completion" if chat else "text_completion",
                 "created": 0, "model": f"{body['model']}-0613", "choices": [choice],
                 "usage": {"prompt_tokens": len(text.split()),
                           "completion_tokens": len(content.split()),
                           "total_tokens": len(text.split()) + len(content.split())}}
        self.send(h, 200, json.dumps(reply).encode())
