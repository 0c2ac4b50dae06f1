"""The `talkmosaic` command line: one `add_*_commands` block per command group, one handler each.

A handler takes (ctx, args), prints, and returns the exit status; user errors print one sentence.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.context import AppContext
from core.errors import UserError
from core.library import car_info, ingest_paths, library_stats, list_library
from core.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="talkmosaic", description="Car-photo mosaics of endangered animals, and car Q&A."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_library_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = AppContext.open(Settings())
    try:
        return args.handler(ctx, args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        ctx.close()


# library -------------------------------------------------------------------------------------


def add_library_commands(commands) -> None:
    library = commands.add_parser("library", help="the car photo library mosaics are made of")
    actions = library.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", help="add the photos in a directory (again: adds only new ones)"
    )
    add.add_argument("directory", type=Path, help="folder of car photos, searched recursively")
    add.add_argument(
        "--labels",
        type=Path,
        metavar="FILE.csv",
        help="metadata by file name: file,make,model,year,fuel,co2_g_km,emission_standard,source",
    )
    add.add_argument("--no-progress", action="store_true", help="no progress bar")
    add.set_defaults(handler=library_add)

    listing = actions.add_parser("list", help="list photos, newest first")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--limit", type=int, default=20, help="photos per page")
    listing.add_argument("--by-id", action="store_true", help="oldest first, by id")
    listing.set_defaults(handler=library_list)

    stats = actions.add_parser("stats", help="photo count, storage, photos by fuel and make")
    stats.set_defaults(handler=library_stats_command)


def library_add(ctx: AppContext, args: argparse.Namespace) -> int:
    if not args.directory.exists():
        print(f"error: {args.directory} does not exist.", file=sys.stderr)
        return 1
    if args.labels is not None and not args.labels.is_file():
        print(f"error: labels file {args.labels} does not exist.", file=sys.stderr)
        return 1
    report = ingest_paths(ctx, args.directory, args.labels, progress=not args.no_progress)
    for problem in report.label_problems:
        print(f"labels: {problem}")
    for path, reason in report.failed:
        print(f"skipped {path}: {reason}")
    print(
        f"Added {report.added} photos, {report.skipped_duplicates} already in the library, "
        f"{len(report.failed)} unreadable ({report.seconds:.1f} s)."
    )
    return 0


def library_list(ctx: AppContext, args: argparse.Namespace) -> int:
    cars = list_library(ctx, limit=args.limit, page=args.page, newest_first=not args.by_id)
    if not cars:
        print("No photos on this page." if args.page > 1 else "The library is empty.")
        return 0
    print(f"{'id':>6}  {'file':<28} {'make':<12} {'model':<16} {'year':>4}  {'fuel':<9} {'CO2':>5}")
    for car in cars:
        info = car_info(car)
        co2 = f"{info['co2_g_km']:.0f}" if info["co2_g_km"] is not None else "-"
        print(
            f"{info['id']:>6}  {info['file_name'][:28]:<28} {(info['make'] or '-')[:12]:<12} "
            f"{(info['model'] or '-')[:16]:<16} {info['year'] or '-':>4}  "
            f"{(info['fuel'] or '-')[:9]:<9} {co2:>5}"
        )
    return 0


def library_stats_command(ctx: AppContext, args: argparse.Namespace) -> int:
    stats = library_stats(ctx)
    print(f"Photos: {stats.photos}")
    print(
        f"Originals: {stats.original_bytes / 1e6:.1f} MB, thumbnails: "
        f"{stats.thumbnail_bytes / 1e6:.1f} MB"
    )
    for title, counts in (("By fuel", stats.by_fuel), ("By make", stats.by_make[:15])):
        if counts:
            print(f"{title}: " + ", ".join(f"{value or 'unknown'} {n}" for value, n in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
