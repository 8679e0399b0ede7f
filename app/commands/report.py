"""`seglock report`: the papers' tables and plots from a folder of JSON results."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="lay out evaluation and attack results as the papers' tables and plots",
        description=(
            "Read every JSON result under RUNS_DIR (from `seglock evaluate --json`, `seglock attack ... --out`, "
            "benchmarks/reproduce.py) and write OUT/report.md with markdown tables laid out like paper 000's "
            "Tables II-IV and paper 001's Table 1 (and paper 003's Table II), OUT/tables.json, and PNG plots: "
            "wrong_keys.png, miou_vs_block_size.png, conditions_per_mode.png."
        ),
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="folder of JSON results")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the report into")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seglock.models.report import write_report

    summary = write_report(args.runs_dir, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['report']}: {len(summary['tables'])} tables, {len(summary['plots'])} plots "
              f"from {summary['evaluations']} evaluations and {sum(summary['attacks'].values())} attacks")
        if summary["skipped"]:
            print(f"not recognised: {', '.join(summary['skipped'])}", file=sys.stderr)
    return 0
