"""The annotation server: a Flask app over the study's SQLite database.

    /s/TOKEN/                 the annotator's next item (claimed for them, sides drawn at random)
    /s/TOKEN/item/ID          one of their own items again, with their answers, to change them
    POST /s/TOKEN/vote        item=ID&overall=left|right|tie&adherence=…&quality=…
    /s/TOKEN/img/NAME         an image of one of their items
    /admin/TOKEN/             win rates, votes per annotator, agreement; /admin/TOKEN/votes.csv

Tokens travel in the path, so every link is self-contained and a cross-site form cannot guess its
target; responses carry no-referrer so they do not leak onward, and log lines show them redacted.
Images are served only as regular files inside the study's images folder, never through a link.
A form body is at most `max_form_bytes`, chunked or not.

Balance: an annotator is given the item with the fewest live claims among those they have not seen
and that have fewer than `votes_per_item`; a claim is live once voted on, or for `claim_minutes`
after being shown.
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
import re
import secrets
import time

import numpy as np
from flask import Flask, Response, abort, g, redirect, render_template, request, send_file, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from base_model.errors import InputError

from . import db
from .study import QUESTIONS

SIDES = ("left", "tie", "right")
OUTCOME = {"A": 0.0, "tie": 0.5, "B": 1.0}  # reward.stats' coding: 1 = B wins
CODE = {"A": 0, "B": 1, "tie": 2}  # categories for the agreement statistics

OPEN_ITEM = """
SELECT a.item_id FROM assignments a WHERE a.annotator_id = :me
  AND (SELECT COUNT(*) FROM votes v WHERE v.annotator_id = :me AND v.item_id = a.item_id) < :nq
ORDER BY a.assigned_at LIMIT 1"""
AVAILABLE = """
SELECT id, n FROM (
  SELECT i.id, (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND (a.assigned_at > :since OR EXISTS
      (SELECT 1 FROM votes v WHERE v.annotator_id = a.annotator_id AND v.item_id = a.item_id))) AS n
  FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.annotator_id = :me))
WHERE n < :k"""
DONE = """
SELECT COUNT(*) FROM assignments a WHERE a.annotator_id = :me
  AND (SELECT COUNT(*) FROM votes v WHERE v.annotator_id = :me AND v.item_id = a.item_id) >= :nq"""
# a token in a URL: a path segment after /s/ or /admin/, or a token= / admin= query value
TOKEN_IN_URL = re.compile(r"(/(?:s|admin)(?:/|%2F)+)[^/\s?#\"]+|([?&;](?:token|admin)=)[^&;\s#\"]*", re.IGNORECASE)


def create_app(db_path: str, claim_minutes: float = 30.0, max_form_bytes: int = 4096) -> Flask:
    keeper = db.open_study(db_path)  # held open for the app's life: see below
    models, k, folder = db.get(keeper, "models"), db.get(keeper, "votes_per_item"), db.images_dir(keeper, db_path)
    app = Flask(__name__)
    # The last connection to close checkpoints the WAL into the database and deletes it (an fsync,
    # ~10 ms); with this one open, a request's own close is cheap.
    app.extensions["humaneval_db"] = keeper
    app.config["MAX_CONTENT_LENGTH"] = max_form_bytes
    app.jinja_env.autoescape = True  # also for any template name, not only *.html
    for logger in (logging.getLogger("werkzeug"), app.logger):  # the access log, and "Exception on /s/…"
        logger.addFilter(REDACT)  # once: addFilter skips a filter it already has

    def conn():
        if "db" not in g:
            g.db = db.connect(db_path)  # one connection per request, closed at teardown
        return g.db

    @app.teardown_appcontext
    def _close(_exc):
        if (c := g.pop("db", None)) is not None:
            c.close()

    @app.before_request
    def _nonce():
        g.nonce = secrets.token_urlsafe(12)

    @app.before_request
    def _chunked_body_limit():
        # A chunked body has no Content-Length: werkzeug stops reading it at MAX_CONTENT_LENGTH and
        # would parse the part it read. Read it here (kept for request.form) and refuse what goes on.
        if request.content_length is None and request.environ.get("wsgi.input_terminated"):
            request.get_data(cache=True)
            try:
                more = request.stream.is_exhausted and request.environ["wsgi.input"].read(1)
            except OSError:  # werkzeug's dechunker: a malformed chunk
                abort(400, "malformed chunked body")
            if more:
                raise RequestEntityTooLarge()

    @app.after_request
    def _headers(resp):
        resp.headers["Content-Security-Policy"] = (f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                                                   f"script-src 'nonce-{g.get('nonce', '')}'; form-action 'self'")
        resp.headers["Referrer-Policy"] = "no-referrer"  # the token is in the URL
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(HTTPException)
    def _error(e: HTTPException):
        if isinstance(e, RequestEntityTooLarge):  # the issue asks for 400 with a message
            return Response(f"400 Bad Request: form too large (limit {max_form_bytes} bytes)\n", 400,
                            mimetype="text/plain")
        return Response(f"{e.code} {e.name}: {e.description}\n", e.code, mimetype="text/plain")

    def annotator(token: str):
        row = conn().execute("SELECT * FROM annotators WHERE token_sha256 = ?",
                             (db.token_hash(token),)).fetchone()
        if row is None:
            abort(403, "unknown annotator token; use the link you were given")
        return row

    def check_admin(token: str):
        if not hmac.compare_digest(db.token_hash(token), db.get(conn(), "admin_token_sha256")):
            abort(403, "wrong admin token")

    @app.route("/")
    @app.route("/s/")
    @app.route("/admin/")
    def no_token():
        abort(401, "this page needs a token: open the link you were given")

    # -- annotators ------------------------------------------------------------------------

    @app.get("/s/<token>/")
    def next_item(token):
        me = annotator(token)["id"]
        c = conn()
        with db.write(c):  # read-then-write: find the item to give, then claim it
            row = c.execute(OPEN_ITEM, {"me": me, "nq": len(QUESTIONS)}).fetchone()
            if row is None:
                row = c.execute(AVAILABLE + " ORDER BY n, random() LIMIT 1",
                                {"me": me, "k": k, "since": time.time() - 60 * claim_minutes}).fetchone()
                if row is not None:
                    c.execute("INSERT INTO assignments (annotator_id, item_id, left_model, assigned_at) "
                              "VALUES (?, ?, ?, ?)", (me, row["id"], secrets.choice("AB"), time.time()))
        if row is None:
            return render_template("done.html", progress=progress(me), token=token, prev=last_voted(me))
        return show(token, me, row[0])

    @app.get("/s/<token>/item/<int:item_id>")
    def item(token, item_id):
        return show(token, annotator(token)["id"], item_id)

    def show(token, me, item_id):
        c = conn()
        row = c.execute("SELECT i.*, a.left_model FROM items i JOIN assignments a ON a.item_id = i.id "
                        "WHERE a.annotator_id = ? AND i.id = ?", (me, item_id)).fetchone()
        if row is None:
            abort(404, "not one of your items")
        left = row["left_model"]
        mine = {v["question"]: side_of(v["choice"], left) for v in c.execute(
            "SELECT question, choice FROM votes WHERE annotator_id = ? AND item_id = ?", (me, item_id))}
        images = {"A": row["image_a"], "B": row["image_b"]}
        return render_template("item.html", token=token, item=row, mine=mine, questions=QUESTIONS,
                               left=images[left], right=images[other(left)], progress=progress(me),
                               prev=last_voted(me, exclude=item_id))

    def progress(me) -> tuple[int, int]:
        """(items done, items this annotator can have in all, as things stand)."""
        c = conn()
        done = c.execute(DONE, {"me": me, "nq": len(QUESTIONS)}).fetchone()[0]
        assigned = c.execute("SELECT COUNT(*) FROM assignments WHERE annotator_id = ?", (me,)).fetchone()[0]
        free = c.execute(f"SELECT COUNT(*) FROM ({AVAILABLE})",
                         {"me": me, "k": k, "since": time.time() - 60 * claim_minutes}).fetchone()[0]
        return done, assigned + free

    def last_voted(me, exclude=-1):
        """The item this annotator voted on last (for a link back to it), or None."""
        row = conn().execute("SELECT item_id FROM votes WHERE annotator_id = ? AND item_id != ? "
                             "ORDER BY at DESC LIMIT 1", (me, exclude)).fetchone()
        return row[0] if row else None

    @app.post("/s/<token>/vote")
    def vote(token):
        me = annotator(token)["id"]
        form = request.form  # raises RequestEntityTooLarge (→ 400) past max_form_bytes
        if unknown := set(form) - {"item", *QUESTIONS}:
            abort(400, f"unknown field(s) {sorted(unknown)}; expected item and {list(QUESTIONS)}")
        if len(form.getlist("item")) != 1 or not re.fullmatch(r"[0-9]{1,12}", form["item"]):
            abort(400, "field 'item' must be one item id")
        answers = {}
        for q in QUESTIONS:
            values = form.getlist(q)
            if len(values) > 1 or (values and values[0] not in SIDES):
                abort(400, f"field {q!r} must be one of {list(SIDES)}, got {values[:2]}")
            if values:
                answers[q] = values[0]
        if not answers:
            abort(400, f"no answer: give at least one of {list(QUESTIONS)}")
        item_id, now, c = int(form["item"]), time.time(), conn()
        with db.write(c):  # read the sides shown, then write the votes
            row = c.execute("SELECT left_model FROM assignments WHERE annotator_id = ? AND item_id = ?",
                            (me, item_id)).fetchone()
            if row is None:
                abort(403, f"item {item_id} is not one of your items")
            c.executemany(
                "INSERT INTO votes (annotator_id, item_id, question, choice, first_at, at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (annotator_id, item_id, question) DO UPDATE SET choice = excluded.choice, "
                "at = excluded.at, changes = votes.changes + (votes.choice != excluded.choice)",
                [(me, item_id, q, model_of(side, row["left_model"]), now, now) for q, side in answers.items()])
        return redirect(url_for("next_item", token=token), 303)

    @app.get("/s/<token>/img/<path:name>")
    def image(token, name):
        me = annotator(token)["id"]
        ok = conn().execute("SELECT 1 FROM items i JOIN assignments a ON a.item_id = i.id WHERE a.annotator_id = ? "
                            "AND ? IN (i.image_a, i.image_b)", (me, name)).fetchone()
        if ok is None:
            abort(404, "no such image among your items")
        try:
            return send_file(db.image_file(folder, name))
        except InputError:
            abort(404, "no such image among your items")

    # -- admin -----------------------------------------------------------------------------

    @app.get("/admin/<token>/")
    def admin(token):
        check_admin(token)
        c = conn()
        votes = c.execute("SELECT annotator_id, item_id, question, choice FROM votes").fetchall()
        people = c.execute(
            "SELECT n.id, n.name, (SELECT COUNT(*) FROM assignments a WHERE a.annotator_id = n.id) AS shown, "
            "(SELECT COUNT(*) FROM assignments a WHERE a.annotator_id = n.id AND (SELECT COUNT(*) FROM votes v "
            "WHERE v.annotator_id = n.id AND v.item_id = a.item_id) >= :nq) AS done, "
            "(SELECT COUNT(*) FROM votes v WHERE v.annotator_id = n.id) AS votes, "
            "(SELECT MAX(at) FROM votes v WHERE v.annotator_id = n.id) AS last FROM annotators n ORDER BY n.id",
            {"nq": len(QUESTIONS)}).fetchall()
        n_items = c.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        rows = [question_stats(q, [v for v in votes if v["question"] == q], [p["id"] for p in people], k)
                for q in QUESTIONS]
        return render_template("admin.html", token=token, models=models, k=k, n_items=n_items, rows=rows,
                               people=people, fmt=clock, questions=QUESTIONS)

    @app.get("/admin/<token>/votes.csv")
    def votes_csv(token):
        check_admin(token)
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["annotator", "item", "prompt", "seed", "question", "choice", "chosen_model", "left_model",
                    "first_at", "at", "changes"])
        for r in conn().execute(
                "SELECT n.name, v.item_id, i.prompt, i.seed, v.question, v.choice, a.left_model, v.first_at, v.at, "
                "v.changes FROM votes v JOIN annotators n ON n.id = v.annotator_id JOIN items i ON i.id = v.item_id "
                "JOIN assignments a ON a.annotator_id = v.annotator_id AND a.item_id = v.item_id "
                "ORDER BY v.item_id, n.id, v.question"):
            chosen = models[r["choice"]]["name"] if r["choice"] != "tie" else ""
            w.writerow([r[0], r[1], r[2], r[3], r[4], r[5], chosen, r[6], r[7], r[8], r[9]])
        return Response(out.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=votes.csv"})

    return app


class RedactTokens(logging.Filter):
    """Every record's text with the tokens in it replaced by <redacted> (see `redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


REDACT = RedactTokens()


def redact(text: str) -> str:
    """/s/TOKEN/… → /s/<redacted>/…, /admin/TOKEN/ → /admin/<redacted>/, token=… → token=<redacted>."""
    return TOKEN_IN_URL.sub(lambda m: (m.group(1) or m.group(2)) + "<redacted>", text)


def clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


def other(model: str) -> str:
    return "B" if model == "A" else "A"


def model_of(side: str, left: str) -> str:
    return "tie" if side == "tie" else left if side == "left" else other(left)


def side_of(choice: str, left: str) -> str:
    return "tie" if choice == "tie" else "left" if choice == left else "right"


def question_stats(question: str, votes, annotators: list[int], k: int) -> dict:
    """Win rate of B over A with a bootstrap CI clustered by item, and agreement: Krippendorff's α
    (nominal, any number of raters per item) and Fleiss' κ over the items with exactly k votes."""
    from reward.stats import fleiss_kappa, krippendorff_alpha_nominal, outcome_win_rate  # scipy: 2 s to import

    out = {"question": question, "n": len(votes), "wins": 0, "ties": 0, "losses": 0, "win_rate": None,
           "ci95": None, "sign_test_p": None, "alpha": float("nan"), "kappa": float("nan"), "kappa_items": 0}
    if not votes:
        return out
    out.update(outcome_win_rate([OUTCOME[v["choice"]] for v in votes], groups=[v["item_id"] for v in votes]))
    items = sorted({v["item_id"] for v in votes})
    col, row = {i: j for j, i in enumerate(items)}, {a: j for j, a in enumerate(annotators)}
    ratings = np.full((len(annotators), len(items)), np.nan)
    table = np.zeros((len(items), 3))
    for v in votes:
        code = CODE[v["choice"]]
        ratings[row[v["annotator_id"]], col[v["item_id"]]] = code
        table[col[v["item_id"]], code] += 1
    out["alpha"] = krippendorff_alpha_nominal(ratings)
    full = table[table.sum(1) == k]
    if k >= 2 and len(full):
        out["kappa"], out["kappa_items"] = fleiss_kappa(full), len(full)
    return out


def serve(db_path: str, host: str = "127.0.0.1", port: int = 8000, claim_minutes: float = 30.0) -> None:
    """Serve until killed: werkzeug's threaded server (a thread per request), enough for a study's
    handful of annotators. Port 0 picks a free port; the first line printed says which."""
    from werkzeug.serving import make_server

    server = make_server(host, port, create_app(db_path, claim_minutes), threaded=True)
    print(f"serving {db_path} on http://{host}:{server.server_port}/", flush=True)
    server.serve_forever()
