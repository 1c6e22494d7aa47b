"""The annotation sheet driven in a real headless Chromium (Debian's chromium + chromium-driver,
installed by .ci/run) through Selenium: keyboard and mouse, a reload in the middle, export, and
the labels turned into judgments by `compare --human`."""

import functools
import http.server
import json
import shutil
import threading

import pytest
from judge_server import write_samples

from limajax.evaluation.judgments import shown_first as left_side

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served(tmp_path):
    """tmp_path over http://127.0.0.1 (a free port): served(path) -> its URL. The sheet is a
    file people open from disk, but Chromium now and then gives a file:// page reloaded (or
    opened again) at once an empty view of localStorage, or drops the writes made just before
    (measured here: 9 and 4 of 100 reloads; 0 of 100 over http), so the reload checked below
    would fail by the browser's race, not the sheet's."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield lambda path: f"http://127.0.0.1:{server.server_port}/{path.relative_to(tmp_path)}"
    server.shutdown()
    server.server_close()


def _sheet(tmp_path, cli, ids, seed=3):
    """a.jsonl and b.jsonl answering `ids`, and their sheet: (a, b, b_rows, sheet)."""
    a_rows = [{"id": i, "conversations": [f"Question {i}? </script><b>x</b>"],
               "response": f"A's answer to {i}"} for i in ids]
    b_rows = [{"id": i, "conversations": [f"Question {i}? </script><b>x</b>"],
               "response": f"B's answer to {i}"} for i in ids]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_samples(a, a_rows)
    write_samples(b, b_rows)
    sheet = tmp_path / "sheet.html"
    r = cli("annotate", "--a", a, "--b", b, "--output", sheet, "--seed", seed)
    assert r.exit_code == 0, r.output
    return a, b, b_rows, sheet


def _expect(browser, text, element_id="progress"):
    """The element shows `text` within 10 s (key events reach the page's script
    asynchronously; a busy machine can take a moment)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, 10).until(
            lambda d: d.find_element(By.ID, element_id).text == text)
    except TimeoutException:
        assert browser.find_element(By.ID, element_id).text == text


def test_sheet_in_headless_chromium(tmp_path, browser, cli, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ids = [f"q{i}" for i in range(6)]
    a, b, b_rows, sheet = _sheet(tmp_path, cli, ids)
    sides = {i: left_side(3, i) for i in ids}
    assert set(sides.values()) == {"A", "B"}  # the seed put each file on both sides

    browser.get(served(sheet))
    text = browser.find_element(By.ID, "prompt").text
    assert text == "Question q0? </script><b>x</b>"  # shown as text, not markup
    left = browser.find_element(By.ID, "left").text
    assert left == ("A's answer to q0" if sides["q0"] == "A" else "B's answer to q0")
    expect = functools.partial(_expect, browser)

    body = browser.find_element(By.TAG_NAME, "body")
    expect("0 of 6 labelled")
    body.send_keys("a")                                    # q0: left, by keyboard
    body.send_keys(Keys.ARROW_RIGHT)                       # q1: right, by arrow
    browser.find_element(By.ID, "choose-neither").click()  # q2: neither, by mouse
    expect("3 of 6 labelled")

    browser.refresh()  # the work so far survives a reload
    expect("3 of 6 labelled")
    expect("Item 4 of 6", "item-title")
    body = browser.find_element(By.TAG_NAME, "body")
    browser.find_element(By.ID, "choose-left").click()     # q3: left
    body.send_keys("n")                                    # q4: neither
    body.send_keys("b")                                    # q5: right
    body.send_keys("p")                                    # back one item: labels stay
    expect("6 of 6 labelled")
    browser.find_element(By.ID, "export-button").click()
    exported = WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.ID, "export").get_attribute("value"))
    labels = json.loads(exported)
    chosen = {x["id"]: x["choice"] for x in labels["labels"]}
    assert chosen == {"q0": "left", "q1": "right", "q2": "neither", "q3": "left",
                      "q4": "neither", "q5": "right"}

    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels))
    out = tmp_path / "human.jsonl"
    r = cli("compare", "--human", path, "--a", a, "--b", b, "--output", out)
    assert r.exit_code == 0, r.output
    rows = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    for i, choice in chosen.items():
        file_on = {"left": sides[i], "right": "B" if sides[i] == "A" else "A", "neither": "tie"}
        assert rows[i]["verdict"] == file_on[choice], i  # the sides unrandomised
        assert rows[i]["order"] == ("AB" if sides[i] == "A" else "BA")
        assert rows[i]["judge"] == "human"
    # labels of another sheet's files are refused
    write_samples(b, [{**row, "response": row["response"] + "!"} for row in b_rows])
    r = cli("compare", "--human", path, "--a", a, "--b", b, "--output", tmp_path / "o.jsonl")
    assert r.exit_code == 2 and "other answers" in r.output, r.output


def test_a_sheet_open_twice_keeps_the_labels_of_both(tmp_path, browser, cli, served):
    """A second page of the sheet, opened before the first one's labels were made, adds its own
    label without erasing them (each label has its own storage key)."""
    from selenium.webdriver.common.by import By

    _, _, _, sheet = _sheet(tmp_path, cli, [f"q{i}" for i in range(6)])
    url = served(sheet)
    browser.get(url)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(url)
    second = browser.current_window_handle
    _expect(browser, "0 of 6 labelled")
    browser.switch_to.window(first)
    body = browser.find_element(By.TAG_NAME, "body")
    for key in "abn":  # q0, q1, q2
        body.send_keys(key)
    _expect(browser, "3 of 6 labelled")
    browser.switch_to.window(second)  # it still shows q0 and knows of no label
    browser.find_element(By.ID, "next").click()
    browser.find_element(By.ID, "next").click()
    browser.find_element(By.ID, "next").click()
    _expect(browser, "Item 4 of 6", "item-title")
    browser.find_element(By.ID, "choose-left").click()  # q3
    _expect(browser, "1 of 6 labelled")
    browser.close()
    browser.switch_to.window(first)
    browser.refresh()
    _expect(browser, "4 of 6 labelled")
