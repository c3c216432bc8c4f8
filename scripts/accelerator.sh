#!/usr/bin/env bash
# The accelerator session as one command, for a machine lent for minutes (README, "On an
# accelerator"): the bench, then the study's LC members that a CPU cannot train at full scale,
# each sweep merged beside the committed FC and CNN members. Whole sweeps only: a sweep that
# would not finish in the time left is not started, and one cut short leaves nothing behind.
#
#   OUT=folder USPSJAX_DATA=path/usps.h5 bash scripts/accelerator.sh [SECONDS] [sweep flags...]
#
# SECONDS (default 540) is this call's budget. Writes OUT/log.txt and OUT/results.tgz (the bench's
# files and every finished sweep's results/NAME/, to unpack over results/). Runs under the
# machine's own python3 and packages (PYTHON= to choose another); installs uspsjax from this
# tree without dependencies, so it needs no network.
set -uo pipefail
out=${OUT:?set OUT to the folder whose files come back}
budget=${1:-540}
shift $(( $# > 0 ? 1 : 0 ))
py=${PYTHON:-python3}
end=$(( SECONDS + budget ))
log="$out/log.txt"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
exec > >(tee -a "$log") 2>&1

"$py" -c "import uspsjax.sweeps" 2>/dev/null ||
    "$py" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
"$py" -c "import jax; print('devices:', jax.devices())"

done_paths=()
pack() { tar czf "$out/results.tgz" "${done_paths[@]}"; }

# The bench first: what the issue asks of an accelerator, and quick.
bench_out=$(mktemp -d)
if timeout -s INT $(( end - SECONDS )) "$py" -m uspsjax.bench --quick --out "$bench_out"; then
    mkdir -p results/bench && cp "$bench_out"/* results/bench/
    done_paths+=($(cd "$bench_out" && printf 'results/bench/%s ' *)) && pack
fi

# The study's LC sweeps missing at full scale, cheapest first, as SWEEP:MINUTES (the scaling
# estimate's for one H100, results/bench/scaling.md, rounded up), so that a short lease still
# brings whole sweeps back. None is missing now: the LC rows of `l1`, `bagging`, `batchnorm` and
# `adversarial` are committed at full scale, trained as CPU shards, and `dropout` has no LC (the
# study's dropout task is for FC and CNN). A sweep whose LC rows are found reduced goes here.
missing=()
for entry in ${missing[@]+"${missing[@]}"}; do
    sweep=${entry%%:*} need=$(( ${entry##*:} * 60 ))
    left=$(( end - SECONDS ))
    if (( left < need )); then
        echo "accelerator: $sweep not started: ${left} s left, it needs about ${need} s"
        continue
    fi
    if timeout -s INT "$left" "$py" -m uspsjax.sweep "$sweep" --networks lc --merge \
            --no-checkpoints "$@"; then
        done_paths+=("results/$sweep") && pack
    else
        echo "accelerator: $sweep did not finish in ${left} s"
    fi
done
echo "accelerator: finished ${done_paths[*]:-nothing} in ${SECONDS} s"
