#!/bin/bash
# fid.sh TAG...: one fidelity run per tag, tree /tmp/emu27-TAG, in one queue slot each;
# report, samples and vLLM's log copied to calibration-s27/fidelity/TAG-HHMMSS/
D=$(cd "$(dirname "$0")" && pwd)
for TAG in "$@"; do
  WT=/tmp/emu27-$TAG
  cd $WT
  HEAVY_WHO=emu27 /work/bin/heavy bash -c "
    DEST=$D/fidelity/$TAG-\$(date -u +%H%M%S); mkdir -p \$DEST
    rm -f out/fidelity/report.json out/fidelity/calibration-samples.json
    { echo START \$(date -u +%FT%TZ) tree $TAG; uptime
      env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs -p no:cacheprovider
      echo END \$(date -u +%FT%TZ) rc=\$?; } > \$DEST/run.log 2>&1
    cp out/fidelity/report.json \$DEST/report.json; cp out/fidelity/calibration-samples.json \$DEST/samples.json
    cp out/fidelity/*.yaml \$DEST/ 2>/dev/null; true"
done
