"""`cascadeseg summarize OUT/`: merge the shard summaries of a batch run into one report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("summarize", help="merge the summaries of a (sharded) batch run",
                              description="Merge the cascadeseg-summary-shard*.json files that each "
                              "`cascadeseg segment COHORT/ -o OUT/ [--shard i/n]` writes into OUT/.")
    p.add_argument("folder", help="the output folder of the batch run (OUT/)")
    p.add_argument("--json", action="store_true", help="print the merged summary as JSON on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every shard finished and no case failed, else 2 (after printing the summary)."""
    from ..batch import merge_summaries

    merged, missing = merge_summaries(Path(args.folder).expanduser())
    if args.json:
        data = merged.to_json()
        data["missing_shards"] = missing
        print(json.dumps(data, indent=1))
    for line in merged.lines():
        print(line, file=sys.stderr)
    n = merged.shard[1]
    if missing:
        print(f"cascadeseg: error: shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{n}' for i in missing)} "
              "wrote no summary (not run, still running, or killed); run "
              f"{'them' if len(missing) > 1 else 'it'} with the same command, then summarize again", file=sys.stderr)
    return 2 if missing or merged.count("failed") else 0
