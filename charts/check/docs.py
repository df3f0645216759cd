"""Checks that the operators' documents name every metric the gateway serves
(charts/check.sh): each series registered in src/metrics.rs must appear, as `name`, in
docs/metrics.md and in docs/operations.md.

    docs.py REPO
"""

import os
import re
import sys

repo = sys.argv[1]
with open(os.path.join(repo, "src/metrics.rs")) as f:
    series = sorted(set(re.findall(r'"((?:gateway|dispatch)_[a-z_]+)"', f.read())))
problems = []
if len(series) < 30:
    problems.append(f"only {len(series)} metric names found in src/metrics.rs: has the way they are written changed?")
for doc in ["docs/metrics.md", "docs/operations.md"]:
    with open(os.path.join(repo, doc)) as f:
        text = f.read()
    problems += [f"{doc} does not name {name}" for name in series if f"`{name}`" not in text]
for problem in problems:
    print(f"docs.py: {problem}", file=sys.stderr)
if not problems:
    print(f"docs.py: docs/metrics.md and docs/operations.md name all {len(series)} metrics")
sys.exit(1 if problems else 0)
