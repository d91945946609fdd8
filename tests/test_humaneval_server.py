"""The real server over HTTP on 127.0.0.1: 16 annotators voting at once lose and duplicate nothing,
a server killed mid-study and restarted has every vote it had answered, a chunked body over the
limit is refused whole, and the access log shows no token."""

import http.client
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from reward.humaneval.app import side_of
from tests.test_humaneval_app import make_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("left", "tie", "right")


@pytest.fixture
def server(tmp_path):
    """start(db) → base URL of `python -m reward.humaneval serve` on a free port; killed at teardown."""
    procs, logs = [], []

    def start(db_path):
        logs.append(log := open(tmp_path / f"server-{len(procs)}.log", "w"))  # noqa: SIM115  (closed below)
        proc = subprocess.Popen([sys.executable, "-m", "reward.humaneval", "serve", "--db", db_path, "--port", "0"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        procs.append(proc)
        line = proc.stdout.readline()  # "serving … on http://127.0.0.1:PORT/"
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"server did not start on 127.0.0.1: {line!r} {(tmp_path / 'server-0.log').read_text()[-2000:]}"
        return proc, f"http://127.0.0.1:{m.group(1)}"

    yield start
    for proc, log in zip(procs, logs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def next_item(session, url, token) -> int | None:
    page = session.get(f"{url}/s/{token}/", timeout=60)
    assert page.status_code == 200, page.text
    m = re.search(r'name="item" value="(\d+)"', page.text)
    return int(m.group(1)) if m else None


def post_vote(session, url, token, item, answers) -> int:
    return session.post(f"{url}/s/{token}/vote", data={"item": item, **answers}, allow_redirects=False,
                        timeout=60).status_code


def stored(db_path) -> dict:
    """(client index = annotator id − 1, item, question) → the side voted for, read back from the database."""
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT v.annotator_id, v.item_id, v.question, v.choice, a.left_model FROM votes v "
                            "JOIN assignments a USING (annotator_id, item_id)").fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return {(a - 1, i, q): side_of(choice, left) for a, i, q, choice, left in rows}


def test_16_clients_vote_at_once_nothing_lost_or_duplicated(tmp_path, server):
    n_clients, n_items, n_revotes = 16, 50, 5
    db_path, _, tokens = make_study(tmp_path, n_items=n_items, votes_per_item=n_clients, n_annotators=n_clients)
    _, url = server(db_path)
    expected, errors = {}, []
    barrier = threading.Barrier(n_clients)

    def client(c):
        rng, session = random.Random(c), requests.Session()
        try:
            barrier.wait()
            mine = []
            for _ in range(n_items):
                item = next_item(session, url, tokens[c])
                answers = {q: rng.choice(SIDES) for q in ("overall", "adherence", "quality")}
                assert post_vote(session, url, tokens[c], item, answers) == 303
                expected.update({(c, item, q): s for q, s in answers.items()})
                mine.append(item)
            assert next_item(session, url, tokens[c]) is None  # all 50 done
            for item in mine[:n_revotes]:  # change one's mind: replaces, never adds
                side = next(s for s in SIDES if s != expected[(c, item, "overall")])
                assert post_vote(session, url, tokens[c], item, {"overall": side}) == 303
                expected[(c, item, "overall")] = side
        except Exception as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    assert not errors, errors[:3]
    got = stored(db_path)
    assert len(got) == len(expected) == n_clients * n_items * 3  # 0 lost, 0 duplicated (primary key)
    assert got == expected, "a stored vote differs from the last one sent"
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*), SUM(changes) FROM votes").fetchone() == (2400, n_clients * n_revotes)
        per_item = conn.execute("SELECT COUNT(*) FROM assignments GROUP BY item_id").fetchall()
    assert per_item == [(n_clients,)] * n_items
    print(f"{n_clients} clients × {n_items + n_revotes} votes (+ {n_items} pages) in {elapsed:.1f} s")


def test_a_killed_server_restarts_with_every_answered_vote(tmp_path, server):
    db_path, _, tokens = make_study(tmp_path, n_items=40, votes_per_item=1, n_annotators=2)
    proc, url = server(db_path)
    confirmed, stop = {}, threading.Event()

    def annotate(c):
        session = requests.Session()
        while not stop.is_set():
            try:
                item = next_item(session, url, tokens[c])
                if item is None:
                    return
                answers = {"overall": random.choice(SIDES), "adherence": "tie", "quality": "left"}
                if post_vote(session, url, tokens[c], item, answers) == 303:
                    confirmed.update({(c, item, q): s for q, s in answers.items()})
            except requests.RequestException:
                return  # the server is gone (refused, reset, or cut off mid-response)

    threads = [threading.Thread(target=annotate, args=(c,)) for c in range(2)]
    for t in threads:
        t.start()
    while len(confirmed) < 3 * 10 and all(t.is_alive() for t in threads):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-study, with requests in flight
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    before = stored(db_path)
    assert len(confirmed) >= 30 and all(before.get(k) == v for k, v in confirmed.items())

    _, url = server(db_path)  # restart: everything answered is there, and the study goes on
    assert stored(db_path) == before
    session = requests.Session()
    for c in range(2):
        while (item := next_item(session, url, tokens[c])) is not None:
            assert post_vote(session, url, tokens[c], item, {"overall": "left", "adherence": "left",
                                                             "quality": "left"}) == 303
    after = stored(db_path)
    assert {k: after[k] for k in before} == before
    assert len(after) == len({(i, q) for _, i, q in after}) == 40 * 3  # every item voted once (votes_per_item=1)


def test_an_oversized_post_over_http_is_400(tmp_path, server):
    db_path, _, (t1, *_) = make_study(tmp_path, n_items=1, votes_per_item=1, n_annotators=1)
    _, url = server(db_path)
    r = requests.post(f"{url}/s/{t1}/vote", data={"item": "1", "overall": "left", "pad": "x" * 50_000}, timeout=30)
    assert r.status_code == 400 and "too large" in r.text
    assert requests.get(f"{url}/s/{t1}/", timeout=30).status_code == 200  # and the server goes on


def chunked_post(url, path, body: bytes, chunk=1000) -> tuple[int, str]:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length) → (status, text)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/x-www-form-urlencoded")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(body), chunk):
        conn.send(b"%x\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk]))
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    out = r.status, r.read().decode()
    conn.close()
    return out


def test_a_chunked_post_over_the_limit_is_refused_not_cut(tmp_path, server):
    db_path, _, (t1, *_) = make_study(tmp_path, n_items=1, votes_per_item=1, n_annotators=1)
    _, url = server(db_path)
    item = next_item(requests.Session(), url, t1)
    # cut at 4096 bytes this body would be a valid vote: it must be refused whole
    status, text = chunked_post(url, f"/s/{t1}/vote", f"item={item}&overall=left".encode() + b"&" * 10_000)
    assert status in (400, 413) and "too large" in text
    assert stored(db_path) == {}
    status, _ = chunked_post(url, f"/s/{t1}/vote", f"item={item}&overall=right".encode() + b"&" * 4000, chunk=7)
    assert status == 303 and stored(db_path) == {(0, item, "overall"): "right"}  # under the limit: counted


def test_the_access_log_never_shows_a_token(tmp_path, server):
    db_path, admin, (t1, t2) = make_study(tmp_path, n_items=2, votes_per_item=1, n_annotators=2)
    _, url = server(db_path)
    session = requests.Session()
    item = next_item(session, url, t1)
    assert post_vote(session, url, t1, item, {"overall": "left"}) == 303
    for path in (f"/s/{t2}/", f"/admin/{admin}/", f"/admin/{admin}/votes.csv", f"/s/{'x' * 32}/",
                 f"/s//{t1}/", f"/s/{t1}/img/nothing.png", f"/?token={t1}&admin={admin}"):
        session.get(url + path, timeout=30)
    log = tmp_path / "server-0.log"
    for _ in range(100):  # a line is written before its response is sent; wait for the last one anyway
        if "token=" in log.read_text():
            break
        time.sleep(0.05)
    text = log.read_text()
    assert text.count("GET /s/<redacted>/") >= 2 and "POST /s/<redacted>/vote" in text  # (amid colour codes)
    assert "/admin/<redacted>/votes.csv" in text and "token=<redacted>&admin=<redacted>" in text
    for secret in (t1, t2, admin, "x" * 32):
        assert secret not in text
