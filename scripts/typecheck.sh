#!/usr/bin/env bash
# mypy --strict over the product code. The package is assembled from several top-level folders
# (setuptools package-dir), which mypy cannot follow through the editable install, so this builds
# a tree of symlinks in build/typecheck/agentcg mirroring the installed layout.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/agentcg"
for f in proto/agentcg/*; do ln -s "$PWD/$f" "$tree/agentcg/$(basename "$f")"; done
for pkg in broker node clients bpf migrations; do ln -s "$PWD/$pkg" "$tree/agentcg/$pkg"; done
MYPYPATH="$tree" exec .venv/bin/python -m mypy --strict --follow-imports=silent \
  --explicit-package-bases -p agentcg "$@"
