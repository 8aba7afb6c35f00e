#!/usr/bin/env bash
# The test command (README and .ci/run): install what the tests need, then run the whole suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh tests/unit -k config`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
. tools/install.sh
# One CPU thread per test process: the multi-process tests start several torch processes on
# a 2-core machine and oversubscription makes them crawl.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q -ra --durations=15 "${@:-tests}"
