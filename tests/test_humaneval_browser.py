"""A whole study in a real browser: Playwright drives Debian's headless Chromium (nothing is
downloaded) through it as two annotators, one with the keyboard and one with the mouse; the votes
land in the database, the admin page shows the win rate, and screenshots go to tests/artifacts/."""

import os
import sqlite3

import pytest

from reward.humaneval.app import side_of
from tests.test_humaneval_app import make_study
from tests.test_humaneval_server import ROOT, server  # noqa: F401  (the fixture)

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
PROMPT = 'a red square <script>alert("x")</script>'


@pytest.fixture
def browser(chromium):  # tests/conftest.py: Debian's chromium; a missing one fails, never skips
    return chromium


def test_two_annotators_complete_a_study_in_chromium(tmp_path, server, browser):  # noqa: F811
    db_path, admin, tokens = make_study(tmp_path, n_items=3, votes_per_item=2, n_annotators=2, prompt=PROMPT)
    _, url = server(db_path)
    os.makedirs(ARTIFACTS, exist_ok=True)
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.on("dialog", lambda d: pytest.fail(f"a dialog opened: {d.message}"))  # no script ran from the prompt

    # annotator 1, keyboard only: → (overall: right), ↓ (adherence: tie), 1 (quality: left), Enter
    page.goto(f"{url}/s/{tokens[0]}/")
    for n in range(3):
        assert page.inner_text("#progress") == f"{n} of 3 done"
        assert page.inner_text("#prompt") == PROMPT
        assert page.eval_on_selector("#left", "img => img.naturalWidth") == 32  # the image loaded
        if n == 0:
            page.screenshot(path=os.path.join(ARTIFACTS, "humaneval_item.png"))
        for key in ("ArrowRight", "ArrowDown", "1"):
            page.keyboard.press(key)
        with page.expect_navigation():
            page.keyboard.press("Enter")
    assert "All done" in page.inner_text("h1") and page.inner_text("#progress") == "3 of 3 done"
    # change the last answer through the link back: overall becomes a tie
    page.click("text=change your last answer")
    page.check('input[name="overall"][value="tie"]')
    with page.expect_navigation():
        page.click("button[type=submit]")

    # annotator 2, mouse only: left, left, tie
    page.goto(f"{url}/s/{tokens[1]}/")
    for n in range(3):
        for q, side in (("overall", "left"), ("adherence", "left"), ("quality", "tie")):
            page.check(f'input[name="{q}"][value="{side}"]')
        with page.expect_navigation():
            page.click("button[type=submit]")
    assert page.inner_text("#progress") == "3 of 3 done"

    with sqlite3.connect(db_path) as conn:
        votes = conn.execute("SELECT v.annotator_id, v.item_id, v.question, v.choice, a.left_model, v.changes "
                             "FROM votes v JOIN assignments a USING (annotator_id, item_id)").fetchall()
    assert len(votes) == 2 * 3 * 3
    sides = {(a, q): set() for a in (1, 2) for q in ("overall", "adherence", "quality")}
    for a, _, q, choice, left, _ in votes:
        sides[a, q].add(side_of(choice, left))
    assert sides[1, "adherence"] == {"tie"} and sides[1, "quality"] == {"left"}
    assert sides[1, "overall"] == {"right", "tie"} and sum(v[5] for v in votes) == 1  # one answer changed
    assert sides[2, "overall"] == sides[2, "adherence"] == {"left"} and sides[2, "quality"] == {"tie"}

    overall = [{"A": 0.0, "tie": 0.5, "B": 1.0}[v[3]] for v in votes if v[2] == "overall"]
    page.goto(f"{url}/admin/{admin}/")
    rate = page.inner_text('#winrates tr[data-q="overall"] td.rate')
    assert float(rate) == pytest.approx(sum(overall) / len(overall), abs=5e-4)
    assert "annotator-1" in page.inner_text("#annotators") and "annotator-2" in page.inner_text("#annotators")
    page.screenshot(path=os.path.join(ARTIFACTS, "humaneval_admin.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "votes.csv"
    assert os.path.getsize(os.path.join(ARTIFACTS, "humaneval_admin.png")) > 0
