"""The human-evaluation app through Flask's test client: voting, balance, the admin page, and the
security cases (tokens, other annotators' votes, escaping, path traversal, symlinked images, bad
forms, bind address, bad counts, tokens in log lines)."""

import csv
import io
import logging
import os
import re
import sqlite3

import pytest

from base_model.errors import InputError
from base_model.shapes import make_split, render
from reward.humaneval import __main__ as cli
from reward.humaneval import study
from reward.humaneval.app import REDACT, create_app, redact

ANSWERS = {"overall": "left", "adherence": "tie", "quality": "right"}


def make_study(tmp_path, n_items=4, votes_per_item=2, n_annotators=3, prompt=None):
    scenes, others = make_split("val", n_items), make_split("train", n_items)
    items = [(prompt or s.caption, s.seed, render(s), render(o)) for s, o in zip(scenes, others)]
    db_path = str(tmp_path / "study.sqlite")
    admin = study.create_study(db_path, str(tmp_path / "images"), {"base": "ckpt/a", "dpo": "ckpt/b"}, items,
                               votes_per_item)
    tokens = [t for _, t in study.invite(db_path, n_annotators)]
    return db_path, admin, tokens


@pytest.fixture
def setup(tmp_path):
    db_path, admin, tokens = make_study(tmp_path)
    return create_app(db_path).test_client(), db_path, admin, tokens


def shown(page) -> tuple[int, str, str]:
    """(item id, left image name, right image name) from an item page."""
    html = page.get_data(as_text=True)
    item = int(re.search(r'name="item" value="(\d+)"', html).group(1))
    left, right = re.findall(r'/img/([0-9a-f]+\.png)', html)
    return item, left, right


def vote(client, token, item, **answers):
    return client.post(f"/s/{token}/vote", data={"item": item, **(answers or ANSWERS)})


def rows(db_path, sql, *args):
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql, args).fetchall()


def test_a_vote_is_stored_as_the_model_shown_on_that_side(setup):
    client, db_path, _, (t1, *_) = setup
    page = client.get(f"/s/{t1}/")
    assert page.status_code == 200 and "0 of 4 done" in page.get_data(as_text=True)
    item, left, right = shown(page)
    image_a, image_b, left_model = rows(db_path, "SELECT image_a, image_b, left_model FROM items JOIN assignments "
                                                 "ON item_id = id WHERE id = ?", item)[0]
    assert {left, right} == {image_a, image_b} and (left == image_a) == (left_model == "A")
    assert client.get(f"/s/{t1}/img/{left}").status_code == 200
    assert shown(client.get(f"/s/{t1}/")) == (item, left, right)  # a reload shows the same open item
    r = vote(client, t1, item)
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/s/{t1}/")
    got = dict(rows(db_path, "SELECT question, choice FROM votes WHERE item_id = ?", item))
    right_model = "B" if left_model == "A" else "A"
    assert got == {"overall": left_model, "adherence": "tie", "quality": right_model}
    assert "1 of 4 done" in client.get(f"/s/{t1}/").get_data(as_text=True)


def test_a_second_vote_replaces_the_first_with_its_time(setup):
    client, db_path, _, (t1, *_) = setup
    item, _, _ = shown(client.get(f"/s/{t1}/"))
    vote(client, t1, item, overall="left")
    (first,) = rows(db_path, "SELECT choice, first_at, at, changes FROM votes WHERE question = 'overall'")
    page = client.get(f"/s/{t1}/item/{item}").get_data(as_text=True)
    assert re.search(r'name="overall" value="left" required\s+checked', page)  # shown again, answered
    vote(client, t1, item, overall="right")
    (second,) = rows(db_path, "SELECT choice, first_at, at, changes FROM votes WHERE question = 'overall'")
    assert second[0] != first[0] and second[1] == first[1] and second[2] >= first[2] and second[3] == 1


def test_items_are_balanced_to_the_votes_wanted(setup):
    client, db_path, _, (t1, t2, t3) = setup
    for token in (t1, t2):
        for _ in range(4):
            item, _, _ = shown(client.get(f"/s/{token}/"))
            assert vote(client, token, item).status_code == 303
        assert "All done" in client.get(f"/s/{token}/").get_data(as_text=True)
    # every item has its 2 votes: nothing is left for the third annotator
    assert rows(db_path, "SELECT item_id, COUNT(*) FROM votes WHERE question = 'overall' GROUP BY item_id") == \
        [(i, 2) for i in range(1, 5)]
    assert "0 of 0 done" in client.get(f"/s/{t3}/").get_data(as_text=True)


def test_a_claimed_item_goes_to_others_last(tmp_path):
    db_path, _, (t1, t2, _) = make_study(tmp_path, n_items=2, votes_per_item=1)
    client = create_app(db_path).test_client()
    a, _, _ = shown(client.get(f"/s/{t1}/"))  # shown, not voted: reserved for claim_minutes
    b, _, _ = shown(client.get(f"/s/{t2}/"))
    assert a != b


def test_admin_page_shows_win_rates_agreement_and_the_votes(setup):
    client, db_path, admin, (t1, t2, _) = setup
    for token in (t1, t2):
        for _ in range(4):
            item, left, _ = shown(client.get(f"/s/{token}/"))
            # both always prefer B, whatever side it is on: win rate 1, perfect agreement
            side = "right" if rows(db_path, "SELECT image_a FROM items WHERE id = ?", item) == [(left,)] else "left"
            vote(client, token, item, overall=side, adherence=side, quality="tie")
    page = client.get(f"/admin/{admin}/").get_data(as_text=True)
    assert "Win rate of dpo over base" in page
    overall = re.search(r'<tr data-q="overall">(.*?)</tr>', page, re.DOTALL).group(1)
    assert '<td class="rate">1.000</td>' in overall
    assert "annotator-1" in page and "annotator-2" in page
    data = client.get(f"/admin/{admin}/votes.csv")
    assert data.status_code == 200 and data.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(data.get_data(as_text=True))))
    assert len(table) == 2 * 4 * 3 and {r["chosen_model"] for r in table if r["question"] == "overall"} == {"dpo"}


# -- security and bad input ------------------------------------------------------------------


def test_no_token_is_401_and_a_wrong_token_403(setup):
    client, _, admin, (t1, *_) = setup
    for path in ("/", "/s/", "/admin/"):
        assert client.get(path).status_code == 401, path
    wrong = "x" * 32
    for path in (f"/s/{wrong}/", f"/s/{wrong}/item/1", f"/s/{wrong}/img/a.png", f"/admin/{wrong}/",
                 f"/admin/{wrong}/votes.csv", f"/admin/{t1}/", f"/admin/{t1}/votes.csv", f"/s/{admin}/"):
        r = client.get(path)
        assert r.status_code == 403 and b"token" in r.data, path
    assert client.post(f"/s/{wrong}/vote", data={"item": 1, **ANSWERS}).status_code == 403


def test_an_annotator_cannot_see_or_change_anothers_votes(setup):
    client, db_path, _, (t1, t2, _) = setup
    item, left, _ = shown(client.get(f"/s/{t1}/"))
    vote(client, t1, item)
    before = rows(db_path, "SELECT * FROM votes")
    r = vote(client, t2, item, overall="right")  # not shown to t2
    assert r.status_code == 403 and b"not one of your items" in r.data
    assert client.get(f"/s/{t2}/item/{item}").status_code == 404
    assert client.get(f"/s/{t2}/img/{left}").status_code == 404
    assert rows(db_path, "SELECT * FROM votes") == before
    # once the item is shown to t2 too, t2 sees it unanswered: their own answers only
    for _ in range(4):
        other, _, _ = shown(client.get(f"/s/{t2}/"))
        if other == item:
            break
        vote(client, t2, other)
    page = client.get(f"/s/{t2}/item/{item}").get_data(as_text=True)
    assert not re.search(r"required\s+checked", page)


def test_a_prompt_is_shown_as_text_never_as_html(tmp_path):
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    db_path, _, (t1, *_) = make_study(tmp_path, prompt=evil)
    page = create_app(db_path).test_client().get(f"/s/{t1}/").get_data(as_text=True)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in page


def test_images_are_served_only_from_the_study_folder(setup, tmp_path):
    client, _, _, (t1, *_) = setup
    shown(client.get(f"/s/{t1}/"))
    (tmp_path / "secret.txt").write_text("secret")
    for name in ("../study.sqlite", "..%2Fstudy.sqlite", "%2e%2e/secret.txt", "../../../../etc/passwd",
                 "/etc/passwd", "..", "images/../../secret.txt"):
        r = client.get(f"/s/{t1}/img/{name}", follow_redirects=True)  # "//" redirects to "/" first
        assert r.status_code == 404 and b"secret" not in r.data, name


@pytest.mark.parametrize("form, message", [
    ({}, "item"),
    ({"item": "abc", "overall": "left"}, "item"),
    ({"item": ["1", "2"], "overall": "left"}, "item"),
    ({"item": "²", "overall": "left"}, "item"),
    ({"item": "9" * 40, "overall": "left"}, "item"),
    ({"item": "1"}, "no answer"),
    ({"item": "1", "overall": "up"}, "overall"),
    ({"item": "1", "overall": ["left", "right"]}, "overall"),
    ({"item": "1", "overall": "left", "admin": "1"}, "unknown field"),
    ({"item": "1", "overall": "left", "pad": "x" * 10_000}, "too large"),
])
def test_malformed_or_oversized_forms_are_400_with_a_message(setup, form, message):
    client, db_path, _, (t1, *_) = setup
    shown(client.get(f"/s/{t1}/"))
    r = client.post(f"/s/{t1}/vote", data=form)
    assert r.status_code == 400 and message in r.get_data(as_text=True)
    assert rows(db_path, "SELECT COUNT(*) FROM votes") == [(0,)]


def test_a_json_body_is_400(setup):
    client, _, _, (t1, *_) = setup
    r = client.post(f"/s/{t1}/vote", json={"item": 1, "overall": "left"})
    assert r.status_code == 400


def test_serve_binds_loopback_unless_told(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr("reward.humaneval.app.serve", lambda *a: got.setdefault("args", a))
    cli.main(["serve", "--db", "study.sqlite"])
    assert got["args"][1] == "127.0.0.1"
    got.clear()
    cli.main(["serve", "--db", "study.sqlite", "--host", "0.0.0.0", "--port", "9000"])
    assert got["args"][1:3] == ("0.0.0.0", 9000)


def test_majority_keeps_ties():
    assert study.majority(["A", "A", "B"]) == (1.0, 0.0)
    assert study.majority(["B", "tie", "B"]) == (0.0, 1.0)
    assert study.majority(["A", "B"]) == (0.5, 0.5)
    assert study.majority(["tie", "tie", "A"]) == (0.5, 0.5)
    assert study.majority(["A", "B", "tie"]) == (0.5, 0.5)


def test_a_symlinked_image_is_404_and_export_refuses_it(setup, tmp_path):
    client, db_path, _, (t1, *_) = setup
    item, left, right = shown(client.get(f"/s/{t1}/"))
    vote(client, t1, item)
    (tmp_path / "secret.txt").write_text("secret")
    link = tmp_path / "images" / left
    link.unlink()
    link.symlink_to(tmp_path / "secret.txt")
    r = client.get(f"/s/{t1}/img/{left}")
    assert r.status_code == 404 and b"secret" not in r.data
    assert client.get(f"/s/{t1}/img/{right}").status_code == 200  # the regular file beside it
    with pytest.raises(InputError, match=f"{left}.*symlink"):
        study.export(db_path, str(tmp_path / "pairs"))
    assert not (tmp_path / "pairs").exists()
    link.unlink()
    link.symlink_to(tmp_path / "images" / right)  # a link inside the folder is refused too
    assert client.get(f"/s/{t1}/img/{left}").status_code == 404


def test_export_onto_an_existing_file_is_one_line_and_leaves_nothing(setup, tmp_path, capsys):
    client, db_path, _, (t1, *_) = setup
    item, _, _ = shown(client.get(f"/s/{t1}/"))
    vote(client, t1, item)
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as err:
        cli.main(["export", "--db", db_path, "--output", str(tmp_path / "notes.txt")])
    assert err.value.code == 2
    assert re.fullmatch(r"error: .*notes\.txt.*not a folder.*\n", capsys.readouterr().err)
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("argv, flag", [
    (["create", "--n_per_prompt", "0"], "--n_per_prompt"),
    (["create", "--n_prompts", "0"], "--n_prompts"),
    (["create", "--steps", "0"], "--steps"),
    (["create", "--votes_per_item", "-1"], "--votes_per_item"),
    (["create", "--steps", "two"], "--steps"),
    (["invite", "--n", "-3"], "--n"),
])
def test_counts_below_one_are_a_usage_error_naming_the_flag(tmp_path, capsys, argv, flag):
    common = {"create": ["--model", "a=x", "--model", "b=y", "--prompts", "p.txt", "--images", str(tmp_path / "i")],
              "invite": []}[argv[0]]
    with pytest.raises(SystemExit) as err:
        cli.main([*argv, *common, "--db", str(tmp_path / "study.sqlite")])
    assert err.value.code == 2
    assert re.search(rf"error: .*argument {flag}: (must be|expected an integer) ≥ 1", capsys.readouterr().err)
    assert os.listdir(tmp_path) == []  # nothing created


def test_log_records_show_no_token():
    token = "Zq3_8xY-kLm2NpQr5StUvWx7Yz0AbCdE"
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, '127.0.0.1 - - [01/Dec/2026 10:00:00] "%s" %s %s',
                               (f"GET /s/{token}/img/0a1b2c3d4e5f6a7b.png HTTP/1.1", "200", "-"), None)
    assert REDACT.filter(record) and token not in record.getMessage()
    assert '"GET /s/<redacted>/img/0a1b2c3d4e5f6a7b.png HTTP/1.1" 200 -' in record.getMessage()
    assert redact(f"Exception on /admin/{token}/votes.csv [GET]") == "Exception on /admin/<redacted>/votes.csv [GET]"
    assert redact(f"GET /S//{token}/ and /s%2F{token} and /x?a=1&token={token}&b=2") == \
        "GET /S//<redacted>/ and /s%2F<redacted> and /x?a=1&token=<redacted>&b=2"
    assert redact("GET /s/ HTTP/1.1") == "GET /s/ HTTP/1.1"
