"""Verify a shard directory against its manifest (checksums, sample counts) and count its samples per type."""
from __future__ import annotations

import json
from pathlib import Path

from m2r.data.shard_format import CorruptSample, read_shard
from m2r.data.shard_list import read_manifest
from m2r.shards.build import sha256_file


def _shard_type_counts(path: Path) -> dict:
    counts: dict = {}
    for record in read_shard(str(path)):
        meta = json.loads(record.get("json", b"{}"))
        name = meta.get("type", "clean")
        counts[name] = counts.get(name, 0) + 1
    return counts


def inspect_shards(directory: str) -> dict:
    """-> dict(shards=[{name, samples, type_counts, ok, problem}], type_counts, skipped, ok)."""
    manifest = read_manifest(directory)
    rows, totals = [], {}
    for entry in manifest["shards"]:
        path = Path(directory) / entry["name"]
        problem = None
        counts: dict = {}
        if not path.is_file():
            problem = "missing"
        elif sha256_file(path) != entry["sha256"]:
            problem = "sha256 mismatch"
        else:
            try:
                counts = _shard_type_counts(path)
            except (CorruptSample, ValueError) as exc:
                problem = f"unreadable: {exc}"
            if problem is None and sum(counts.values()) != entry["samples"]:
                problem = f"{sum(counts.values())} samples, manifest says {entry['samples']}"
        for name, count in counts.items() if problem is None else ():   # the totals count verified shards
            totals[name] = totals.get(name, 0) + count
        # A failed shard's samples are the manifest's count: what training loses if it is not rebuilt.
        rows.append(dict(name=entry["name"], samples=entry["samples"] if problem else sum(counts.values()),
                         type_counts=counts, ok=problem is None, problem=problem))
    return dict(mode=manifest.get("mode"), preset=manifest.get("preset"), shards=rows, type_counts=totals,
                skipped=manifest.get("skipped", []), ok=all(r["ok"] for r in rows))


def print_report(report: dict) -> None:
    print(f"mode {report['mode']}, preset {report['preset']}")
    for row in report["shards"]:
        status = "ok" if row["ok"] else f"FAILED ({row['problem']}; sample count from the manifest)"
        print(f"  {row['name']}  {row['samples']:6d} samples  sha256 {status}")
    print("samples per type (verified shards):")
    for name, count in sorted(report["type_counts"].items()):
        print(f"  {name:16s} {count}")
    failed = [row for row in report["shards"] if not row["ok"]]
    print(f"total {sum(report['type_counts'].values())} samples in {len(report['shards']) - len(failed)} verified "
          f"shards" + (f"; {len(failed)} shards FAILED, holding {sum(r['samples'] for r in failed)} samples "
                       "by the manifest" if failed else ""))
    if report["skipped"]:
        print(f"{len(report['skipped'])} undecodable source file(s) skipped at build:")
        for entry in report["skipped"]:
            print(f"  {entry['path']}: {entry['error']}")
    print("checksums verified" if report["ok"] else "VERIFICATION FAILED")
