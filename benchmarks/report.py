"""pytest-benchmark JSON -> markdown table + PNG plots (see flashsae.bench_report).

pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
python benchmarks/report.py bench.json --out benchmarks/results/<date>-<machine>/
"""

import sys

from flashsae.bench_report import main

if __name__ == "__main__":
    sys.exit(main())
