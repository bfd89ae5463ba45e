# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it read these variables
# The machinery of the run scripts (speedrun.sh, kat_speedrun.sh, .ci/run), sourced, never run:
# options, the Python environment, output folders, launching a stage on this run's processes,
# skipping a stage that is done, resuming one that was interrupted, background jobs, logs and timings.
#
#   run_stage NAME DONE_FILE CMD...        skipped when DONE_FILE exists, else logged and timed
#   run_training_stage NAME OUT_DIR CMD... done at OUT_DIR/ckpt.pt, resumed from OUT_DIR/ckpt_*.pt
#   launch MODULE FLAGS...                 python -m MODULE on one process, or torchrun over NPROC
#   start_background NAME CMD... / wait_background NAME

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

TINY=0         # --tiny: runs/tiny.sh's preset
WITH_RL=0      # --rl: the optional GSM8K RL stage
CONTROL=0      # --control: kat_speedrun.sh's positive control (runs/control.sh)
FORCE=""       # --force (all) or --force=a,b: stages to rerun
NPROC=""       # processes per stage: a preset's choice, else NPROC_PER_NODE, else one per GPU
DEVICE_FLAGS=()  # a preset's --device_type, given to every launched stage
declare -A BACKGROUND_PIDS=()

# ----------------------------------------------------------------------------- options
parse_options() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            --tiny) TINY=1 ;;
            --rl) WITH_RL=1 ;;
            --force) FORCE="all" ;;
            --force=*) FORCE="${arg#--force=}" ;;
            --control) CONTROL=1 ;;
            -h|--help) print_usage; exit 0 ;;
            *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
        esac
    done
}

print_usage() {  # the running script's opening comment
    awk 'NR == 1 { next } /^#/ { print; next } { exit }' "$REPO_ROOT/$(basename "$0")"
}

# ----------------------------------------------------------------------------- environment
# The one install step of every script and CI: uv builds .venv from uv.lock (compiling rustbpe with
# Rust) with every extra the full run imports, so a rerun never uninstalls what a later stage needs.
install_environment() {
    # uv: the one that launched us (`uv run` sets $UV), else the one on PATH, else from PyPI
    if [ -n "${UV:-}" ] && [ -x "$UV" ]; then
        UV_CMD=("$UV")
    elif command -v uv >/dev/null 2>&1; then
        UV_CMD=(uv)
    else
        echo "installing uv from PyPI"
        python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$PATH"
        if command -v uv >/dev/null 2>&1; then UV_CMD=(uv); else UV_CMD=(python3 -m uv); fi
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "installing Rust (rustbpe is compiled from source)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
        # shellcheck disable=SC1091
        source "$HOME/.cargo/env"
    fi
    local extras=(--extra web --extra hf)  # the chat server; HF datasets for the task and preference data
    if [ "${WANDB_RUN:-dummy}" != dummy ]; then
        extras+=(--extra wandb)  # a named run logs to wandb
    fi
    (cd "$REPO_ROOT" && "${UV_CMD[@]}" sync --frozen "${extras[@]}")
    # shellcheck disable=SC1091
    source "$REPO_ROOT/.venv/bin/activate"
}

# Output folders (a preset may have set them), the Python environment (or the prepared one on PATH
# with SKIP_ENV_SETUP=1) and the number of processes.
setup_environment() {
    if [ "$TINY" != 1 ]; then
        export OMP_NUM_THREADS=1  # one CPU thread per GPU process; runs/tiny.sh shares the CPU's cores instead
    fi
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    export NANOCHAT_OUTS_DIR="${NANOCHAT_OUTS_DIR:-$REPO_ROOT/outs}"
    export NANOCHAT_KAT_CACHE="${NANOCHAT_KAT_CACHE:-$REPO_ROOT/.cache}"
    mkdir -p "$NANOCHAT_BASE_DIR" "$NANOCHAT_OUTS_DIR"
    LOG_DIR="$NANOCHAT_OUTS_DIR/pipeline_logs"
    mkdir -p "$LOG_DIR"
    WANDB_RUN="${WANDB_RUN:-dummy}"

    if [ "${SKIP_ENV_SETUP:-0}" = 1 ]; then
        if ! command -v python >/dev/null 2>&1; then
            echo "[FAIL] SKIP_ENV_SETUP=1 uses the 'python' on PATH, and there is none; put one there" \
                 "(e.g. a script that runs exec python3 \"\$@\") or unset SKIP_ENV_SETUP to let uv build the environment" >&2
            exit 1
        fi
        echo "SKIP_ENV_SETUP=1: using $(command -v python) as it is (no uv, no Rust install, no sync)"
    else
        install_environment
    fi

    if [ -z "$NPROC" ]; then
        NPROC="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
    fi
    echo "base dir: $NANOCHAT_BASE_DIR | outputs: $NANOCHAT_OUTS_DIR | processes: $NPROC | wandb: $WANDB_RUN"
}

# ----------------------------------------------------------------------------- stages
forced() {  # is this stage named by --force?
    [ "$FORCE" = "all" ] || [[ ",$FORCE," == *",$1,"* ]]
}

# run_stage NAME DONE_FILE CMD...: skip when DONE_FILE exists (unless forced), log to
# $LOG_DIR/NAME.log, stop the whole run on failure naming the stage and its log.
run_stage() {
    local name="$1" done_file="$2"
    shift 2
    local log="$LOG_DIR/$name.log"
    if [ -e "$done_file" ] && ! forced "$name"; then
        echo "[skip] $name: $done_file exists (--force=$name reruns it)"
        return 0
    fi
    echo "[run ] $name  (log: $log)"
    local start=$SECONDS
    if ! "$@" 2>&1 | tee "$log"; then  # pipefail: the stage's own exit status decides
        echo "[FAIL] stage '$name' failed; its log: $log" >&2
        exit 1
    fi
    echo "[done] $name in $((SECONDS - start))s" | tee -a "$LOG_DIR/timings.txt"
    # eval stages have no checkpoint; a marker says they ran
    case "$done_file" in "$LOG_DIR"/*.done) touch "$done_file" ;; esac
}

# A training stage: done when outs/<stage>/ckpt.pt exists; resumed when only intermediate
# checkpoints do (an interrupted run); restarted from scratch when forced.
run_training_stage() {
    local name="$1" stage="$2"
    shift 2
    local dir="$NANOCHAT_OUTS_DIR/$stage"
    local extra=()
    if forced "$name"; then
        rm -rf "$dir"
    elif [ ! -e "$dir/ckpt.pt" ] && compgen -G "$dir/ckpt_*.pt" >/dev/null; then
        echo "[resume] $name: continuing from the newest checkpoint in $dir"
        extra=(--resume=true)
    fi
    run_stage "$name" "$dir/ckpt.pt" "$@" "${extra[@]}"
}

launch() {  # one process (tiny / CPU) or torchrun over the GPUs, on the preset's device
    local module="$1"
    shift
    if [ "$NPROC" -gt 1 ]; then
        python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m "$module" -- "${DEVICE_FLAGS[@]}" "$@"  # torchrun of this python
    else
        python -m "$module" "${DEVICE_FLAGS[@]}" "$@"
    fi
}

# start_background NAME CMD...: CMD runs beside the stages that follow, its output in $LOG_DIR/NAME.log;
# wait_background NAME waits for it (if this run started it) and stops the run if it failed.
start_background() {
    local name="$1"
    shift
    "$@" > "$LOG_DIR/$name.log" 2>&1 &
    BACKGROUND_PIDS[$name]=$!
}

wait_background() {
    local name="$1" log="$LOG_DIR/$1.log"
    [ -n "${BACKGROUND_PIDS[$name]:-}" ] || return 0
    echo "waiting for $name (log: $log)"
    if ! wait "${BACKGROUND_PIDS[$name]}"; then
        echo "[FAIL] background stage '$name' failed; its log: $log" >&2
        exit 1
    fi
    unset "BACKGROUND_PIDS[$name]"
}

# ----------------------------------------------------------------------------- report card
start_report() {  # the report card's header, once per run (or again with --force=report)
    if [ ! -e "$NANOCHAT_BASE_DIR/report/header.md" ] || forced report; then
        python -m nanochat.report reset
    fi
}

generate_report() {
    python -m nanochat.report generate
    echo "report: ${NANOCHAT_REPORT_PATH:-$REPO_ROOT/report.md}"
}
