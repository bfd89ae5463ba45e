# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it read these variables
# The machinery of the run scripts (speedrun.sh, kat_speedrun.sh, .ci/run), sourced, never run:
# options, the Python environment, output folders, launching a stage on this run's processes,
# skipping a stage that is done, resuming one that was interrupted, background jobs, logs and timings.
#
#   run_stage NAME DONE_FILE CMD...        skipped when DONE_FILE exists, else logged and timed
#   run_training_stage NAME OUT_DIR CMD... done at OUT_DIR/ckpt.pt, resumed from OUT_DIR/ckpt_*.pt
#   launch MODULE FLAGS...                 python -m MODULE on one process, or torchrun over NPROC
#   queue_training_stage NAME MODULE FLAGS... / run_queued_stages   independent runs, side by side
#                                          on a GPU each when there are enough, else one by one
#   start_background NAME CMD... / wait_background NAME
#   accepts_flags MODULE FLAGS...          does this checkout's MODULE take these flags?

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

TINY=0         # --tiny: runs/tiny.sh's preset
WITH_RL=0      # --rl: the optional GSM8K RL stage
CONTROL=""     # --control=sampler|tic|null: one of kat_speedrun.sh's controls (runs/control.sh)
CONTROL_KINDS=(sampler tic null)
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
            --control=*) CONTROL="${arg#--control=}"; check_control_kind ;;
            --control) echo "--control needs a kind: $(control_kinds_help)" >&2; exit 2 ;;
            -h|--help) print_usage; exit 0 ;;
            *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
        esac
    done
}

control_kinds_help() {
    echo "--control=sampler (a reward planted in rare prompts: the density arm must keep more of it)," \
         "--control=tic (an em dash rewarded at doses 0, 0.25, 0.5: amplified with the dose) or" \
         "--control=null (uniform against uniform: the verdict must be no difference)"
}

check_control_kind() {
    local kind
    for kind in "${CONTROL_KINDS[@]}"; do
        [ "$CONTROL" = "$kind" ] && return 0
    done
    echo "unknown control '$CONTROL': $(control_kinds_help)" >&2
    exit 2
}

print_usage() {  # the running script's opening comment
    awk 'NR == 1 { next } /^#/ { print; next } { exit }' "$REPO_ROOT/$(basename "$0")"
}

# ----------------------------------------------------------------------------- environment
# The one install step of every script and CI: uv builds .venv from uv.lock (compiling rustbpe with
# Rust) with every extra the full run imports, so a rerun never uninstalls what a later stage needs.
find_uv() {  # UV_CMD: the uv that launched us (`uv run` sets $UV), else the one on PATH, else from PyPI
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
}

install_environment() {
    find_uv
    if ! command -v cargo >/dev/null 2>&1; then
        echo "installing Rust (rustbpe is compiled from source)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
        # shellcheck disable=SC1091
        source "$HOME/.cargo/env"
    fi
    local extras=() name condition
    while read -r name condition; do  # runs/extras.txt: what the full run imports (a test checks it)
        case "$name" in ""|"#"*) continue ;; esac
        if [ "$condition" = if_wandb_run ] && [ "${WANDB_RUN:-dummy}" = dummy ]; then continue; fi
        extras+=(--extra "$name")
    done < "$REPO_ROOT/runs/extras.txt"
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

    if [ -n "${KAT_PARALLEL_RUNS:-}" ] && ! [[ "$KAT_PARALLEL_RUNS" =~ ^[1-9][0-9]*$ ]]; then
        echo "[FAIL] KAT_PARALLEL_RUNS must be a positive whole number (runs at once), got '$KAT_PARALLEL_RUNS'" >&2
        exit 2
    fi
    if [ -z "$NPROC" ]; then
        NPROC="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
    fi
    echo "base dir: $NANOCHAT_BASE_DIR | outputs: $NANOCHAT_OUTS_DIR | processes: $NPROC | wandb: $WANDB_RUN"
}

# check_disk DIR NEED_GB WHAT: stop now, not hours in, when DIR's disk cannot hold what the run writes there.
# What DIR holds already counts (a resumed run needs only the rest); NEED_GB 0 skips (the presets).
check_disk() {
    local dir="$1" need_gb="$2" what="$3" free_kb held_kb
    if [ "$need_gb" = 0 ] || [ "${NANOCHAT_DISK_CHECK:-1}" = 0 ]; then return 0; fi
    free_kb="$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')"
    held_kb="$(du -sk "$dir" | cut -f1)"
    if (( (free_kb + held_kb) / 1048576 < need_gb )); then
        echo "[FAIL] $what needs about $need_gb GB in $dir, which holds $((held_kb / 1048576)) GB with" \
             "$((free_kb / 1048576)) GB free on its disk: free space, point it at a larger disk, or set" \
             "NANOCHAT_DISK_CHECK=0 to start anyway" >&2
        exit 1
    fi
    echo "disk: $dir has room for $what (about $need_gb GB)"
}

# ----------------------------------------------------------------------------- stages
forced() {  # is this stage named by --force?
    [ "$FORCE" = "all" ] || [[ ",$FORCE," == *",$1,"* ]]
}

stage_is_done() {  # stage_is_done NAME DONE_FILE: true, saying so, when DONE_FILE exists and --force does not name it
    if [ -e "$2" ] && ! forced "$1"; then
        echo "[skip] $1: $2 exists (--force=$1 reruns it)"
        return 0
    fi
    return 1
}

stage_finished() {  # stage_finished NAME START_SECONDS DONE_FILE: its time in timings.txt; an eval stage's marker
    echo "[done] $1 in $((SECONDS - $2))s" | tee -a "$LOG_DIR/timings.txt"
    case "$3" in "$LOG_DIR"/*.done) touch "$3" ;; esac  # eval stages have no checkpoint; a marker says they ran
}

# run_stage NAME DONE_FILE CMD...: skip when DONE_FILE exists (unless forced), log to
# $LOG_DIR/NAME.log, stop the whole run on failure naming the stage and its log.
run_stage() {
    local name="$1" done_file="$2"
    shift 2
    local log="$LOG_DIR/$name.log" start=$SECONDS
    stage_is_done "$name" "$done_file" && return 0
    echo "[run ] $name  (log: $log)"
    if ! "$@" 2>&1 | tee "$log"; then  # pipefail: the stage's own exit status decides
        echo "[FAIL] stage '$name' failed; its log: $log" >&2
        exit 1
    fi
    stage_finished "$name" "$start" "$done_file"
}

# RESUME_FLAGS for a training stage writing DIR: none for a fresh start (a forced stage starts over,
# its folder removed); --resume=true when only intermediate checkpoints exist (an interrupted run).
set_resume_flags() {
    local name="$1" dir="$2"
    RESUME_FLAGS=()
    if forced "$name"; then
        rm -rf "$dir"
    elif [ ! -e "$dir/ckpt.pt" ] && compgen -G "$dir/ckpt_*.pt" >/dev/null; then
        echo "[resume] $name: continuing from the newest checkpoint in $dir"
        RESUME_FLAGS=(--resume=true)
    fi
}

# A training stage: done when outs/<stage>/ckpt.pt exists; resumed when only intermediate
# checkpoints do (an interrupted run); restarted from scratch when forced.
run_training_stage() {
    local name="$1" dir="$NANOCHAT_OUTS_DIR/$2"
    shift 2
    set_resume_flags "$name" "$dir"
    run_stage "$name" "$dir/ckpt.pt" "$@" "${RESUME_FLAGS[@]}"
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

# ----------------------------------------------------------------------------- independent runs side by side
# queue_training_stage NAME MODULE FLAGS... queues a training stage writing outs/NAME; run_queued_stages
# runs the queue. With at least as many slots as runs (KAT_PARALLEL_RUNS, else this run's GPUs) they
# all run at once, one process each, on CUDA each on its own GPU (run k on the k-th of the node's GPUs,
# modulo their number), the CPU threads one stage would use shared among them; otherwise one after
# another, each over all NPROC processes like any stage. Either way each run has its own log
# ($LOG_DIR/NAME.log), skip and resume. When a run fails the others run to their end, since their work
# is kept and a rerun skips it; then the pipeline stops naming each failed run and its log. An INT,
# TERM or HUP stops every run before the pipeline exits (they resume on the next invocation).
QUEUED_NAMES=() QUEUED_COMMANDS=()
declare -A RUN_PIDS=()  # NAME -> process id of the side-by-side runs still going

queue_training_stage() {
    QUEUED_NAMES+=("$1")
    shift
    QUEUED_COMMANDS+=("$(printf '%q ' "$@")")  # MODULE FLAGS..., quoted to be read back as words
}

ON_CUDA=""  # 1 when the stages run on CUDA, decided on first use
runs_on_cuda() {  # the stages' device: the preset's --device_type, else what the scripts autodetect
    if [ -z "$ON_CUDA" ]; then
        case "${DEVICE_FLAGS[*]}" in
            *--device_type=cuda*) ON_CUDA=1 ;;
            *--device_type=*) ON_CUDA=0 ;;
            *) ON_CUDA="$(python -c 'import torch; print(int(torch.cuda.is_available()))')" ;;
        esac
    fi
    [ "$ON_CUDA" = 1 ]
}

run_queued_stages() {
    local slots=1 i
    if [ -n "${KAT_PARALLEL_RUNS:-}" ]; then
        slots="$KAT_PARALLEL_RUNS"
    elif runs_on_cuda; then
        slots="$NPROC"  # the GPUs this run uses
    fi
    if [ "${#QUEUED_NAMES[@]}" -gt 1 ] && [ "$slots" -ge "${#QUEUED_NAMES[@]}" ]; then
        run_side_by_side
    else
        local -a command
        for i in "${!QUEUED_NAMES[@]}"; do
            eval "command=(${QUEUED_COMMANDS[$i]})"
            run_training_stage "${QUEUED_NAMES[$i]}" "${QUEUED_NAMES[$i]}" launch "${command[@]}"
        done
    fi
    QUEUED_NAMES=() QUEUED_COMMANDS=()
}

run_side_by_side() {
    local i name dir log gpu pid running
    local -a command gpus=() to_run=() failed=()
    local -A command_of=() start_of=()
    for i in "${!QUEUED_NAMES[@]}"; do  # which runs are done, which resume
        name="${QUEUED_NAMES[$i]}" dir="$NANOCHAT_OUTS_DIR/${QUEUED_NAMES[$i]}"
        set_resume_flags "$name" "$dir"
        stage_is_done "$name" "$dir/ckpt.pt" && continue
        to_run+=("$name")
        command_of[$name]="${QUEUED_COMMANDS[$i]} ${RESUME_FLAGS[*]}"
    done
    [ "${#to_run[@]}" -gt 0 ] || return 0
    if runs_on_cuda; then
        IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NPROC - 1)))}"
    fi
    local threads="${OMP_NUM_THREADS:-}"
    if [ -n "$threads" ]; then
        threads=$(( threads / ${#to_run[@]} > 0 ? threads / ${#to_run[@]} : 1 ))
    fi
    trap 'stop_side_by_side INT 130' INT
    trap 'stop_side_by_side TERM 143' TERM
    trap 'stop_side_by_side HUP 129' HUP
    for i in "${!to_run[@]}"; do
        name="${to_run[$i]}" log="$LOG_DIR/${to_run[$i]}.log" gpu=""
        eval "command=(${command_of[$name]})"
        if [ "${#gpus[@]}" -gt 0 ]; then
            gpu="${gpus[i % ${#gpus[@]}]}"
        fi
        echo "[run ] $name  (log: $log${gpu:+, GPU $gpu})"
        start_of[$name]=$SECONDS
        (
            if [ -n "$threads" ]; then export OMP_NUM_THREADS="$threads"; fi
            if [ -n "$gpu" ]; then export CUDA_VISIBLE_DEVICES="$gpu"; fi
            # launch's one-process form, exec'd so that the job's process id is the run's own
            exec python -m "${command[0]}" "${DEVICE_FLAGS[@]}" "${command[@]:1}"
        ) > "$log" 2>&1 &
        RUN_PIDS[$name]=$!
    done
    while [ "${#RUN_PIDS[@]}" -gt 0 ]; do
        sleep 1
        running=" $(jobs -rp | tr '\n' ' ') "
        for name in "${!RUN_PIDS[@]}"; do
            pid="${RUN_PIDS[$name]}"
            [[ "$running" == *" $pid "* ]] && continue
            unset "RUN_PIDS[$name]"
            if wait "$pid"; then
                stage_finished "$name" "${start_of[$name]}" "$NANOCHAT_OUTS_DIR/$name/ckpt.pt"
            else
                echo "[FAIL] stage '$name' failed; its log: $LOG_DIR/$name.log (the other runs go on to their end)" >&2
                failed+=("$name")
            fi
        done
    done
    trap - INT TERM HUP
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "[FAIL] ${#failed[@]} of ${#to_run[@]} runs failed: ${failed[*]}; their logs: $LOG_DIR/<name>.log" \
             "(the runs that finished are kept, and a rerun skips them)" >&2
        exit 1
    fi
}

stop_side_by_side() {  # stop_side_by_side SIGNAL EXIT_CODE: the pipeline was told to stop
    local name
    echo "[stop] $1: stopping the runs still going (${!RUN_PIDS[*]}); a rerun resumes them" >&2
    for name in "${!RUN_PIDS[@]}"; do
        kill -TERM "${RUN_PIDS[$name]}" 2>/dev/null || echo "[stop] $name had already ended" >&2
    done
    for name in "${!RUN_PIDS[@]}"; do
        if wait "${RUN_PIDS[$name]}"; then
            echo "[stop] $name ended" >&2
        else
            echo "[stop] $name ended with exit status $?" >&2
        fi
    done
    exit "$2"
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

# accepts_flags MODULE FLAGS...: whether this checkout's MODULE (its Config) takes these flags, for a
# stage or option that needs a feature another branch adds; any other error stops the run
accepts_flags() {
    local status=0
    python -c '
import importlib, sys
from nanochat.flags import FlagError, parse_flags
try:
    parse_flags(importlib.import_module(sys.argv[1]).Config, sys.argv[2:])
except FlagError:
    sys.exit(3)
' "$@" >/dev/null || status=$?
    case "$status" in
        0) return 0 ;;
        3) return 1 ;;
        *) echo "[FAIL] could not ask $1 whether it takes ${*:2} (exit $status): python -m $1 --help shows why" >&2
           exit 1 ;;
    esac
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
