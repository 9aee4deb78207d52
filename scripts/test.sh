#!/usr/bin/env bash
# Runs the test suite, creating the environment first if needed.
#   bash scripts/test.sh                 # everything that can run here
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$SAMI_ROOT"
# pytest's exit code 5 (no tests collected) is a failure, as is any other non-zero code.
# The slowest tests are listed at the end, to keep the suite's time in view.
exec python -m pytest --durations=25 "$@"
