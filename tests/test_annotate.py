"""The annotation sheet driven in a real headless Chromium (Debian's chromium + chromium-driver,
installed by .ci/run) through Selenium: keyboard and mouse, a reload in the middle, export, and
the labels turned into judgments by `compare --human`."""

import json
import shutil

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


def test_sheet_in_headless_chromium(tmp_path, browser, cli):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ids = [f"q{i}" for i in range(6)]
    a_rows = [{"id": i, "conversations": [f"Question {i}? </script><b>x</b>"],
               "response": f"A's answer to {i}"} for i in ids]
    b_rows = [{"id": i, "conversations": [f"Question {i}? </script><b>x</b>"],
               "response": f"B's answer to {i}"} for i in ids]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_samples(a, a_rows)
    write_samples(b, b_rows)
    sheet = tmp_path / "sheet.html"
    r = cli("annotate", "--a", a, "--b", b, "--output", sheet, "--seed", 3)
    assert r.exit_code == 0, r.output
    sides = {i: left_side(3, i) for i in ids}
    assert set(sides.values()) == {"A", "B"}  # the seed put each file on both sides

    browser.get(sheet.as_uri())
    text = browser.find_element(By.ID, "prompt").text
    assert text == "Question q0? </script><b>x</b>"  # shown as text, not markup
    left = browser.find_element(By.ID, "left").text
    assert left == ("A's answer to q0" if sides["q0"] == "A" else "B's answer to q0")

    def expect(text, element_id="progress"):
        """The element shows `text` within 10 s (key events reach the page's script
        asynchronously; a busy machine can take a moment)."""
        try:
            WebDriverWait(browser, 10).until(
                lambda d: d.find_element(By.ID, element_id).text == text)
        except TimeoutException:
            assert browser.find_element(By.ID, element_id).text == text

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
