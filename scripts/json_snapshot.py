"""Write `traceinsight analyze --json` of every labelled trace set into a folder.

Refactors and speed work promise findings JSON identical byte for byte. Run this once
on the commit before the change and once after, then compare the two folders::

    python scripts/json_snapshot.py /tmp/before
    python scripts/json_snapshot.py /tmp/after
    diff -r /tmp/before /tmp/after && echo identical

Each set is analysed in a fresh process with ``--no-cache`` semantics (a private cache
folder per run), the way a user's first run sees it. Extra trace paths or sets may be
given with ``--extra``. ``--no-cache`` runs ``traceinsight --no-cache analyze`` instead: no
cache at all, the path on which the analysis frees the model's events before its peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DEVICE = ROOT.parent / "shared" / "traces" / "device"


def trace_sets() -> list[tuple[str, list[Path]]]:
    """Every trace set in sample_traces/ and ../shared/traces/device, as (label, paths)."""
    sets: list[tuple[str, list[Path]]] = []
    for base, prefix in ((ROOT / "sample_traces", "sample"), (SHARED_DEVICE, "device")):
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_file() and entry.name.endswith((".sqlite", ".json.gz")):
                sets.append((f"{prefix}_{entry.stem.split('.')[0]}", [entry]))
            elif entry.is_dir():
                paths = sorted(
                    p for p in entry.iterdir()
                    if p.name.endswith((".sqlite", ".json.gz")) and not p.name.startswith("truth")
                )
                if paths:
                    sets.append((f"{prefix}_{entry.name}", paths))
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write LABEL.json files into")
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more trace files")
    parser.add_argument("--no-cache", action="store_true", help="run `traceinsight --no-cache analyze`")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sets = trace_sets() + [(f"extra_{p.stem.split('.')[0]}", [p]) for p in args.extra]
    failed = 0
    for label, paths in sets:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRACEINSIGHT_CACHE_DIR=cache, COLUMNS="100")
            target = args.out / f"{label}.json"
            done = subprocess.run(
                [sys.executable, "-c", "from traceinsight.cli import main; main()",
                 *(["--no-cache"] if args.no_cache else []), "analyze", "-q", "--json", str(target), *map(str, paths)],
                env=env, capture_output=True, text=True, check=False,
            )
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
        failed += done.returncode != 0
        print(f"{label:40s} {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
