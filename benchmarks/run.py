"""Run taxoclip's benchmarks: `python benchmarks/run.py [NAME ...]`.

Each benchmark measures side by side in one run (this machine is shared and noisy, so ratios
matter more than absolute times), prints a table, and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    import bench_catlip  # noqa: F401  (each bench_* module registers its benchmarks)
    import bench_eval  # noqa: F401
    import bench_features  # noqa: F401
    import bench_field  # noqa: F401
    import bench_finetune  # noqa: F401
    import bench_gpu  # noqa: F401
    import bench_lit  # noqa: F401
    import bench_scale  # noqa: F401
    import bench_shards  # noqa: F401
    import bench_vqa  # noqa: F401
    import study_finetune  # noqa: F401
    import study_open_set  # noqa: F401
    import study_unseen  # noqa: F401
    from common import BENCHMARKS, print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results")
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"\n== {name}")
        started = time.perf_counter()
        rows = BENCHMARKS[name](args)
        print_table(rows)
        payload = {
            "benchmark": name,
            "rows": rows,
            "seconds": round(time.perf_counter() - started, 1),
            "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"-> {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
