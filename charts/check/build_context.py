"""Checks the Dockerfile's build context (charts/check.sh): the files .dockerignore keeps
must include every file `cargo build --release --locked --bin dispatch` reads, and leave
out target/ and .git.

    build_context.py REPO

What the build reads: Cargo.toml and Cargo.lock, every file git tracks under src/, the
files src/ names in include_str!/include_bytes!, and the targets Cargo.toml declares
(cargo refuses a manifest whose declared bench or example file is missing). The matcher
is docker-py's, which follows the Docker builder's .dockerignore rules. Also checks that
the chart's appVersion (its default image tag) is the crate's version.
"""

import os
import re
import subprocess
import sys
import tomllib

from docker.utils.build import exclude_paths

repo = sys.argv[1]
with open(os.path.join(repo, ".dockerignore")) as f:
    patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
context = set(exclude_paths(repo, patterns, dockerfile="Dockerfile"))

tracked = subprocess.run(["git", "ls-files", "src"], cwd=repo, check=True,
                         capture_output=True, text=True).stdout.split()
needed = {"Cargo.toml", "Cargo.lock", *tracked}
for path in tracked:
    with open(os.path.join(repo, path), encoding="utf-8", errors="replace") as f:
        for name in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', f.read()):
            needed.add(os.path.normpath(os.path.join(os.path.dirname(path), name)))
with open(os.path.join(repo, "Cargo.toml"), "rb") as f:
    manifest = tomllib.load(f)
for kind, folder in [("bin", "src/bin"), ("bench", "benches"), ("example", "examples"), ("test", "tests")]:
    for target in manifest.get(kind, []):
        needed.add(target.get("path", f"{folder}/{target['name']}.rs"))
if "lib" in manifest:
    needed.add(manifest["lib"].get("path", "src/lib.rs"))

problems = [f"{path}: the build reads it, but .dockerignore leaves it out" for path in sorted(needed - context)]
problems += [f"{path}: in the build context, but it must not be" for path in sorted(context)
             if path.startswith(("target/", ".git/"))]
with open(os.path.join(repo, "charts/dispatch-gateway/Chart.yaml")) as f:
    app_version = re.search(r'^appVersion:\s*"?([^"\s]+)"?', f.read(), re.M).group(1)
if app_version != manifest["package"]["version"]:
    problems.append(f"Chart.yaml appVersion {app_version} is not the crate's version {manifest['package']['version']}")
for problem in problems:
    print(f"build_context.py: {problem}", file=sys.stderr)
if not problems:
    print(f"build_context.py: the build context holds the {len(needed)} files the build reads, "
          f"{len(context)} files in all")
sys.exit(1 if problems else 0)
