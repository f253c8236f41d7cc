"""The `cbir` command line. Each subcommand reads its settings from --params and calls the library.

dvc.yaml stages and the Prefect tasks call the same library functions as these subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import DEFAULT_PARAMS, Settings, load_settings
from .errors import CbirError

Handler = Callable[[Settings, argparse.Namespace], int | None]
_COMMANDS: dict[str, Handler] = {}


def _progress_wanted() -> bool:
    return sys.stderr.isatty()


# --------------------------------------------------------------------------- subcommands

def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from .ingest import run_ingest

    summary = run_ingest(settings, progress=_progress_wanted())
    print("\n".join(summary.lines()))
    return 0


def cmd_demo_data(settings: Settings, args: argparse.Namespace) -> int:
    from .demo import generate_demo_collection

    d = settings.demo
    out = Path(args.out) if args.out else settings.path(d.out_dir)
    summary = generate_demo_collection(out, n_groups=d.n_groups, n_distractors=d.n_distractors,
                                       max_copies=d.max_copies, size=d.size, seed=d.seed,
                                       progress=_progress_wanted())
    print(f"demo collection: {summary.n_images} images ({summary.n_groups} groups of "
          f"near-duplicates, {summary.n_distractors} distractors) in {out}")
    print(f"ground truth: {summary.ground_truth}")
    return 0


def cmd_embed(settings: Settings, args: argparse.Namespace) -> int:
    from .embed import run_embed

    print("\n".join(run_embed(settings, progress=_progress_wanted()).lines()))
    return 0


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    from .index import run_index

    print("\n".join(run_index(settings, rebuild=args.rebuild).lines()))
    return 0


def cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    from .search import query_images

    for res in query_images(settings, [Path(p) for p in args.images], k=args.k):
        print(res.query)
        if res.error:
            print(f"  cannot be read: {res.error}")
            continue
        for path in res.exact_copies_of:
            print(f"  exact duplicate (same bytes) of {path}")
        for rank, (image_id, path, score) in enumerate(res.neighbours, start=1):
            print(f"  {rank:3d}  {score:.4f}  {path}  [{image_id}]")
    return 0


def cmd_pairs(settings: Settings, args: argparse.Namespace) -> int:
    from .search import run_pairs

    print("\n".join(run_pairs(settings).lines()))
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from .evaluate import run_evaluate

    print("\n".join(run_evaluate(settings, progress=_progress_wanted()).lines()))
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from .train import run_train

    summary = run_train(settings, resume=args.resume, progress=_progress_wanted(),
                        max_epochs=args.max_epochs)
    print("\n".join(summary.lines()))
    return 0


def cmd_augment_preview(settings: Settings, args: argparse.Namespace) -> int:
    from .augment import STRATEGIES, preview_grid
    from .imaging import ImageRejected, load_rgb

    try:
        img = load_rgb(args.image, max(512, 2 * settings.train.resolution))
    except (ImageRejected, OSError) as exc:
        reason = exc.reason if isinstance(exc, ImageRejected) else exc
        raise CbirError(f"cannot read {args.image}: {reason}") from None
    strategies = [args.strategy] if args.strategy else list(STRATEGIES)
    grid = preview_grid(img, strategies=strategies, n=args.n,
                        resolution=args.resolution or settings.train.resolution, seed=args.seed)
    out = Path(args.out) if args.out else \
        settings.path(settings.data.reports_dir) / f"augment-preview-{Path(args.image).stem}.png"
    from .fsutil import atomic_path

    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    print(f"augment preview ({', '.join(strategies)}; {args.n} views each): {out}")
    return 0


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from .report import run_report

    print("\n".join(run_report(settings, progress=_progress_wanted()).lines()))
    return 0


def cmd_calibrate(settings: Settings, args: argparse.Namespace) -> int:
    from .calibrate import run_calibrate

    print("\n".join(run_calibrate(settings, precision=args.precision, write=args.write).lines()))
    return 0


def _flow_result(state: Any, what: str) -> Any:
    """A flow run's result; a failed run becomes one line with its cause (the log has more)."""
    if not state.is_completed():
        raise CbirError(f"the {what} flow run failed: {state.message}")
    return state.result()


def cmd_build(settings: Settings, args: argparse.Namespace) -> int:
    from flows.build import build  # Prefect lives in flows/ and tasks/, never in cbir/

    state = build(str(settings.params_path), train=not args.no_train,
                  rebuild_index=args.rebuild_index, return_state=True)
    print("\n".join(_flow_result(state, "build").lines()))
    return 0


def cmd_nightly(settings: Settings, args: argparse.Namespace) -> int:
    from flows.nightly import nightly

    state = nightly(str(settings.params_path), return_state=True)
    print("\n".join(_flow_result(state, "nightly").lines()))
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from flows.nightly import serve

    serve(str(settings.params_path), name=args.name)
    return 0


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    from .catalog import query

    cols, rows = query(settings, args.query, args.param)
    print(_format_table(cols, rows))
    return 0


def _format_table(cols: list[str], rows: list[tuple]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=DEFAULT_PARAMS, metavar="PATH",
                        help="params file; relative paths in it resolve against its folder "
                             "(default: %(default)s)")
    parser = argparse.ArgumentParser(
        prog="cbir",
        description="Near-duplicate image retrieval for heritage photograph collections.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ingest", parents=[common],
                       help="add new scans from data.scans_dir to the deduplicated manifest")
    p.set_defaults(handler=cmd_ingest)

    p = sub.add_parser("demo-data", parents=[common],
                       help="write the deterministic synthetic demo collection")
    p.add_argument("out", nargs="?", help="output folder (default: demo.out_dir in params)")
    p.set_defaults(handler=cmd_demo_data)

    p = sub.add_parser("embed", parents=[common],
                       help="embed canonical images that have no embedding for the current model")
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser("index", parents=[common],
                       help="build or update the FAISS index of the current embeddings")
    p.add_argument("--rebuild", action="store_true", help="retrain from scratch")
    p.set_defaults(handler=cmd_index)

    p = sub.add_parser("query", parents=[common], help="near-duplicates of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--k", type=int, default=10, help="neighbours to show (default %(default)s)")
    p.set_defaults(handler=cmd_query)

    p = sub.add_parser("pairs", parents=[common],
                       help="all near-duplicate pairs and clusters, to Parquet and DuckDB")
    p.set_defaults(handler=cmd_pairs)

    p = sub.add_parser("evaluate", parents=[common],
                       help="Precision/Recall/F1/mAP@K against data.ground_truth, with baselines")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("train", parents=[common],
                       help="SimCLR training on the collection (checkpoint to model.checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last epoch checkpoint")
    p.add_argument("--max-epochs", type=int, metavar="N",
                   help="stop after N epochs in all (the schedule still spans train.epochs)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("augment-preview", parents=[common],
                       help="a grid of augmented views of IMAGE for each strategy")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--strategy", choices=["simclr", "heritage"], help="only this strategy")
    p.add_argument("--n", type=int, default=8, help="views per strategy (default %(default)s)")
    p.add_argument("--resolution", type=int, help="view size (default train.resolution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG to write (default data/reports/augment-preview-NAME.png)")
    p.set_defaults(handler=cmd_augment_preview)

    p = sub.add_parser("report", parents=[common],
                       help="HTML review gallery (pairs, clusters, evaluation) and plots")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("calibrate", parents=[common],
                       help="the pair score threshold that reaches a precision on the ground truth")
    p.add_argument("--precision", type=float, metavar="P",
                   help="target precision (default evaluate.precision_target, 0.9)")
    p.add_argument("--write", action="store_true",
                   help="set search.pair_threshold in the params file (comments are kept)")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("build", parents=[common],
                       help="the whole pipeline as a Prefect flow (ingest, train, embed, index, "
                            "pairs, evaluate, report; then dvc commit)")
    p.add_argument("--no-train", action="store_true",
                   help="skip training: embed with the existing checkpoint or model.init")
    p.add_argument("--rebuild-index", action="store_true", help="retrain the FAISS index")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("nightly", parents=[common],
                       help="re-index the scans that arrived since the last run, once (the "
                            "scheduled flow)")
    p.set_defaults(handler=cmd_nightly)

    p = sub.add_parser("serve", parents=[common],
                       help="run the nightly flow on orchestration.nightly_cron (blocks)")
    p.add_argument("--name", default="cbir-nightly", help="deployment name (default %(default)s)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("sql", parents=[common],
                       help="run one SQL query on the DuckDB catalogue (read only)")
    p.add_argument("query", help="SQL; put user values in as ? placeholders")
    p.add_argument("--param", action="append", default=[], metavar="VALUE",
                   help="a value for the next ? placeholder (repeatable)")
    p.set_defaults(handler=cmd_sql)
    return parser


# Subcommands that write to the data folder hold its writer lock while they run (cbir/lock.py);
# `build` and `nightly` take it inside their flows, `serve` in each run it starts.
WRITERS = frozenset({"ingest", "train", "embed", "index", "pairs", "evaluate", "report"})


def _writer_lock(settings: Settings, args: argparse.Namespace) -> Any:
    if args.command not in WRITERS:
        return contextlib.nullcontext()
    from .lock import writer_lock

    return writer_lock(settings, f"cbir {args.command} --params {settings.params_path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.params)
        with _writer_lock(settings, args):
            return int(args.handler(settings, args) or 0)
    except CbirError as exc:
        print(f"cbir {args.command}: error: {exc}", file=sys.stderr)
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
