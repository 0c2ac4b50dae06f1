"""The `talkmosaic` command line: one `add_*_commands` block per command group, one handler each.

A handler takes (ctx, args), prints, and returns the exit status; user errors print one sentence.
"""

import argparse
import io
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from core.context import AppContext
from core.demo import describe_car, run_demo
from core.errors import UserError
from core.gallery import find_mosaic, list_mosaics, render_bytes, tile_lookup
from core.images import decode_image
from core.library import IMAGE_SUFFIXES, car_info, ingest_paths, library_stats, list_library
from core.mosaic import (
    MosaicOptions,
    build_mosaic,
    console_progress,
    encode_render,
    format_coordinate,
    preview_image,
)
from core.settings import BadSettings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="talkmosaic", description="Car-photo mosaics of endangered animals, and car Q&A."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_library_commands(commands)
    add_mosaic_commands(commands)
    add_ask_command(commands)
    add_db_commands(commands)
    add_chat_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ctx = AppContext.open(load_settings())
    except BadSettings as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
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
    if report.not_photos:
        print(_not_photos_sentence(report.not_photos))
    relabelled = f" ({report.labels_updated} relabelled)" if report.labels_updated else ""
    print(
        f"Added {report.added} photos, {report.skipped_duplicates} already in the library"
        f"{relabelled}, {len(report.failed)} unreadable ({report.seconds:.1f} s)."
    )
    if report.added or report.skipped_duplicates or report.labels_updated:
        return 0
    if report.failed:
        print(f"error: none of the {len(report.failed)} photos in {args.directory} could be "
              "added.", file=sys.stderr)
    else:
        print(f"error: {args.directory} holds no photos "
              f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}).", file=sys.stderr)
    return 1


def _not_photos_sentence(paths: list[str]) -> str:
    """One sentence counting the files left out because their suffix is not a photo's."""
    by_suffix = Counter(Path(path).suffix.lower() or "no suffix" for path in paths)
    kinds = ", ".join(f"{count} {suffix}" for suffix, count in by_suffix.most_common())
    hint = ""
    if ".svg" in by_suffix:
        hint = " (an SVG is a drawing, not a photo: export it as PNG to add it)"
    files = f"{len(paths)} files that are not photos"
    if len(paths) == 1:
        files = "1 file that is not a photo"
    return f"Left out {files}: {kinds}{hint}."


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


# mosaic --------------------------------------------------------------------------------------


def add_mosaic_commands(commands) -> None:
    mosaic = commands.add_parser("mosaic", help="build mosaics and look up their tiles")
    actions = mosaic.add_subparsers(dest="action", required=True, metavar="ACTION")
    defaults = MosaicOptions()

    build = actions.add_parser("build", help="build a mosaic of TARGET from the car library")
    build.add_argument("target", type=Path, help="the image to recompose (PNG, JPEG, ...)")
    build.add_argument("--name", required=True, help="name to look the mosaic up by")
    build.add_argument("--cols", type=int, default=defaults.cols, help="tiles across")
    build.add_argument("--tile", type=int, default=defaults.tile_px, metavar="PX",
                       help="tile size in the render")
    build.add_argument("--max-uses", type=int, default=defaults.max_uses, metavar="K",
                       help="copies allowed of one photo (default: no limit)")
    build.add_argument("--spacing", type=int, default=defaults.spacing, metavar="R",
                       help="copies of a photo are more than R tiles apart")
    build.add_argument("--blend", type=float, default=defaults.blend, metavar="A",
                       help="0..1 mix of each tile with its target cell's colour")
    build.add_argument("--shift", type=float, default=defaults.shift, metavar="S",
                       help="0..1 move of each tile's mean colour onto its cell's")
    build.add_argument("--adapt", type=float, default=defaults.adapt, metavar="S",
                       help="0..1 map of the target's colours onto the library's before matching")
    build.add_argument("--seed", type=int, default=defaults.seed, metavar="S")
    build.add_argument("--out", type=Path, metavar="FILE",
                       help="also write the render (PNG or JPEG by extension)")
    build.add_argument("--preview", type=Path, metavar="FILE",
                       help="also write the labelled chat preview (JPEG)")
    build.set_defaults(handler=mosaic_build)

    actions.add_parser("list", help="list mosaics, newest first").set_defaults(
        handler=mosaic_list
    )

    show = actions.add_parser("show", help="what is stored for one mosaic")
    show.add_argument("name")
    show.set_defaults(handler=mosaic_show)

    tile = actions.add_parser("tile", help="the car photo behind a tile, e.g. C7 (or 7,3)")
    tile.add_argument("name")
    tile.add_argument("coordinate", help="column letters + row number (C7), or row,column (7,3)")
    tile.add_argument("--out", type=Path, metavar="FILE", help="write the photo there")
    tile.set_defaults(handler=mosaic_tile)

    demo = commands.add_parser("demo", help="demo library + mosaic of the bundled animal")
    demo.set_defaults(handler=demo_command)


def demo_command(ctx: AppContext, args: argparse.Namespace) -> int:
    run_demo(ctx)
    return 0


def mosaic_build(ctx: AppContext, args: argparse.Namespace) -> int:
    if not args.target.is_file():
        print(f"error: {args.target} does not exist.", file=sys.stderr)
        return 1
    options = MosaicOptions(
        cols=args.cols, tile_px=args.tile, max_uses=args.max_uses, spacing=args.spacing,
        blend=args.blend, shift=args.shift, adapt=args.adapt, seed=args.seed,
    )
    for path in (args.out, args.preview):
        # Found out before minutes of building, not after.
        if path is not None and not path.parent.is_dir():
            print(f"error: cannot write {path}: the folder {path.parent} does not exist.",
                  file=sys.stderr)
            return 1
    mosaic = build_mosaic(ctx, args.target.read_bytes(), args.name, options=options,
                          progress=console_progress())
    stats = mosaic.settings["stats"]
    print(f'Built "{mosaic.name}": {mosaic.cols} x {mosaic.rows} tiles from '
          f"{stats['distinct_photos']} of {stats['library_photos']} photos "
          f"in {stats['build_s']:.2f} s.")
    try:
        if args.out:
            _write_render(ctx, mosaic, args.out)
            print(f"Render: {args.out}")
        if args.preview:
            args.preview.write_bytes(preview_image(ctx, mosaic))
            print(f"Preview: {args.preview}")
    except OSError as error:
        print(f'error: the mosaic "{mosaic.name}" is saved (its render is '
              f"{ctx.media.describe(mosaic.render_media_key)}), but {error.filename} could not be "
              f"written: {error.strerror or error}.", file=sys.stderr)
        return 1
    return 0


def _write_render(ctx: AppContext, mosaic, path: Path) -> None:
    data = render_bytes(ctx, mosaic)
    if path.suffix.lower() == ".png":
        data = encode_render(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")
    path.write_bytes(data)


def mosaic_list(ctx: AppContext, args: argparse.Namespace) -> int:
    mosaics = list_mosaics(ctx)
    if not mosaics:
        print("No mosaics yet: build one with `talkmosaic mosaic build` or `talkmosaic demo`.")
    for mosaic in mosaics:
        size = f"{mosaic.cols} x {mosaic.rows} tiles"
        print(f"{mosaic.name:<24} {size:<18} {mosaic.created_at:%Y-%m-%d %H:%M}")
    return 0


def mosaic_show(ctx: AppContext, args: argparse.Namespace) -> int:
    mosaic = find_mosaic(ctx, args.name)
    stats, options = mosaic.settings.get("stats", {}), mosaic.settings.get("options", {})
    print(f"{mosaic.name}: {mosaic.cols} x {mosaic.rows} tiles of {mosaic.tile_px} px "
          f"(A1 to {format_coordinate(mosaic.rows - 1, mosaic.cols - 1)})")
    print(f"  render: {ctx.media.describe(mosaic.render_media_key)}")
    print(f"  built {mosaic.created_at:%Y-%m-%d %H:%M} by {mosaic.created_by or 'the CLI'}")
    print("  options: " + ", ".join(f"{key}={value}" for key, value in options.items()))
    print("  stats: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    return 0


def mosaic_tile(ctx: AppContext, args: argparse.Namespace) -> int:
    found = tile_lookup(ctx, find_mosaic(ctx, args.name), args.coordinate)
    print(f"{found.label}: {describe_car(found.car_info)}")
    for key, value in (found.car_info or {}).items():
        if value is not None and key != "id":
            print(f"  {key}: {value}")
    if found.note:
        print(f"  note: {found.note}")
    if args.out:
        args.out.write_bytes(found.image_bytes)
        print(f"Photo ({found.content_type}): {args.out}")
    return 0


# ask -----------------------------------------------------------------------------------------


def add_ask_command(commands) -> None:
    ask = commands.add_parser("ask", help="ask about a car photo; prints a cited answer")
    ask.add_argument("photo", type=Path, help="a photo of a car (JPEG, PNG, ...)")
    ask.add_argument("question", help='e.g. "Which parts of this car pollute?"')
    ask.set_defaults(handler=ask_command)


def ask_command(ctx: AppContext, args: argparse.Namespace) -> int:
    # Imported here: the answer pipeline loads torch, which the other commands do not need.
    from core.qa.pipeline import AnswerPipeline
    from core.vlm.loader import ModelNotInstalled
    from core.worker import check_question

    if not args.photo.is_file():
        print(f"error: {args.photo} does not exist.", file=sys.stderr)
        return 1
    photo = args.photo.read_bytes()
    # What the asker got wrong is said before any model loads (seconds on a small machine).
    check_question(args.question, ctx.settings.max_question_chars)
    decode_image(photo, ctx.settings.max_image_pixels, max_bytes=ctx.settings.max_upload_bytes)
    try:
        answer = AnswerPipeline(ctx).answer(
            photo, args.question, lambda text: print(text, file=sys.stderr)
        )
    except ModelNotInstalled as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(answer.text)
    stages = [(key[:-2], value) for key, value in answer.timings.items() if key.endswith("_s")]
    print("Timings: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in stages))
    return 0


# db ------------------------------------------------------------------------------------------


def add_db_commands(commands) -> None:
    db = commands.add_parser("db", help="the database schema and the media store's leftovers")
    actions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = actions.add_parser(
        "upgrade", help="migrate the schema to the newest revision (also done on every start)"
    )
    upgrade.set_defaults(handler=db_upgrade)
    revision = actions.add_parser(
        "revision", help="(developers) write a migration for the models' changes since the newest"
    )
    revision.add_argument("message", help='what changes, e.g. "jobs gain a language"')
    revision.set_defaults(handler=db_revision)
    sweep = actions.add_parser(
        "sweep", help="remove half-written media and media no mosaic, photo or question uses"
    )
    sweep.add_argument("--older-than", type=float, metavar="MINUTES",
                       help="spare leftovers younger than this (default MEDIA_SWEEP_AFTER_MIN)")
    sweep.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    sweep.set_defaults(handler=db_sweep)


def db_upgrade(ctx: AppContext, args: argparse.Namespace) -> int:
    from storage.migrate import current_revision, head_revision

    # AppContext.open has migrated already; this says where the schema now is.
    with ctx.db.engine.connect() as connection:
        revision = current_revision(connection)
    print(f"Database schema at revision {revision} (newest: {head_revision()}).")
    return 0


def db_revision(ctx: AppContext, args: argparse.Namespace) -> int:
    from storage.migrate import write_revision

    path = write_revision(ctx.db.engine, args.message)
    if path is None:
        print("The models and the newest revision agree: no migration to write.")
        return 0
    print(f"Wrote {path}: read it, adjust it, and commit it with the models' change.")
    return 0


def db_sweep(ctx: AppContext, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from storage.sweep import sweep_media

    minutes = ctx.settings.media_sweep_after_min if args.older_than is None else args.older_than
    if minutes < 0:
        print("error: --older-than is a number of minutes, 0 or more.", file=sys.stderr)
        return 1
    report = sweep_media(ctx.db, ctx.media, timedelta(minutes=minutes), dry_run=args.dry_run)
    verb = "Would remove" if args.dry_run else "Removed"
    print(f"{verb} {report.orphans} unused media objects ({report.orphan_bytes / 1e6:.1f} MB) "
          f"and {report.incomplete} half-written ones older than {minutes:g} min.")
    return 0


# chat ----------------------------------------------------------------------------------------


def add_chat_command(commands) -> None:
    chat = commands.add_parser(
        "chat", help="talk to the bot in this terminal, no tokens: /mosaic, C7, /ask, follow-ups"
    )
    chat.set_defaults(handler=chat_command)


def chat_command(ctx: AppContext, args: argparse.Namespace) -> int:
    # The chat goes through the bots' own commands layer (bot/commands.py), the one place where
    # this entry point reaches above core; imported here so the other commands never load it.
    import asyncio

    from bot.terminal import chat
    from core.worker import exit_if_answers_running

    try:
        code = asyncio.run(chat(ctx))
    except KeyboardInterrupt:
        print()
        code = 0
    ctx.close()
    exit_if_answers_running(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
