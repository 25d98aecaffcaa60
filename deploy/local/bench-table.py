#!/usr/bin/env python3
"""Prints the figures of one `make bench` run as a markdown table.

    deploy/local/bench-table.py FILE

FILE holds one JSON object per line, as tally_tests::report::record appends them:
job, value, unit, raw ({name, value} or null), ratio, goal, command. The table is followed by
the date (UTC) and the commit it was measured at. A goal of the form "≥ 0.5 ×" is checked
against the ratio, one like "≤ 500 ms" against the value (in the figure's unit); the goal
column then says whether the run met it.
"""

import datetime
import json
import re
import subprocess
import sys


def number(v):
    """38914.2 → '38 914', 468.0 → '468', 12.34 → '12.3', 1.234 → '1.23'."""
    if abs(v) >= 100:
        return f"{v:,.0f}".replace(",", " ")
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def verdict(fig):
    """' ✓' or ' ✗' when the goal can be checked, '' otherwise."""
    m = re.fullmatch(r"\s*([≥≤])\s*([0-9.]+)\s*(.*?)\s*", fig.get("goal") or "")
    if not m:
        return ""
    op, bound, unit = m.group(1), float(m.group(2)), m.group(3)
    if unit == "×":
        actual = fig.get("ratio")
    elif unit == fig.get("unit"):
        actual = fig.get("value")
    else:
        return ""
    if actual is None:
        return ""
    met = actual >= bound if op == "≥" else actual <= bound
    return " ✓" if met else " ✗"


def row(fig):
    unit = fig.get("unit", "")
    raw = fig.get("raw")
    raw_text = f"{raw['name']}: {number(raw['value'])} {unit}" if raw else "—"
    ratio = fig.get("ratio")
    ratio_text = f"{ratio:.2f} ×" if ratio is not None else "—"
    goal = fig.get("goal")
    goal_text = goal + verdict(fig) if goal else "—"
    cells = [
        fig["job"],
        f"{number(fig['value'])} {unit}",
        raw_text,
        ratio_text,
        goal_text,
        f"`{fig.get('command', '')}`",
    ]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: deploy/local/bench-table.py FILE")
    with open(sys.argv[1], encoding="utf-8") as f:
        figures = [json.loads(line) for line in f if line.strip()]
    print("| job | figure | raw limit in the same run | ratio | goal | command |")
    print("|---|---|---|---|---|---|")
    for fig in figures:
        print(row(fig))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"Measured {now} at commit {commit}.")


if __name__ == "__main__":
    main()
