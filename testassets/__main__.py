"""The command line: ``python -m testassets [--cache DIR] [--only NAME ...] [--force]``,
run from the repository root.

Builds the assets (default: all of them) into the cache dir and prints a
JSON object ``{name: absolute path}`` on stdout; progress goes to stderr.
Exit code 0, or 1 when an asset cannot be built (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from testassets.common import AssetError, default_cache_dir
from testassets.registry import BUILDERS, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testassets",
        description="Build and cache the real models, photos and demo video used by edge-agent.")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache dir (default: $EDGE_AGENT_CACHE or ~/.cache/edge-agent)")
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), metavar="NAME",
                        help=f"build only these assets: {', '.join(BUILDERS)}")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    cache = args.cache if args.cache is not None else default_cache_dir()
    try:
        paths = build(cache, set(args.only) if args.only else None, force=args.force)
    except AssetError as exc:
        print(f"build_assets: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
