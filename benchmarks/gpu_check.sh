#!/usr/bin/env bash
# One-shot check of pwconv's GPU path on a CUDA machine, from the repository root:
#   versions -> install -> show_config -> GPU tests (PWCONV_CUDA_DEBUG=1; the CUDA kernels, the
#   CuPy / CUDA-tensor paths of the array interop and the PyTorch adapter, the paper's networks
#   and the training commands on the GPU) -> GPU benchmark -> a training step on the GPU ->
#   the host's time to issue each operator call ->
#   the search kernels' variants (tiles, row slots, cell size, K = 3, rows sorted by a warp)
#   -> the operator kernels' variants (one thread per row, chunks, rank transposition, unroll)
#   -> kernel-time profiles (defaults; every opt-in), the L1 requests the load model counts
#   (benchmarks/gpu_load_model.py) and the heaviest kernels' ncu sections (if ncu is installed).
# Every step runs even if an earlier one failed (the benchmark result is useful on its own);
# logs go to $OUT when set (else benchmarks/out/), a summary with each step's status is printed
# last.  No network needed: the build dependencies must be installed already.
#   bash benchmarks/gpu_check.sh
# Env: PWCONV_GPU_STEPS (the steps to run, by name, e.g. "install gpu_tests benchmark"; all by
# default: one call of the device tool runs at most 10 minutes, so a session may run the steps in
# two calls on the same warm machine), PWCONV_PYTEST_FLAGS (default "--maxfail=10"),
# PWCONV_BENCH_FLAGS (default ""), timeouts below.  The real-data GPU tests read ../shared/data
# beside the checkout, else $PWCONV_SHARED_DATA (they skip, saying so, without it): where only the
# checkout reaches the GPU machine, `python benchmarks/gpu_data.py .gpudata` copies the LiDAR tile
# and the first 32 ModelNet40 shapes into .gpudata/ (ignored by git: name it in the device tool's
# carry) and PWCONV_SHARED_DATA=.gpudata points the tests there.
set -uo pipefail

cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-benchmarks/out}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
STATUS=()

step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...
    local name="$1" limit="$2" log="$3"
    shift 3
    if [ -n "${PWCONV_GPU_STEPS:-}" ] && [[ " $PWCONV_GPU_STEPS " != *" $name "* ]]; then
        return 0  # not asked for this time
    fi
    echo
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s) ==="
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG_DIR/$log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    [ "$rc" -eq 124 ] && echo "!!! $name timed out after ${limit}s"
    STATUS+=("$(printf '%-14s rc=%-4s %4ss' "$name" "$rc" "$took")")
    return 0
}

{
    echo "date: $(date -u --iso-8601=seconds)"
    echo "host: $(uname -a)"
    nvidia-smi || echo "nvidia-smi failed"
    command -v nvcc >/dev/null && nvcc --version | tail -2
    "$PY" - <<'PYVERSIONS'
import platform
print("python", platform.python_version())
def show(label, fn):
    try:
        print(label, fn())
    except Exception as exc:  # report and go on
        print(label, "FAILED:", type(exc).__name__, exc)
show("numpy", lambda: __import__("numpy").__version__)
show("cupy", lambda: __import__("cupy").__version__)
show("cuda runtime / driver", lambda: (__import__("cupy").cuda.runtime.runtimeGetVersion(),
                                       __import__("cupy").cuda.runtime.driverGetVersion()))
show("nvrtc", lambda: __import__("cupy").cuda.nvrtc.getVersion())
show("device", lambda: __import__("cupy").cuda.runtime.getDeviceProperties(0)["name"])
show("torch", lambda: (__import__("torch").__version__, __import__("torch").version.cuda,
                       __import__("torch").cuda.is_available()))
for mod in ("cython", "scikit_build_core", "cmake", "ninja", "pytest"):
    show(mod, lambda mod=mod: getattr(__import__(mod), "__version__", "?"))
PYVERSIONS
} 2>&1 | tee "$LOG_DIR/versions.log"

step install 120 install.log \
    "$PY" -m pip install --no-build-isolation --no-deps -q .

# From outside the source tree: `python -c` run here would import the uncompiled pwconv_cy/.
step show_config 40 versions.log \
    bash -c 'cd "${TMPDIR:-/tmp}" && exec "$@"' _ "$PY" -c "import pwconv_cy; pwconv_cy.show_config(); \
import pwconv_cy.cuda as c; print('pwconv_cy.cuda available:', c.is_available(), c.unavailable_reason() or ''); \
import time; t = time.time(); c.compile_kernels(); print(f'kernels compiled/loaded in {time.time() - t:.1f} s')"

# The networks' GPU tests first: the newest GPU code, and the few seconds they take are not lost
# if the kernels' tests run past the limit.
# shellcheck disable=SC2086
step gpu_tests 270 pytest.log \
    env PWCONV_CUDA_DEBUG=1 "$PY" -m pytest -q -ra ${PWCONV_PYTEST_FLAGS:---maxfail=10} -m gpu \
    tests/test_models_gpu.py tests/test_cuda.py tests/test_interop.py \
    tests/test_torch_adapter.py -p no:cacheprovider

# shellcheck disable=SC2086
step benchmark 170 bench.log \
    "$PY" benchmarks/gpu_paper_workload.py ${PWCONV_BENCH_FLAGS:-}

# One training step of the paper's classifier on the GPU (model.to("cuda")) and on the host.
step train_step 120 train.log \
    "$PY" benchmarks/gpu_train_step.py

# The host's time to issue each operator call of the paper workload (checks off, transposed map
# built fresh), without waiting for the kernels: the stages were bound by it on 2026-11-27.
step host_overhead 60 host.log \
    "$PY" benchmarks/gpu_host_overhead.py

# The search kernels' variants, each in a fresh process (identical maps required), alternated
# (the first process measured runs slow): as shipped; the one pass with each cloud's coordinates
# (tiles; tiles2: and cells) in shared memory over the row table as (key, cells) pairs (slots);
# with the cloud's grid rows there too (tiles3), also with K = 3 compiled in; the defaults
# before 2026-11-28 (the scratch sized from a sample every time, the grid by flatnonzero:
# sample, nonzero), together and apart; grid cells of
# 3/4 and 1/2 the voxel's edge (c0.75, c0.5: fewer candidates, more rows; cells of 2v would test
# 2.4x the candidates for s >= 2, benchmarks/search_work_model.py); the maps' rows sorted into
# place by 8 threads per row instead of a warp (r8: fewer warp steps, more L1 passes,
# benchmarks/sort_lanes_model.py).  (Count + fill passes: the benchmark times them; row
# batches of 4: 5.4 against 6.4 ms on 2026-11-27.)
step search_tuning 170 k3.log \
    "$PY" benchmarks/gpu_search_tuning.py none tiles2+slots tiles3 sample+nonzero tiles3+k3 \
    sample c0.75 tiles3+c0.5 none tiles3+c0.75 r8 nonzero

# The operator's "entries" kernels as shipped (one thread per row, conv_entries_thread, the
# transposed map by per-point sorts) against the defaults before 2026-11-28 (broadcast+sort:
# conv_entries, one radix sort), each cloud's source rows in shared memory (tile:
# conv_entries_tile, a block's rows longest first; inorder: in map order) and the weight
# gradient by chunks sorted by cell (chunks) or by warps, each its own sums (warps),
# alternated: per-layer times, identical forward and input gradients required.
step conv_tuning 160 conv.log \
    "$PY" benchmarks/gpu_conv_tuning.py none broadcast+sort warps tile+chunks tile+inorder none \
    broadcast+sort warps tile+chunks tile+inorder

# Kernel time of one iteration (Nsight Compute, where installed): where the time goes, with the
# defaults (profile) and with every opt-in not yet adopted (profile_opt: gpu_profile.py's
# OPT_INS), kernel by kernel.
if command -v ncu >/dev/null; then
    step profile 50 profile.log \
        bash -c 'ncu --profile-from-start off --csv --metrics gpu__time_duration.sum "$1" \
            benchmarks/gpu_profile.py > "$2/ncu_kernels.csv" && "$1" benchmarks/gpu_profile.py \
            --table "$2/ncu_kernels.csv"' _ "$PY" "$LOG_DIR"
    step profile_opt 50 profile.log \
        bash -c 'ncu --profile-from-start off --csv --metrics gpu__time_duration.sum "$1" \
            benchmarks/gpu_profile.py --opt-ins > "$2/ncu_kernels_opt.csv" && "$1" \
            benchmarks/gpu_profile.py --table "$2/ncu_kernels_opt.csv"' _ "$PY" "$LOG_DIR"
    # What benchmarks/gpu_load_model.py counts on the host emulation (L1 requests, sectors and
    # wavefronts per kernel, global / shared / local), measured: one cloud's iteration, as
    # shipped and with the tiled and one-thread-per-row opt-ins; kernels.cu's kernels only (not
    # CuPy's).
    PWCONV_KERNELS="kernel_map|conv_|sort_rows|sort_segments|permute_entries|scatter_by_point"
    PWCONV_KERNELS+="|count_per_point"
    PWCONV_KERNELS+="|expand_rows|sum_partials|pad_rows|weights_from_counts|grid_|points_digest"
    PWCONV_KERNELS+="|cloud_lower_corner|build_row_table|split_kernel_keys|kernel_axis_diffs"
    for variant in none tiles3+tile+warps; do
        step load_model_ncu 90 profile.log \
            bash -c 'f="$2/ncu_load_model_${3//+/_}.txt"; ncu --section \
                MemoryWorkloadAnalysis_Tables --print-details all -k regex:"$4" "$1" \
                benchmarks/gpu_load_model.py --gpu "$3" --clouds 1 > "$f" 2>&1; \
                grep -cE "^  [a-z_]+.*\(" "$f"' _ "$PY" "$LOG_DIR" \
                "$variant" "$PWCONV_KERNELS"
    done
    # Why the heaviest kernels take that long: registers, local memory (stack frame), occupancy,
    # the warps' stall reasons and memory traffic (L1 wavefronts: benchmarks/RESULTS.md's load
    # model): the first launches of the defaults' heavy kernels (ncu_detail) and of the opt-ins'
    # (ncu_detail_opt).
    for which in default opt; do
        flag=""; regex="kernel_map_once|conv_entries|conv_weight_rows|sort_segments"
        if [ "$which" = opt ]; then
            flag="--opt-ins"
            regex="kernel_map_tiled|conv_entries_tile|conv_weight_warps|sort_rows_by_rank"
        fi
        name=ncu_detail; [ "$which" = opt ] && name=ncu_detail_opt
        step "$name" 90 profile.log \
            bash -c 'ncu --profile-from-start off -k regex:"$3" --launch-count 12 \
                --section LaunchStats --section Occupancy --section SpeedOfLight \
                --section WarpStateStats --section MemoryWorkloadAnalysis "$1" \
                benchmarks/gpu_profile.py $4 > "$2/$5.txt" 2>&1; \
                grep -E "^  [a-z_]+.*\(|Registers Per Thread|Local Memory|Stack Size|Achieved Occ|Theoretical Occ|Duration|Memory Throughput|Compute \(SM\) Th|L1/TEX Hit|Mem Busy|Stall" \
                "$2/$5.txt" | head -80' _ "$PY" "$LOG_DIR" "$regex" "$flag" "$name"
    done
fi

echo
echo "=== summary ($(date -u +%H:%M:%S)) ==="
printf '%s\n' "${STATUS[@]}" | tee "$LOG_DIR/summary.txt"
if [ -f "$LOG_DIR/pytest.log" ]; then
    grep -E "passed|failed|error|skipped" "$LOG_DIR/pytest.log" | tail -1 \
        | tee -a "$LOG_DIR/summary.txt"
    if ! grep -qE "[0-9]+ passed" "$LOG_DIR/pytest.log"; then
        echo "!!! no GPU test passed: see the skip reasons / errors in $LOG_DIR/pytest.log" \
            | tee -a "$LOG_DIR/summary.txt"
    fi
fi
echo "logs: $LOG_DIR"
