#!/usr/bin/env bash
# The GPU checks of the project, prepared for a 15-minute device budget in calls of under
# 10 minutes. Run from the repository root on a machine with one CUDA device:
#
#   bash benchmarks/device_check.sh first    # call 1: tests, benchmark float32, benchmark --amp
#   bash benchmarks/device_check.sh seed     # call 2: the seed's command measured whole
#   bash benchmarks/device_check.sh PART...  # any parts, in the order given
#
# Parts, each under `timeout` (seconds), with the cost expected on one H200 or H100. The
# estimates come from the measurements in SPEC §6 and docs/benchmarking.md (H200, 2026-12-04:
# ClusTR epoch of 20,000 images 2.8 s, CE epoch about 1.8 s, a seed epoch of 50,000 images
# about 10 s; H100, 2026-11-26: the float32 report in 125 s with three repeats and scaling):
#
#   tests     python -m pytest tests/test_cuda.py            ~90 s   timeout 150
#             (two CLI runs on tiny data, float32 and bfloat16, AutoAttack on 20 images, the
#             GPU-against-CPU checks; those on the real subset skip without $CLUSTR_DATA)
#   bench     benchmarks.run float32: R1, R2, R4, the epoch by phases, R3; 20,000 training
#             images, 3 repeats (8 epochs of each kind of ~3 s, the phases, the parts of a
#             step, the embedding batches; R3 on 200 images, 3 sweeps per mode)
#                                                            ~100 s  timeout 210
#   amp       the same epochs section with --amp (bfloat16)  ~70 s   timeout 150
#   kmeans    the epochs section with --kmeans-device, 2 repeats: k-means' share of the
#             epoch on the device against `bench`'s          ~50 s   timeout 150
#   seed      the seed's command measured whole (benchmarks.run --only seed): 30 ClusTR
#             epochs on 50,000 synthetic CIFAR-10-sized images and 10,000 test images
#             (~10 s each on the H200: ~300 s), then 20 steps x 10 restarts at 4 eps on the
#             10,000 test images. The sweep's rate on the H200 (4 eps x 20 steps x 2
#             restarts on 1,017 images: 18 s for the whole process) puts it at up to ~6 min
#             if every restart attacks every image, less where early stopping drops the
#             broken ones.                               ~6-11 min timeout 480
#             The timeout is the 6-minute target plus a third: a run still going then has
#             missed the target, and its log holds every epoch's time and every eps' sweep
#             time reached, which say where the time went.
#
# Budget: the machine's start (1-3 min) + `first` (~4.5 min, at most 8.5) + `seed` (at most
# 8 min) fills the 15 minutes; `kmeans` is for a second budget. Each part
# writes its report to docs/results/ (created if absent) and its log to
# docs/results/device_check_<part>.log; with $OUT set, both are copied to $OUT/docs/results/
# when the part ends, even when it fails or times out. A part that fails does not stop the
# next; the exit status is that of the last failure. $CLUSTR_DATA (the folder holding
# cifar10-subset/ and weights/) enables the tests and R3 on the real subset; without it they
# skip and R3 uses synthetic images.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS=docs/results
export CLUSTR_QUIET=1 PYTHONUNBUFFERED=1
status=0

save() {  # copy the reports and logs back where the caller collects them
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/$RESULTS"
        cp -f "$RESULTS"/* "$OUT/$RESULTS"/ 2>/dev/null || true
    fi
}

part() {  # part NAME SECONDS COMMAND...: run one part under timeout, log it, keep going
    local name=$1 limit=$2
    shift 2
    local log="$RESULTS/device_check_$name.log" rc=0
    echo "== $name (timeout ${limit}s): $*" | tee "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    if [[ $rc -ne 0 ]]; then
        status=$rc
    fi
    save
}

# the benchmark on CUDA with the sizes above
BENCH=(python -m benchmarks.run --device cuda --train-size 20000 --repeats 3 --pgd-repeats 3)

run_part() {
    case $1 in
        tests) part tests 150 python -m pytest -q -rs tests/test_cuda.py ;;
        bench) part bench 210 "${BENCH[@]}" --only epochs pgd \
                   --out "$RESULTS/BENCHMARKS_cuda.md" --json "$RESULTS/bench_cuda.json" ;;
        amp) part amp 150 "${BENCH[@]}" --only epochs --amp \
                 --out "$RESULTS/BENCHMARKS_cuda_amp.md" --json "$RESULTS/bench_cuda_amp.json" ;;
        kmeans) part kmeans 150 "${BENCH[@]}" --only epochs --kmeans-device --repeats 2 \
                    --out "$RESULTS/BENCHMARKS_cuda_kmeans_device.md" ;;
        seed) part seed 480 python -m benchmarks.run --device cuda --only seed \
                  --out "$RESULTS/SEED_COMMAND_cuda.md" --json "$RESULTS/seed_command_cuda.json" ;;
        first) for p in tests bench amp; do run_part "$p"; done ;;
        *) echo "unknown part '$1' (tests, bench, amp, kmeans, seed, first)" >&2
           exit 2 ;;
    esac
}

if [[ $# -eq 0 ]]; then
    echo "usage: bash benchmarks/device_check.sh first|seed|PART... (see the header)" >&2
    exit 2
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device: these checks are for a GPU" >&2
    exit 1
}
mkdir -p "$RESULTS"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
for p in "$@"; do
    run_part "$p"
done
exit $status
