"""What verifying a bundle costs at load: `python -m benchmarks.verify_cost BUNDLE [--gib 3]`.

Copies BUNDLE to a scratch directory next to the system's temporary files, adds a file of GIB GiB of random bytes
(not sparse) listed in its manifest as a weights file would be, and times :func:`clse_fx.deploy.verify.open_bundle`:
the first load with the file out of the page cache (sha256 read from disk), the first load with it cached (sha256
alone), and a later load (the verification stamps; nothing hashed). Writes benchmarks/results/verify_cost.json,
with the per-GiB figures extrapolated to LLaVA-1.5-7B's 13.5 GB bundle; the scratch copy is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from clse_fx.deploy import verify
from clse_fx.deploy.manifest import MANIFEST

RESULTS = Path(__file__).parent / "results" / "verify_cost.json"
BIG_BUNDLE_GB = 13.5  # LLaVA-1.5-7B in float16


def write_random(path: Path, gib: float) -> str:
    """Fill ``path`` with ``gib`` GiB of random bytes, synced to disk; its sha256."""
    digest, rng = hashlib.sha256(), np.random.default_rng(0)
    with open(path, "wb") as file:
        for _ in range(int(gib * 16)):
            block = rng.bytes(64 << 20)
            digest.update(block)
            file.write(block)
        file.flush()
        os.fsync(file.fileno())
    return digest.hexdigest()


def evict(path: Path) -> None:
    """Drop ``path``'s (clean) pages from the page cache, so the next read comes from the disk."""
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed_load(bundle: Path) -> float:
    start = time.perf_counter()
    verify.open_bundle(bundle)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--gib", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clse-verify-cost.") as scratch:
        bundle, stamps = Path(scratch) / "bundle", Path(scratch) / "stamps"
        shutil.copytree(args.bundle, bundle)
        big = bundle / "big.data"
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["files"]["big.data"] = {"sha256": write_random(big, args.gib), "bytes": big.stat().st_size}
        (bundle / MANIFEST).write_text(json.dumps(manifest))
        os.environ[verify.CACHE_VARIABLE] = str(stamps)
        time.sleep(verify.STAMP_MIN_AGE_S + 0.5)  # old enough to be stamped
        evict(big)
        cold = timed_load(bundle)
        shutil.rmtree(stamps)
        warm = timed_load(bundle)  # the file is in the page cache now
        stamped = timed_load(bundle)
        size_gb = sum(path.stat().st_size for path in bundle.iterdir()) / 1e9
    per_gb = {"first_load_cold_s": cold / size_gb, "first_load_cached_s": warm / size_gb}
    results = {
        "bundle_gb": round(size_gb, 3),
        "first_load_cold_s": round(cold, 2),
        "first_load_cached_s": round(warm, 2),
        "later_load_s": round(stamped, 4),
        "per_gb_s": {key: round(value, 3) for key, value in per_gb.items()},
        f"extrapolated_{BIG_BUNDLE_GB}gb_s": {key: round(value * BIG_BUNDLE_GB, 1) for key, value in per_gb.items()},
        "cpus": os.cpu_count(),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
