#!/usr/bin/env bash
# Builds Prism, Beam's portable runner in Go, once, at the SDK's own version,
# from the Go module proxy, into a cache outside the repository:
#   ~/.cache/sensor-scoring/prism/v<beam version>/prism
# beam_jobs/prism_runner.py passes it as --prism_location when the job runs
# with --runner PrismRunner and no --prism_location, so no flag is needed.
#
# Not in Beam's own Prism cache (~/.apache_beam/cache/prism/bin): a binary
# there under the release zip's name would also make every plain
# DirectRunner pipeline (tests' TestPipeline included) run on Prism, as the
# DirectRunner tries Prism first and falls back to the in-process runner only
# when it cannot get the binary. Which runner the DirectRunner runs is a
# decision of its own (issue 19), not a side effect of an install step.
#   scripts/fetch_prism.sh          # prints the binary's path; quiet when cached
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
VERSION="${PRISM_VERSION:-v$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("apache-beam"))')}"
DIR="${SENSOR_SCORING_CACHE:-$HOME/.cache/sensor-scoring}/prism/$VERSION"
if [ -x "$DIR/prism" ]; then
  echo "$DIR/prism"
  exit 0
fi
command -v go >/dev/null || { echo "fetch_prism.sh: go not found (Go 1.24+ builds Prism once)" >&2; exit 1; }
echo "building Prism $VERSION into $DIR (once, about 2 minutes)" >&2
mkdir -p "$DIR"
log=$(mktemp)
GOBIN="$DIR.tmp" go install "github.com/apache/beam/sdks/v2/go/cmd/prism@$VERSION" >"$log" 2>&1 \
  || { tail -20 "$log" >&2; rm -f "$log"; echo "fetch_prism.sh: go install failed" >&2; exit 1; }
rm -f "$log"
mv "$DIR.tmp/prism" "$DIR/prism"
rmdir "$DIR.tmp"
echo "$DIR/prism"
