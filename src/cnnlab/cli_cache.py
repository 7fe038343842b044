"""`cnnlab cache`: what the per-user cache holds (decoded folders and CSVs, downloaded datasets), and clearing it."""

from __future__ import annotations

import argparse
import json

from cnnlab.cli_common import EXIT_OK


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    """Options of `cnnlab cache`."""
    p = sub.add_parser(
        "cache",
        description="List the per-user cache: image folders and labels CSVs decoded at a size (read instead of "
        "decoding again), and downloaded datasets, with their size on disk and when they were last used. A newer "
        "decode of the same data replaces the older one by itself; --clear deletes the decoded caches.",
    )  # fmt: skip
    p.add_argument("--clear", action="store_true", help="delete the decoded image caches (the next run decodes again)")
    p.add_argument("--downloads", action="store_true", help="with --clear: delete the downloaded datasets too")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    """`cnnlab cache`."""
    from cnnlab.data.cache import age, clear, entries, human_bytes
    from cnnlab.data.locate import cache_root
    from cnnlab.errors import UsageError

    if args.downloads and not args.clear:
        raise UsageError("--downloads only goes with --clear (listing always shows the downloads)")
    found = entries()
    if args.clear:
        chosen = [e for e in found if e.kind == "decoded" or args.downloads]
        freed = clear(chosen)
        if args.json:
            print(json.dumps({"cache": str(cache_root()), "removed": len(chosen), "freed_bytes": freed}))
        else:
            print(f"removed {len(chosen)} cache entr{'y' if len(chosen) == 1 else 'ies'} from {cache_root()}, "
                  f"freed {human_bytes(freed)}")  # fmt: skip
        return EXIT_OK
    if args.json:
        rows = [{"kind": e.kind, "source": e.source, "image_size": e.image_size, "images": e.images, "bytes": e.bytes,
                 "last_used": e.last_used, "current": e.current, "path": str(e.path)} for e in found]  # fmt: skip
        print(json.dumps({"cache": str(cache_root()), "entries": rows}, indent=1))
        return EXIT_OK
    from cnnlab.reporting import print_table

    print(f"cache: {cache_root()}")
    if not found:
        print("empty")
        return EXIT_OK
    print_table(
        ["kind", "source", "size", "images", "on disk", "last used"],
        [[e.kind + ("" if e.current else " (outdated)"), e.source, f"{e.image_size}px" if e.image_size else "",
          f"{e.images:,}" if e.images is not None else "", human_bytes(e.bytes), age(e.last_used)] for e in found],
    )  # fmt: skip
    print(f"{human_bytes(sum(e.bytes for e in found))} in all; `cnnlab cache --clear` deletes the decoded caches")
    return EXIT_OK
