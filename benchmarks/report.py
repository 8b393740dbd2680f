"""pytest-benchmark JSON -> markdown table + PNG plots (flashsae.bench.report), the same as
`flashsae bench --report JSON... --report-dir DIR`.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out benchmarks/results/<date>-<machine>/
"""

import sys

from flashsae.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
