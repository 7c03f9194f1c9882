#!/bin/bash
# fid.sh TAG...: one fidelity run per tag, tree /tmp/calib28-TAG, all tags back to back in ONE
# queue slot (so a main control and a branch run see the same host state); a tree's native build
# is compiled first, in the same slot. Report, samples and the run's log are copied to
# calibration-s28/fidelity/TAG-HHMMSS/; run.log ends with pytest's exit status. FID_PRE: a
# command run first in the same slot (unit tests of a tree), its output in /tmp/calib28-pre.log.
D=$(cd "$(dirname "$0")" && pwd)
export FID_PRE
HEAVY_WHO=calib28 /work/bin/heavy bash -c '
  D=$1; shift
  [ -n "$FID_PRE" ] && bash -c "$FID_PRE" > /tmp/calib28-pre.log 2>&1
  for TAG in "$@"; do
    cd /tmp/calib28-$TAG || continue
    DEST=$D/fidelity/$TAG-$(date -u +%H%M%S); mkdir -p $DEST
    /work/main/.venv/bin/python scripts/compile_native.py --strict > $DEST/native.log 2>&1
    rm -f out/fidelity/report.json out/fidelity/calibration-samples.json
    { echo START $(date -u +%FT%TZ) tree $TAG $(git rev-parse --short HEAD 2>/dev/null); uptime
      env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 \
        HF_ENDPOINT=http://127.0.0.1:9 /work/main/.venv/bin/python -m pytest -m fidelity \
        tests/fidelity/test_calibration.py -q -rs -p no:cacheprovider
      rc=$?; echo END $(date -u +%FT%TZ) rc=$rc; } > $DEST/run.log 2>&1
    cp out/fidelity/report.json $DEST/report.json
    cp out/fidelity/calibration-samples.json $DEST/samples.json
  done
  true' fid "$D" "$@"
