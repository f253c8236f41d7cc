"""The `cbir` command line. Each subcommand reads its settings from --params and calls the library.

dvc.yaml stages and the Prefect tasks call the same library functions as these subcommands.

Longer than 400 lines: one short handler and one parser entry per subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .augment import STRATEGIES
from .config import DEFAULT_PARAMS, MAX_K, MAX_SIDE, Settings, load_settings
from .errors import CbirError, ConfigError
from .safetext import counted
from .store.layout import layout as _layout

Handler = Callable[[Settings, argparse.Namespace], int | None]
_COMMANDS: dict[str, Handler] = {}


def _progress_wanted() -> bool:
    return sys.stderr.isatty()


def _note(message: str) -> None:
    """What a long step is doing now, on stderr (stdout keeps the summary)."""
    print(message, file=sys.stderr, flush=True)


def _check_range(option: str, value: int | None, low: int, high: int) -> None:
    """A count given on the command line that cannot work: one line before any work (not an
    overflow or a huge allocation later)."""
    if value is not None and value < low:
        raise CbirError(f"{option} must be at least {low}, got {value}")
    if value is not None and value > high:
        raise CbirError(f"{option} must be at most {high:,}, got {value}")


# --------------------------------------------------------------------------- subcommands


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.ingest import run_ingest

    summary = run_ingest(settings, progress=_progress_wanted(), accept_missing=args.accept_missing)
    print("\n".join(summary.lines()))
    return 0


def cmd_demo_data(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.demo import generate_demo_collection

    d = settings.demo
    out = Path(args.out) if args.out else settings.path(d.out_dir)
    summary = generate_demo_collection(
        out,
        n_groups=d.n_groups,
        n_distractors=d.n_distractors,
        max_copies=d.max_copies,
        size=d.size,
        seed=d.seed,
        progress=_progress_wanted(),
    )
    print(
        f"demo collection: {summary.n_images} images ({summary.n_groups} groups of "
        f"near-duplicates, {summary.n_distractors} distractors) in {out}"
    )
    print(f"ground truth: {summary.ground_truth}")
    return 0


def cmd_embed(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.embed import run_embed

    print("\n".join(run_embed(settings, progress=_progress_wanted()).lines()))
    return 0


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.index import run_index

    print("\n".join(run_index(settings, rebuild=args.rebuild).lines()))
    return 0


#: How `cbir query` names a quarter-turned query (Candidate.turned: turns anticlockwise).
TURNED = {1: "90\u00b0 anticlockwise", 2: "180\u00b0", 3: "90\u00b0 clockwise"}


def cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    from .progress import bar
    from .safetext import printable as shown  # a name's line breaks would forge result lines
    from .steps.query import QUERY_BATCH, Querier, QueryTable, query_files

    _check_range("--k", args.k, 1, MAX_K)
    files = query_files([Path(p) for p in args.images], settings.ingest.ignore)
    if not files:
        raise CbirError(f"no files to query in {', '.join(map(shown, args.images))}")
    table = QueryTable(settings, args.csv) if args.csv else None
    ask = Querier(settings)
    th = ask.threshold
    turned = (
        "; found with the query turned, only if confirmed (`cbir pairs` searches upright "
        "pictures only)"
        if settings.search.query_turns
        else ""
    )
    print(
        f"pair threshold {th[0]:.4f} ({th[1]}): * marks a near-duplicate as `cbir pairs` "
        f"counts one (at or above the threshold, or confirmed by local features){turned}"
        if th is not None
        else "no pair threshold for this model yet (`cbir calibrate`): * marks only the "
        "neighbours local features confirm"
    )
    failed: list[str] = []
    verdicts: dict[str, int] = {}
    progress = bar(len(files), "query", "file", _progress_wanted() and len(files) > QUERY_BATCH)
    for start in range(0, len(files), QUERY_BATCH):
        batch = files[start : start + QUERY_BATCH]
        for f, res in zip(batch, ask([f.path for f in batch], k=args.k), strict=True):
            verdicts[res.verdict] = verdicts.get(res.verdict, 0) + 1
            if table is not None:
                table.add(res)
            if res.error and not (f.in_folder and res.not_image):
                failed.append(f"{shown(res.query)}: {shown(res.error)}")
            if table is None:
                _print_query(res, shown)
        progress.update(len(batch))
    progress.close()
    if table is not None or len(files) > 1:
        written = shown(str(table.write())) if table is not None else None
        print(_query_summary(len(files), verdicts, written))
    if failed:
        print(
            f"cbir query: error: {len(failed)} of {counted(len(files), 'file')} could not be "
            f"queried ({failed[0]}{'; ...' if len(failed) > 1 else ''})",
            file=sys.stderr,
        )
        return 2
    return 0


def _print_query(res: Any, shown: Callable[[str], str]) -> None:
    """One query's lines: the file, what it is in the collection, its neighbours."""
    from .steps.query import describe

    print(shown(res.query))
    if res.error:
        print(f"  {shown(res.error)}")
        return
    for path in res.exact_copies_of:
        if path == res.itself:
            print(f"  in the collection as {shown(path)}")
        else:
            print(f"  exact duplicate (same bytes) of {shown(path)}")
    checks = res.verification + [None] * (len(res.neighbours) - len(res.verification))
    found = []
    for c in res.candidates:
        by = c.found_by + (f", {c.votes} keypoint votes" if c.votes else "")
        parts = [f"found by {by}"] if by != "global" else []
        if c.turned:  # search.query_turns: a print scanned sideways or upside down
            parts.append(f"the query turned {TURNED[c.turned]}")
        found.append("; ".join(parts))
    found += [""] * (len(res.neighbours) - len(found))
    for rank, ((image_id, path, score), m, by) in enumerate(
        zip(res.neighbours, checks, found, strict=True), start=1
    ):
        via = f"  ({by})" if by else ""
        # one line per neighbour (scripts count and grep them): its verification follows
        check = f"  \u2014 {describe(m, 'it')}" if m is not None else ""
        mark = "*" if res.near(rank - 1) else " "
        print(f"  {rank:3d}{mark} {score:.4f}  {shown(path)}  [{image_id}]{via}{check}")


def _query_summary(total: int, verdicts: dict[str, int], table: str | None) -> str:
    """`cbir query`'s last line over many files: how many of each verdict, and the table
    written (its path as printed)."""
    from .steps.query import VERDICTS

    said = {
        "in the collection": ("already in the collection", "already in the collection"),
        "exact copy": ("exact copy of a collection image", "exact copies of collection images"),
        "near-duplicate": ("with a near-duplicate", "with a near-duplicate"),
        "no match": ("with none", "with none"),
        "not an image": ("not an image (skipped)", "not images (skipped)"),
        "error": ("unreadable", "unreadable"),
    }
    parts = [counted(verdicts[v], *said[v]) for v in VERDICTS if verdicts.get(v)]
    where = f"; table: {table}" if table is not None else ""
    return f"query: {counted(total, 'file')}: {', '.join(parts)}{where}"


def cmd_pairs(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.pairs import run_pairs

    print("\n".join(run_pairs(settings, progress=_progress_wanted()).lines()))
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.evaluate import run_evaluate

    progress = _progress_wanted()  # notes and bars on a terminal; logs keep the summary only
    print(
        "\n".join(
            run_evaluate(settings, progress=progress, log=_note if progress else None).lines()
        )
    )
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.train import run_train

    _check_range("--max-epochs", args.max_epochs, 1, 100_000)
    summary = run_train(
        settings, resume=args.resume, progress=_progress_wanted(), max_epochs=args.max_epochs
    )
    print("\n".join(summary.lines()))
    return 0


def cmd_augment_preview(settings: Settings, args: argparse.Namespace) -> int:
    from .augment import preview_grid
    from .imaging import ImageRejected, load_rgb

    _check_range("--n", args.n, 1, 64)
    _check_range("--resolution", args.resolution, 32, MAX_SIDE)
    _check_range("--seed", args.seed, 0, 2**31 - 2)
    try:
        img = load_rgb(
            args.image,
            max(512, 2 * settings.train.resolution),
            max_pixels=settings.ingest.max_pixels,
        )
    except (ImageRejected, OSError) as exc:
        reason = exc.reason if isinstance(exc, ImageRejected) else (exc.strerror or exc)
        raise CbirError(f"cannot read {args.image}: {reason}") from None
    strategies = [args.strategy] if args.strategy else list(STRATEGIES)
    grid = preview_grid(
        img,
        strategies=strategies,
        n=args.n,
        resolution=args.resolution or settings.train.resolution,
        seed=args.seed,
    )
    out = Path(args.out) if args.out else _layout(settings).preview(Path(args.image))
    from .fsutil import atomic_path
    from .store.outputs import check_free

    check_free(settings, "--out", out)

    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    print(f"augment preview ({', '.join(strategies)}; {args.n} views each): {out}")
    return 0


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.report import run_report

    print("\n".join(run_report(settings, progress=_progress_wanted()).lines()))
    return 0


def cmd_calibrate(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.calibrate import run_calibrate

    print(
        "\n".join(
            run_calibrate(
                settings, precision=args.precision, write=args.write, progress=_progress_wanted()
            ).lines()
        )
    )
    return 0


def cmd_init(settings: Settings | None, args: argparse.Namespace) -> int:
    from .workspace import init_workspace

    summary = init_workspace(args.folder, args.scans, args.ground_truth, force=args.force)
    print("\n".join(summary.lines()))
    return 0


def cmd_find_duplicates(settings: Settings | None, args: argparse.Namespace) -> int:
    from .find import find_duplicates

    summary = find_duplicates(
        args.scans,
        args.out,
        train=not args.no_train,
        accept_missing=args.accept_missing,
        progress=_progress_wanted(),
        log=print,
    )
    print("\n".join(["", *summary.final_lines()]))
    return 0


def _flow_result(state: Any, what: str, log: Path | None = None) -> Any:
    """A flow run's result; a failed run becomes one line with its cause (the log has more)."""
    if not state.is_completed():
        where = f" (log: {log})" if log else ""
        cause = str(state.message)
        with contextlib.suppress(Exception):  # a result that cannot be read: the state's words
            raised = state.result(raise_on_failure=False)
            if isinstance(raised, CbirError):  # cbir's own words, not Prefect's framing of them
                cause = str(raised)
        raise CbirError(f"the {what} flow run failed: {' '.join(cause.split())}{where}")
    return state.result()


def _run_flow(settings: Settings, what: str, load: Callable[[], Any], **params: Any) -> Any:
    """Run a Prefect flow for `cbir build` / `cbir nightly` and return its result.

    Without a configured PREFECT_API_URL a temporary API server starts first and comes up while
    `load` imports the flow (Prefect, torch); see flows/server.py. Any failure is one line.
    """
    from flows.server import flow_api  # Prefect lives in flows/ and tasks/, never in cbir/

    with flow_api(settings, what) as api:
        flow = load()
        _raise_if_interrupted()  # a Ctrl-C that the imports swallowed still stops the command
        state = api.run(flow, str(settings.params_path), **params)
        _raise_if_interrupted()  # and one that the flow run turned into a state
        return _flow_result(state, what, api.log)


def cmd_build(settings: Settings, args: argparse.Namespace) -> int:
    def load() -> Any:
        from flows.build import build

        return build

    result = _run_flow(
        settings,
        "build",
        load,
        train=not args.no_train,
        rebuild_index=args.rebuild_index,
        accept_missing=args.accept_missing,
    )
    print("\n".join(result.lines()))
    return 0


def cmd_nightly(settings: Settings, args: argparse.Namespace) -> int:
    def load() -> Any:
        from flows.nightly import nightly

        return nightly

    flow = _run_flow(settings, "nightly", load, accept_missing=args.accept_missing)
    print("\n".join(flow.lines()))
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:

    os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client analytics, before its import
    from flows.server import served_api

    served_api()  # no server, or none answering: one line, before the flow's heavy imports
    from flows.nightly import serve

    serve(str(settings.params_path), name=args.name)
    return 0


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    from .store.catalog import query_page

    limit = (
        args.limit if args.limit is not None else (0 if args.format != "table" else SQL_TABLE_LIMIT)
    )
    if limit < 0:
        raise CbirError(f"--limit must be 0 (all rows) or more, got {limit}")
    cols, rows, total = query_page(settings, args.query, args.param, limit or None)
    if args.format == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    elif args.format == "json":
        import json

        print(
            json.dumps(
                [dict(zip(cols, row, strict=True)) for row in rows],
                default=str,
                indent=1,
                ensure_ascii=False,
            )
        )
    else:
        print(_format_table(cols, rows))
    if total > len(rows):
        print(
            f"({total - len(rows)} more rows not shown: --limit N, or --limit 0 for all)",
            file=sys.stderr if args.format != "table" else sys.stdout,
        )
    return 0


SQL_TABLE_LIMIT = 100  # rows `cbir sql` shows as a table unless --limit says otherwise


# --------------------------------------------------------------------------- decisions (issue 14)


def cmd_decide(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.decisions import run_decide, run_undo

    if args.word:  # `cbir decide A B different`, as people say it
        if args.undo or args.verdict not in (None, args.word):
            other = "--undo" if args.undo else f"--{args.verdict}"
            raise CbirError(f"two decisions given ({args.word} and {other}): give one")
        args.verdict = args.word
    if args.undo:
        if args.master is not None or args.note:
            raise CbirError("--undo withdraws the current decision: give no --master or --note")
        print("\n".join(run_undo(settings, args.a, args.b, reviewer=args.reviewer).lines()))
        return 0
    if not args.verdict:
        raise CbirError("say what the pair is: --same, --different or --unsure (or --undo)")
    summary = run_decide(
        settings,
        args.a,
        args.b,
        args.verdict,
        master=args.master,
        note=args.note,
        reviewer=args.reviewer,
    )
    print("\n".join(summary.lines()))
    return 0


def cmd_decisions_import(settings: Settings, args: argparse.Namespace) -> int:
    from .safetext import printable
    from .steps.decisions import ImportRefused, import_decisions

    try:
        summary = import_decisions(settings, args.file, reviewer=args.reviewer)
    except ImportRefused as exc:  # one line per bad row, then the verdict
        for line in exc.problems:
            print(f"cbir decisions: {printable(line)}", file=sys.stderr)
        raise
    print("\n".join(summary.lines()))
    return 0


def cmd_decisions_export(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.decisions import export_decisions

    print("\n".join(export_decisions(settings, args.file, history=args.history).lines()))
    return 0


def cmd_decisions_compact(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.decisions import run_compact

    print("\n".join(run_compact(settings, everything=args.all).lines()))
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from .steps.decisions import remove_list

    print("\n".join(remove_list(settings, args.remove_list).lines()))
    return 0


def _decision_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """`decide`, `decisions import|export|compact` and `export --remove-list`."""
    p = sub.add_parser(
        "decide", parents=[common], help="record a reviewer's decision on a pair of images"
    )
    p.add_argument("a", metavar="A", help="an image: its path (as in the manifest) or its id")
    p.add_argument("b", metavar="B", help="the other image")
    p.add_argument(
        "word",
        nargs="?",
        choices=("same", "different", "unsure"),
        metavar="DECISION",
        help="same, different or unsure: as the option of that name",
    )
    verdict = p.add_mutually_exclusive_group()
    for name in ("same", "different", "unsure"):
        verdict.add_argument(
            f"--{name}", dest="verdict", action="store_const", const=name, help=f"a {name!r} pair"
        )
    verdict.add_argument("--undo", action="store_true", help="withdraw the pair's current decision")
    p.add_argument("--master", metavar="A|B", help="with --same: the one to keep")
    p.add_argument("--note", default="", metavar="TEXT", help="why (kept with the decision)")
    p.add_argument("--reviewer", metavar="NAME", help="who decided (default: the user name)")
    p.set_defaults(handler=cmd_decide)

    p = sub.add_parser("decisions", help="import, export or compact the reviewers' decisions")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser(
        "import", parents=[common], help="record the decisions of a CSV, all or nothing"
    )
    a.add_argument(
        "file", metavar="FILE.csv", help="columns path_a,path_b,decision[,master,note,reviewer]"
    )
    a.add_argument("--reviewer", metavar="NAME", help="for rows without a reviewer")
    a.set_defaults(handler=cmd_decisions_import)
    a = actions.add_parser("export", parents=[common], help="write the decisions to a CSV")
    a.add_argument("file", metavar="FILE.csv")
    a.add_argument(
        "--history", action="store_true", help="every row of the log, undos too (for audits)"
    )
    a.set_defaults(handler=cmd_decisions_export)
    a = actions.add_parser(
        "compact", parents=[common], help="merge the log's part files (when there are many)"
    )
    a.add_argument("--all", action="store_true", help="merge however few there are")
    a.set_defaults(handler=cmd_decisions_compact)

    p = sub.add_parser(
        "export", parents=[common], help="what to remove: the confirmed duplicates as a CSV"
    )
    p.add_argument(
        "--remove-list",
        required=True,
        metavar="FILE.csv",
        help="one row per file to remove (columns remove,keep,reason,group)",
    )
    p.set_defaults(handler=cmd_export)


# --------------------------------------------------------------------------- review (issue 14)


def cmd_review(settings: Settings, args: argparse.Namespace) -> int:
    from .review.app import serve

    host = args.host if args.host is not None else settings.review.host
    port = args.port if args.port is not None else settings.review.port
    _check_range("--port", port, 0, 65535)
    reviewer = args.reviewer if args.reviewer is not None else _default_reviewer()
    if len(reviewer) > 200 or not reviewer.isprintable():
        raise CbirError("--reviewer must be at most 200 printable characters")
    serve(settings, host, port, reviewer)
    return 0


def _default_reviewer() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        return ""


def _format_table(cols: list[str], rows: list[tuple]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()

    out = [line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    out.append(f"({counted(len(rows), 'row')})")
    return "\n".join(out)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # 6 digits: a FLOAT read as a double shows 0.9980000257492065
        text = f"{value:.6g}"
        return text if any(c in text for c in ".en") else text + ".0"
    from .safetext import printable

    return printable(value)  # on one line: a name's line break would forge a row


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params",
        default=DEFAULT_PARAMS,
        metavar="PATH",
        help="params file; relative paths in it resolve against its folder (default: %(default)s)",
    )
    parser = argparse.ArgumentParser(
        prog="cbir",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Near-duplicate image retrieval for heritage photograph collections.",
        epilog="Start with `cbir init DIR --scans PATH` (a workspace; then `dvc repro` in it), "
        "or\n`cbir find-duplicates SCANS_DIR` (everything in one command).\n"
        "`cbir COMMAND --help` describes each command, with an example.",
    )
    parser.add_argument("--version", action="version", version=f"cbir {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "ingest",
        parents=[common],
        help="add new scans from data.scans_dir to the deduplicated manifest",
    )
    _accept_missing_option(p)
    p.set_defaults(handler=cmd_ingest)

    p = sub.add_parser(
        "demo-data", parents=[common], help="write the deterministic synthetic demo collection"
    )
    p.add_argument("out", nargs="?", help="output folder (default: demo.out_dir in params)")
    p.set_defaults(handler=cmd_demo_data)

    p = sub.add_parser(
        "embed",
        parents=[common],
        help="embed canonical images that have no embedding for the current model",
    )
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser(
        "index", parents=[common], help="build or update the FAISS index of the current embeddings"
    )
    p.add_argument("--rebuild", action="store_true", help="retrain from scratch")
    p.set_defaults(handler=cmd_index)

    p = sub.add_parser("query", parents=[common], help="near-duplicates of image files")
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="an image file, or a folder: every file under it"
    )
    p.add_argument("--k", type=int, default=10, help="neighbours to show (default %(default)s)")
    p.add_argument(
        "--csv",
        metavar="FILE.csv",
        help="write every file's neighbours to FILE.csv (a row each, with the file's verdict) "
        "and print only the summary",
    )
    p.set_defaults(handler=cmd_query)

    p = sub.add_parser(
        "pairs",
        parents=[common],
        help="all near-duplicate pairs and clusters, to Parquet and DuckDB",
    )
    p.set_defaults(handler=cmd_pairs)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="Precision/Recall/F1/mAP@K against data.ground_truth, with baselines",
    )
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "train",
        parents=[common],
        help="SimCLR training on the collection (checkpoint to model.checkpoint)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue a killed run from its last epoch checkpoint"
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        metavar="N",
        help="stop after N epochs in all (the schedule still spans train.epochs)",
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "augment-preview",
        parents=[common],
        help="a grid of augmented views of IMAGE for each strategy",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--strategy", choices=STRATEGIES, help="only this strategy")
    p.add_argument("--n", type=int, default=8, help="views per strategy (default %(default)s)")
    p.add_argument("--resolution", type=int, help="view size (default train.resolution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG to write (default data/reports/augment-preview-NAME.png)")
    p.set_defaults(handler=cmd_augment_preview)

    p = sub.add_parser(
        "report",
        parents=[common],
        help="HTML review gallery (pairs, clusters, evaluation) and plots",
    )
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "calibrate",
        parents=[common],
        help="choose the pair threshold that reaches a target precision (on the "
        "ground truth, else self-calibrated on held-out copies)",
    )
    p.add_argument(
        "--precision",
        type=float,
        metavar="P",
        help="target precision (default search.precision_target, 0.95)",
    )
    p.add_argument(
        "--write",
        action="store_true",
        help="also write the calibrated value into the params file as a fixed "
        "search.pair_threshold (comments are kept)",
    )
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser(
        "build",
        parents=[common],
        help="the whole pipeline as a Prefect flow (ingest, train, embed, index, "
        "pairs, evaluate, report; then dvc commit)",
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="skip training: embed with the existing checkpoint or model.init",
    )
    p.add_argument("--rebuild-index", action="store_true", help="retrain the FAISS index")
    _accept_missing_option(p)
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser(
        "nightly",
        parents=[common],
        help="re-index the scans that arrived since the last run, once (the scheduled flow)",
    )
    _accept_missing_option(p)
    p.set_defaults(handler=cmd_nightly)

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the nightly flow on orchestration.nightly_cron (blocks; needs a Prefect server)",
    )
    p.add_argument("--name", default="cbir-nightly", help="deployment name (default %(default)s)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "sql", parents=[common], help="run one SQL query on the DuckDB catalogue (read only)"
    )
    p.add_argument("query", help="SQL; put user values in as ? placeholders")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="VALUE",
        help="a value for the next ? placeholder (repeatable)",
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"rows to print (default {SQL_TABLE_LIMIT} as a table, all as csv/json; 0 = all)",
    )
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table for people (default), csv or json for scripts",
    )
    p.set_defaults(handler=cmd_sql)

    p = sub.add_parser(
        "review",
        parents=[common],
        help="review pairs in the browser: decide same/different, split clusters",
    )
    p.add_argument(
        "--host",
        help="address to listen on (default review.host, 127.0.0.1; any other needs the "
        "printed token)",
    )
    p.add_argument("--port", type=int, help="port (default review.port, 8765; 0 picks a free one)")
    p.add_argument(
        "--reviewer",
        metavar="NAME",
        help="who decides, recorded with each decision (default: your user name)",
    )
    p.set_defaults(handler=cmd_review)

    p = sub.add_parser("init", help="create an archive workspace for a folder of scans")
    p.add_argument("folder", metavar="DIR", help="the workspace folder (created if absent)")
    p.add_argument(
        "--scans",
        required=True,
        metavar="PATH",
        help="the folder of scans (read only: cbir never writes there)",
    )
    p.add_argument(
        "--ground-truth",
        metavar="CSV",
        help="path,group CSV of labelled near-duplicates, if there is one "
        "(else an empty labels.csv is made)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="update an existing workspace (its data and its other params are kept)",
    )
    p.set_defaults(handler=cmd_init, no_params=True)

    p = sub.add_parser(
        "find-duplicates", help="every near-duplicate in a folder of scans, in one command"
    )
    p.add_argument("scans", metavar="SCANS_DIR")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="the workspace (default: SCANS_DIR's name + '-cbir' in this folder); "
        "an existing one for the same scans is reused",
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="skip training (faster, but the untrained model finds fewer copies)",
    )
    _accept_missing_option(p)
    p.set_defaults(handler=cmd_find_duplicates, no_params=True)

    _decision_parsers(sub, common)
    _describe(sub)
    return parser


def _accept_missing_option(p: argparse.ArgumentParser) -> None:
    """The option of every command that ingests (run_ingest's accept_missing)."""
    p.add_argument(
        "--accept-missing",
        action="store_true",
        help="record scans gone from the scans folder as missing even where most of them are "
        "(without it such a run changes nothing: an unmounted drive or share looks so)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cbir")
    except PackageNotFoundError:
        return "unknown (not installed)"


#: What each subcommand does, at more length than its one-line help, and an example.
# Where the flows of `build` and `nightly` report (flows/server.py).
FLOW_API = (
    "\n\nThe flow run reports to the Prefect API at PREFECT_API_URL when one is "
    "configured; otherwise to a temporary local Prefect server started for the command, "
    "whose database and logs stay in <data folder>/prefect/ (the run's log: "
    "<data folder>/prefect/<command>.log)."
)
DETAILS: dict[str, tuple[str, str]] = {
    "init": (
        "Create a self-contained workspace: params.yaml pointing at the scans (which are "
        "only read), dvc.yaml with the pipeline, a labels file, a README, git and DVC. "
        "Refused when DIR lies inside the scans, when the scans lie inside DIR/data, and "
        "on an existing workspace (unless --force).",
        "cbir init ~/archive-ws --scans /mnt/scans/photo-archive\ncd ~/archive-ws && dvc repro",
    ),
    "find-duplicates": (
        "Make (or reuse) a workspace for SCANS_DIR and run every step with the "
        "defaults: ingest, train, embed, index, calibrate, pairs, report. "
        "Prints where the gallery and the pair table are.",
        "cbir find-duplicates /mnt/scans/photo-archive --out ~/archive-ws",
    ),
    "ingest": (
        "Walk data.scans_dir, decode new or changed files, and record every file in the "
        "deduplicated manifest (byte-identical copies are found by hash). Unchanged "
        "files are not read again.",
        "cbir ingest --params ~/archive-ws/params.yaml",
    ),
    "demo-data": (
        "Write the deterministic synthetic demo collection: scans/ and ground_truth.csv under OUT.",
        "cbir demo-data /tmp/demo",
    ),
    "embed": (
        "Compute the descriptor of every canonical image that has none for the current "
        "model, in resumable shards.",
        "cbir embed",
    ),
    "index": (
        "Build the FAISS index of the current embeddings, or add the new ones to it.",
        "cbir index --rebuild",
    ),
    "query": (
        "The nearest images in the collection of any image files, or of every file under "
        "a folder (a donation: which of its files does the collection hold already?); "
        "exits with status 2 when a file cannot be read. With search.verify, the top "
        "search.verify_top are checked with local features and the confirmed ones come "
        "first, each with what it is (the same picture, or a detail of it: the share it "
        "covers, and where).",
        "cbir query scan-0042.jpg other.tif --k 5\ncbir query ~/donation --csv donation.csv",
    ),
    "calibrate": (
        "Choose the pair threshold that reaches search.precision_target: on the "
        "labelled images of data.ground_truth where there are any, else on held-out "
        "synthetic copies of the collection's own images (both are shown); records "
        "data/reports/calibration.json.",
        "cbir calibrate --precision 0.98",
    ),
    "pairs": (
        "Every near-duplicate pair and the clusters they form, into Parquet and the "
        "DuckDB catalogue (calibrates the threshold first when it is `auto` and not yet "
        "calibrated for this model).",
        "cbir pairs",
    ),
    "evaluate": (
        "Precision, recall, F1 and mAP at K against the labelled images of "
        "data.ground_truth and the reviewers' decisions, with the untrained backbone and "
        "perceptual hashing as baselines.",
        "cbir evaluate",
    ),
    "train": (
        "Self-supervised SimCLR fine-tuning of the descriptor on the collection itself "
        "(checkpoint to model.checkpoint).",
        "cbir train --resume",
    ),
    "augment-preview": (
        "A grid of augmented training views of IMAGE, one row per strategy.",
        "cbir augment-preview scan.jpg --n 6",
    ),
    "report": (
        "The static review gallery (pairs, clusters, evaluation) and plots under data/reports/.",
        "cbir report && xdg-open data/reports/gallery/index.html",
    ),
    "build": (
        "The whole pipeline as one Prefect flow, then `dvc commit`." + FLOW_API,
        "cbir build --no-train",
    ),
    "nightly": (
        "Re-index the scans that arrived since the last run: ingest, embed, index and "
        "search only the new ones, report their new pairs, `dvc commit`." + FLOW_API,
        "cbir nightly --params ~/archive-ws/params.yaml",
    ),
    "serve": (
        "Run the nightly flow on orchestration.nightly_cron until stopped. The schedule "
        "lives in a Prefect server that keeps running: start one with `prefect server "
        "start` and point PREFECT_API_URL at it (`prefect config set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api`); without one, or when it does not "
        "answer, serve stops with one line saying so.",
        "cbir serve",
    ),
    "review": (
        "Serve the review screen on a local web server and print its URL: pairs new in the "
        "latest runs and nearest the threshold first, decided with one key each (s same, d "
        "different, u unsure, m the other is the master, n skip, z undo), filters, and a "
        "cluster view to split clusters. Decisions go to data.decisions_dir. Bound to "
        "anything but 127.0.0.1 it needs a token (CBIR_REVIEW_TOKEN, or one printed at "
        "start). Ctrl-C stops it.",
        "cbir review\nxdg-open 'http://127.0.0.1:8765/?run=3'",
    ),
    "sql": (
        "One read-only SQL query on the catalogue (views images, files, duplicate_pairs, "
        "clusters, pair_report, new_pairs, cluster_report, quarantine, ingest_runs, "
        "decisions, decision_log).",
        'cbir sql "SELECT path_a, path_b, round(score, 3) AS score FROM duplicate_pairs '
        'ORDER BY score DESC" --limit 20\ncbir sql "SELECT * FROM pair_report WHERE ? IN '
        '(path_a, path_b)" --param box-01/scan-1.jpg --format csv',
    ),
    "decide": (
        "Record a decision on two images (paths relative to the scans folder, absolute "
        "paths inside it, or image ids): the same photograph (with --master, the one to "
        "keep), different, or unsure; --undo withdraws the pair's current decision. "
        "Decisions leave new_pairs and the nightly report, steer the clusters of `cbir "
        "pairs`, and label `cbir evaluate` and `cbir calibrate`.",
        "cbir decide box-01/scan-1.jpg box-07/scan-1-copy.tif --same --master "
        "box-01/scan-1.jpg\ncbir decide box-01/scan-1.jpg box-07/scan-1-copy.tif --undo",
    ),
    "decisions": (
        "Import decisions from a CSV (path_a,path_b,decision[,master,note,reviewer]; every "
        "row is checked first, and one bad row imports nothing), export them to a CSV "
        "(the current ones, or the whole log with --history), or compact the log.",
        "cbir decisions import reviewed.csv\ncbir decisions export decisions.csv",
    ),
    "export": (
        "The remove list: for each group of images confirmed the same by reviewers, the "
        "master to keep (the one a reviewer named, else the likely master) and the files "
        "to remove, with byte-identical copies; one row per file to remove. Nothing is "
        "deleted or moved.",
        "cbir export --remove-list to-remove.csv",
    ),
}


def _describe(sub: Any) -> None:
    for name, parser in sub.choices.items():
        description, example = DETAILS.get(name, ("", ""))
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.description = description or None
        if example:
            parser.epilog = "example:\n" + "\n".join(f"  {line}" for line in example.splitlines())


# Subcommands that write to the data folder hold its writer lock while they run (cbir/lock.py);
# `build` and `nightly` take it inside their flows, `serve` in each run it starts.
WRITERS = frozenset(
    {"ingest", "train", "embed", "index", "calibrate", "pairs", "evaluate", "report"}
)


def _writer_lock(settings: Settings, args: argparse.Namespace) -> Any:
    if args.command not in WRITERS:
        return contextlib.nullcontext()
    from .lock import writer_lock

    return writer_lock(settings, f"cbir {args.command} --params {settings.params_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every line it prints has its control characters escaped (a scan's name
    cannot drive the terminal: cbir/safetext.py)."""
    from .safetext import escaped_output

    try:
        with escaped_output(), _remembered_sigint():
            return _main(argv)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # `cbir query ... | head`: the reader has what it wanted. Quiet, as a tool that SIGPIPE
        # ends, with its status; stdout goes nowhere, so the flush at exit raises no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll says POLLERR)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _remembered_sigint() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered (`_on_sigint`), for the
    command; the handler before it is put back afterwards (cbir may run inside a program)."""
    before = signal.getsignal(signal.SIGINT)
    install = (
        threading.current_thread() is threading.main_thread()
        and before is signal.default_int_handler  # not where SIGINT is ignored (a background job)
    )
    if install:
        _INTERRUPTED.clear()
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGINT, before)


_INTERRUPTED = threading.Event()


def _on_sigint(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C (KeyboardInterrupt), remembered: code that catches every exception
    (some libraries do, while they are imported) would otherwise make it disappear."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _raise_if_interrupted() -> None:
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _load_settings(params: str) -> Settings:
    """The params file; where the default one is missing and a workspace lies in a subfolder
    (find-duplicates makes SCANS-cbir beside the scans), the error names it."""
    try:
        return load_settings(params)
    except ConfigError:
        if params != DEFAULT_PARAMS or os.path.lexists(params):
            raise
        from .workspace import workspaces_in

        found = [p.name for p in workspaces_in(Path.cwd())]
        if not found:
            raise
        also = f" (also here: {', '.join(found[1:3])}{', ...' if len(found) > 3 else ''})"
        raise ConfigError(
            f"no params.yaml in {Path.cwd()}: run cbir inside a workspace, e.g. "
            f"`cd {found[0]}` first or `--params {found[0]}/{DEFAULT_PARAMS}`"
            f"{also if len(found) > 1 else ''}"
        ) from None


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "no_params", False):  # init, find-duplicates: they make the params
            return int(args.handler(None, args) or 0)
        settings = _load_settings(args.params)
        from .environ import confined

        # caches and Prefect's state in the workspace, not in the user's home; no analytics
        with confined(settings), _writer_lock(settings, args):
            return int(args.handler(settings, args) or 0)
    except CbirError as exc:
        from .safetext import printable

        print(f"cbir {args.command}: error: {printable(exc)}", file=sys.stderr)  # one line
        return 2
    except OSError as exc:
        from .fsutil import disk_full, is_disk_full

        if not is_disk_full(exc):
            raise
        # Outputs' own writes raise fsutil.DiskFull (a CbirError, above); this catches the
        # other writes (the lock file, a folder).
        print(f"cbir {args.command}: error: {disk_full(exc.filename)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbir {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
