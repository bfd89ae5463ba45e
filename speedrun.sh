#!/usr/bin/env bash
# The nanochat speedrun: tokenizer -> base model -> midtraining -> SFT -> (optional RL) -> report.
#
#   bash speedrun.sh                 # 8xH100 (or whatever GPUs are visible), d20, about 4 hours
#   bash speedrun.sh --tiny          # the whole pipeline on a laptop CPU, offline, in minutes
#   bash speedrun.sh --rl            # also the optional GSM8K RL stage
#   bash speedrun.sh --force         # rerun every stage; --force=base_train,mid_train reruns those
#   WANDB_RUN=d20 NPROC_PER_NODE=4 bash speedrun.sh
#
# A stage whose final output exists is skipped (it says so); an interrupted training stage
# resumes from its last checkpoint; any failure stops the run naming the stage and its log.
# kat_speedrun.sh sources this file for the same stages and adds the KAT experiment.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
REPO_ROOT="$(pwd)"

# ----------------------------------------------------------------------------- options
TINY=0
WITH_RL=0
CONTROL=0  # kat_speedrun.sh's positive control
FORCE=""
parse_options() {
    for arg in "$@"; do
        case "$arg" in
            --tiny) TINY=1 ;;
            --rl) WITH_RL=1 ;;
            --force) FORCE="all" ;;
            --force=*) FORCE="${arg#--force=}" ;;
            --control) CONTROL=1 ;;
            -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
            *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
        esac
    done
}

# ----------------------------------------------------------------------------- environment
setup_environment() {
    export OMP_NUM_THREADS=1
    if [ "$TINY" = 1 ]; then
        # The tiny preset never touches a full run's outputs: everything goes under tiny_run/
        # (or $TINY_RUN_DIR, which the end-to-end test points at a temporary folder).
        local tiny_root="${TINY_RUN_DIR:-$REPO_ROOT/tiny_run}"
        export NANOCHAT_BASE_DIR="$tiny_root/base"
        export NANOCHAT_OUTS_DIR="$tiny_root/outs"
        export NANOCHAT_KAT_CACHE="$tiny_root/.cache"
        export NANOCHAT_REPORT_PATH="$tiny_root/report.md"
        export NANOCHAT_TASKS_OFFLINE=1
    else
        export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
        export NANOCHAT_OUTS_DIR="${NANOCHAT_OUTS_DIR:-$REPO_ROOT/outs}"
        export NANOCHAT_KAT_CACHE="${NANOCHAT_KAT_CACHE:-$REPO_ROOT/.cache}"
    fi
    mkdir -p "$NANOCHAT_BASE_DIR" "$NANOCHAT_OUTS_DIR"
    LOG_DIR="$NANOCHAT_OUTS_DIR/pipeline_logs"
    mkdir -p "$LOG_DIR"
    WANDB_RUN="${WANDB_RUN:-dummy}"

    if [ "${SKIP_ENV_SETUP:-0}" = 1 ]; then
        # a prepared image or cluster environment: the python on PATH already has every package
        if ! command -v python >/dev/null 2>&1; then
            echo "[FAIL] SKIP_ENV_SETUP=1 uses the 'python' on PATH, and there is none; put one there" \
                 "(e.g. a script that runs exec python3 \"\$@\") or unset SKIP_ENV_SETUP to let uv build the environment" >&2
            exit 1
        fi
        echo "SKIP_ENV_SETUP=1: using $(command -v python) as it is (no uv, no Rust install, no sync)"
    else
        install_environment
    fi

    if [ "$TINY" = 1 ]; then
        # One process unless NPROC_PER_NODE asks for more (torchrun: gloo on CPU, NCCL with
        # TINY_DEVICE_TYPE=cuda), which runs the distributed code paths at tiny size.
        NPROC="${NPROC_PER_NODE:-1}"
        case "$NPROC" in
            1|2|4|8|16) ;;
            *) echo "[FAIL] the tiny preset splits its 16-sequence micro-batches over the processes:" \
                    "NPROC_PER_NODE must be 1, 2, 4, 8 or 16, got '$NPROC'" >&2; exit 1 ;;
        esac
        TINY_ROWS=$((16 / NPROC))  # sequences per rank per micro-batch: the same total batch at any NPROC
        TINY_CONV_ROWS=$(( TINY_ROWS < 8 ? TINY_ROWS : 8 ))  # conversations (SFT) or pairs (RM) per rank: 16 per step
        # RL stages draw one prompt per rank at least: 4 per step up to 4 processes, one per rank beyond
        TINY_PROMPTS=$(( NPROC > 4 ? NPROC : 4 ))
        # A laptop's few cores: let torch use all of them, shared among the processes.
        local threads=$(( $(nproc) / NPROC ))
        export OMP_NUM_THREADS="${OMP_NUM_THREADS_TINY:-$(( threads > 0 ? threads : 1 ))}"
        DEVICE_FLAGS="--device_type=${TINY_DEVICE_TYPE:-cpu}"  # TINY_DEVICE_TYPE=cuda runs the CUDA paths at tiny size
    else
        NPROC="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
        DEVICE_FLAGS=""
    fi
    echo "base dir: $NANOCHAT_BASE_DIR | outputs: $NANOCHAT_OUTS_DIR | processes: $NPROC | wandb: $WANDB_RUN"
}

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
    "${UV_CMD[@]}" sync --frozen --extra web   # builds rustbpe with maturin
    # shellcheck disable=SC1091
    source .venv/bin/activate
}

# ----------------------------------------------------------------------------- stage runner
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

launch() {  # one process (tiny / CPU) or torchrun over the GPUs
    local module="$1"
    shift
    if [ "$NPROC" -gt 1 ]; then
        python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m "$module" -- "$@"  # torchrun of this python
    else
        python -m "$module" "$@"
    fi
}

# ----------------------------------------------------------------------------- the nanochat stages
nanochat_stages() {
    if [ ! -e "$NANOCHAT_BASE_DIR/report/header.md" ] || forced report; then
        python -m nanochat.report reset
    fi

    if [ "$TINY" = 1 ]; then
        echo "tiny preset: pretraining text, tasks, CORE bundle and preference data come from the bundled samples"
        run_stage tok_train "$NANOCHAT_BASE_DIR/tok/tokenizer_config.json" \
            python -m scripts.tok_train --vocab_size=4096 --max_chars=20000000
        run_stage tok_eval "$LOG_DIR/tok_eval.done" python -m scripts.tok_eval
        # --identical_batches: the bundled validation file has only 2 row groups, too few to give each
        # of 4 or 8 ranks its own, and with it any NPROC trains on the tokens one process does
        run_training_stage base_train base launch scripts.base_train $DEVICE_FLAGS --run="$WANDB_RUN" \
            --depth=2 --max_seq_len=256 --device_batch_size=$TINY_ROWS --total_batch_size=4096 --num_iterations=120 \
            --eval_every=60 --eval_tokens=16384 --core_metric_every=-1 --sample_every=120 --save_every=60 \
            --identical_batches=true
        run_stage base_loss "$LOG_DIR/base_loss.done" launch scripts.base_loss $DEVICE_FLAGS \
            --device_batch_size=$TINY_ROWS --split_tokens=16384 --identical_batches=true
        run_stage base_eval "$LOG_DIR/base_eval.done" launch scripts.base_eval $DEVICE_FLAGS --bundle=sample
        run_training_stage mid_train mid launch scripts.mid_train $DEVICE_FLAGS --run="$WANDB_RUN" \
            --device_batch_size=$TINY_ROWS --total_batch_size=4096 --num_iterations=40 --eval_every=20 --eval_tokens=8192 \
            --simple_spelling_size=200 --spelling_bee_size=200
        run_stage chat_eval_mid "$LOG_DIR/chat_eval_mid.done" launch scripts.chat_eval $DEVICE_FLAGS -i mid \
            --max_problems=20 --max_new_tokens=64
        run_training_stage chat_sft sft launch scripts.chat_sft $DEVICE_FLAGS --run="$WANDB_RUN" \
            --device_batch_size=$TINY_CONV_ROWS --target_examples_per_step=16 --num_iterations=20 --eval_every=10 --eval_steps=4 \
            --eval_metrics_every=-1 --smoltalk_size=200
        run_stage chat_eval_sft "$LOG_DIR/chat_eval_sft.done" launch scripts.chat_eval $DEVICE_FLAGS -i sft \
            --max_problems=20 --max_new_tokens=64
        if [ "$WITH_RL" = 1 ]; then
            run_training_stage chat_rl rl launch scripts.chat_rl $DEVICE_FLAGS --run="$WANDB_RUN" \
                --examples_per_step=$TINY_PROMPTS --num_samples=4 --max_new_tokens=64 --num_iterations=4 --eval_every=-1 \
                --eval_examples=8 --eval_samples=2
            run_stage chat_eval_rl "$LOG_DIR/chat_eval_rl.done" launch scripts.chat_eval $DEVICE_FLAGS -i rl \
                -a GSM8K --max_problems=20 --max_new_tokens=64
        fi
        return 0
    fi

    # Full run: 8 shards (~2B characters) for the tokenizer, the rest (240 for d20) in the background.
    run_stage download_tok_shards "$LOG_DIR/download_tok_shards.done" python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 240 > "$LOG_DIR/download_all_shards.log" 2>&1 &
    DATASET_DOWNLOAD_PID=$!
    run_stage tok_train "$NANOCHAT_BASE_DIR/tok/tokenizer_config.json" \
        python -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536
    run_stage tok_eval "$LOG_DIR/tok_eval.done" python -m scripts.tok_eval
    echo "waiting for the pretraining shards (log: $LOG_DIR/download_all_shards.log)"
    if ! wait "$DATASET_DOWNLOAD_PID"; then
        echo "[FAIL] downloading the pretraining shards failed; log: $LOG_DIR/download_all_shards.log" >&2
        exit 1
    fi
    run_training_stage base_train base launch scripts.base_train --depth=20 --run="$WANDB_RUN"
    run_stage base_loss "$LOG_DIR/base_loss.done" launch scripts.base_loss
    run_stage base_eval "$LOG_DIR/base_eval.done" launch scripts.base_eval
    run_training_stage mid_train mid launch scripts.mid_train --run="$WANDB_RUN"
    run_stage chat_eval_mid "$LOG_DIR/chat_eval_mid.done" launch scripts.chat_eval -i mid
    run_training_stage chat_sft sft launch scripts.chat_sft --run="$WANDB_RUN"
    run_stage chat_eval_sft "$LOG_DIR/chat_eval_sft.done" launch scripts.chat_eval -i sft
    if [ "$WITH_RL" = 1 ]; then
        run_training_stage chat_rl rl launch scripts.chat_rl --run="$WANDB_RUN"
        run_stage chat_eval_rl "$LOG_DIR/chat_eval_rl.done" launch scripts.chat_eval -i rl -a GSM8K
    fi
}

generate_report() {
    python -m nanochat.report generate
    echo "report: ${NANOCHAT_REPORT_PATH:-$REPO_ROOT/report.md}"
}

speedrun_main() {
    parse_options "$@"
    if [ "$CONTROL" = 1 ]; then
        echo "--control belongs to kat_speedrun.sh (the positive control of the KAT experiment)" >&2
        exit 2
    fi
    setup_environment
    nanochat_stages
    generate_report
    echo
    echo "Chat with the model:  python -m scripts.chat_cli -i sft     (or: python -m scripts.chat_web)"
    echo "Stage timings:        $LOG_DIR/timings.txt"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    speedrun_main "$@"
fi
