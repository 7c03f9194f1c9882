#!/bin/bash
# unit checks for calib29, in the queue: the new test on the branch (passes), on main with the
# test file copied in (must fail), ruff, mypy
export PYTHONPATH=src:. HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9
cd /tmp/calib29-br
echo "== branch: tests/test_calibration.py"; /work/main/.venv/bin/pytest -q -p no:cacheprovider tests/test_calibration.py 2>&1 | tail -3
echo "== branch: emulator tests"; /work/main/.venv/bin/pytest -q -p no:cacheprovider tests -k "emulat" 2>&1 | tail -3
echo "== ruff"; /work/main/.venv/bin/ruff check src tests bench 2>&1 | tail -2
echo "== mypy"; /work/main/.venv/bin/mypy 2>&1 | tail -2
rm -rf /tmp/calib29-failcheck; rsync -a --exclude .venv --exclude .fidelity-venv --exclude .bench-venvs /tmp/calib29-main/ /tmp/calib29-failcheck/
cp /tmp/calib29-br/tests/test_calibration.py /tmp/calib29-failcheck/tests/
cd /tmp/calib29-failcheck
echo "== main + the new test (must fail)"; /work/main/.venv/bin/pytest -q -p no:cacheprovider tests/test_calibration.py -k "round_trip_out_after" 2>&1 | tail -4
