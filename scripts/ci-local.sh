#!/usr/bin/env bash
# CI as CI runs it: .ci/run on a clean clone of the committed HEAD in a temporary folder, with a
# fresh virtual environment holding only what pyproject.toml declares. It catches what a
# developer's own checkout hides: an optional extra installed here but not in CI, a file that
# is not committed, a test that needs something the clean install lacks.
#
#   scripts/ci-local.sh [OMNIGLOT_DIR]
#
# OMNIGLOT_DIR defaults to ../shared/data/omniglot beside the project, as in CI; without it the
# Omniglot tests are skipped, as they are in CI where it is missing. Uncommitted changes are not
# tested: commit first. The clone is deleted afterwards; the exit status is .ci/run's.
set -euo pipefail
project="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$project/../shared/data/omniglot}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone --quiet "$project" "$work/checkout"
if [ -d "$data" ]; then
    export METALEARN_DATA="$(cd "$data" && pwd)"
else
    echo "ci-local: no Omniglot at $data: its tests will be skipped" >&2
fi
echo "ci-local: .ci/run on a clean clone of $(git -C "$project" rev-parse --short HEAD) in $work" >&2
cd "$work/checkout"
.ci/run
