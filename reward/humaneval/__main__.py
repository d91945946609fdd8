"""Human evaluation: two models, the same prompts and seeds, annotators vote in a browser.

    python -m reward.humaneval create --model base=runs/toy/final --model dpo=runs/dpo/final \
        --prompts heldout_prompts --n_prompts 50 --n_per_prompt 2 --db study.sqlite --images study_images
    python -m reward.humaneval invite --db study.sqlite --n 5 --url http://127.0.0.1:8000
    python -m reward.humaneval serve --db study.sqlite --host 127.0.0.1 --port 8000
    python -m reward.humaneval export --db study.sqlite --output runs/human_pairs

`create` prints the admin token (its page: /admin/TOKEN/); `invite --admin` replaces it. The first
model is A, the second B; win rates are B's over A. `--prompts` is a shapes-world split name (with
--n_prompts) or a text file, one prompt a line. `export` writes each item's majority vote on the
overall question (ties as 0.5/0.5) as Pick-a-Pic-schema pairs that `align.dpo --pairs` reads.
"""

import argparse
import json

from base_model.cli import ArgumentParser
from base_model.errors import entry_point


def model_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected NAME=SPEC, e.g. base=runs/toy/final")
    return name, spec


def count(text: str) -> int:
    """argparse type: an integer ≥ 1 (argparse puts the flag's name before the message)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {n}")
    return n


@entry_point
def main(argv=None):
    ap = ArgumentParser(prog="python -m reward.humaneval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="sample both models and write the study")
    c.add_argument("--model", type=model_arg, action="append", required=True,
                   help="NAME=SPEC, twice: A then B (a SPEC is CKPT, CKPT+ADAPTER or an adapter folder)")
    c.add_argument("--prompts", required=True, help="a shapes-world split name or a text file, one prompt a line")
    c.add_argument("--n_prompts", type=count, help="prompts to take (a split needs it; default: the whole file)")
    c.add_argument("--n_per_prompt", type=count, default=2, help="items per prompt, each with its own seed")
    c.add_argument("--votes_per_item", type=count, default=3, help="annotators wanted per item")
    c.add_argument("--db", required=True)
    c.add_argument("--images", required=True, help="folder for the PNGs (created)")
    # base_model.sampling's defaults, spelled out so that `serve` starts without importing torch
    c.add_argument("--solver", default="midpoint", choices=("euler", "midpoint"))
    c.add_argument("--steps", type=count, default=5)
    c.add_argument("--guidance", type=float, default=2.0)
    c.add_argument("--shift", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0, help="item i is drawn with seed + i by both models")

    i = sub.add_parser("invite", help="add annotators and print their links (tokens are shown once)")
    i.add_argument("--db", required=True)
    i.add_argument("--n", type=count, default=1, help="annotators to add")
    i.add_argument("--url", default="http://127.0.0.1:8000", help="where the server is reached")
    i.add_argument("--admin", action="store_true", help="print a new admin link instead (the old one stops working)")

    s = sub.add_parser("serve", help="run the annotation server")
    s.add_argument("--db", required=True)
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--claim_minutes", type=float, default=30.0,
                   help="how long an item shown but not voted on stays reserved for its annotator")

    e = sub.add_parser("export", help="majority votes → Pick-a-Pic-schema pairs for align.dpo")
    e.add_argument("--db", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--question", default="overall", help="overall, adherence or quality")
    e.add_argument("--overwrite_output_dir", action="store_true", help="replace pairs already exported to --output")

    run(ap.parse_args(argv), ap)


def run(args, ap):
    from base_model.sources import read_prompts

    from . import study

    if args.command == "create":
        models = dict(args.model)
        if len(args.model) != 2 or len(models) != 2:
            ap.error("--model: give exactly two, with different names (A, then B)")
        prompts, _ = read_prompts(args.prompts, args.n_prompts)
        sampler = {"solver": args.solver, "steps": args.steps, "guidance": args.guidance, "shift": args.shift}
        admin = study.create(args.db, args.images, models, prompts, sampler, args.n_per_prompt, args.votes_per_item,
                             args.seed)
        print(f"study {args.db}: {len(prompts) * args.n_per_prompt} items from {len(prompts)} prompts, images in "
              f"{args.images}\nadmin page: /admin/{admin}/ (keep it secret; `invite --admin` replaces it)")
    elif args.command == "invite":
        url = args.url.rstrip("/")
        if args.admin:
            print(f"admin: {url}/admin/{study.new_admin_token(args.db)}/")
        for name, token in study.invite(args.db, 0 if args.admin else args.n):
            print(f"{name}: {url}/s/{token}/")
    elif args.command == "serve":
        from .app import serve

        serve(args.db, args.host, args.port, args.claim_minutes)
    else:
        print(json.dumps(study.export(args.db, args.output, args.question, args.overwrite_output_dir)))


if __name__ == "__main__":
    main()
