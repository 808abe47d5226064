#!/usr/bin/env bash
# The test suite: create or reuse the environment, install, register, run pytest.
# Extra arguments go to pytest (e.g. `bash setup_scripts/run_tests.sh -k network`).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO_ROOT"
echo "[tests] running pytest (about 10-15 minutes on 2 CPU cores)"
python -m pytest -q -p no:cacheprovider "$@"
