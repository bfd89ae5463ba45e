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
# The machinery is runs/lib.sh, the --tiny sizes runs/tiny.sh; kat_speedrun.sh adds the KAT experiment.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=runs/lib.sh
source runs/lib.sh

# ----------------------------------------------------------------------------- the d20 run's flags
# runs/tiny.sh replaces them for --tiny; the stages not named here run at their scripts' defaults.
TOK_TRAIN_FLAGS=(--max_chars=2000000000 --vocab_size=65536)  # ~2B characters, the first 8 shards
BASE_TRAIN_FLAGS=(--depth=20)                                # 20 layers, 1280 wide, 20 tokens per parameter
BASE_LOSS_FLAGS=() BASE_EVAL_FLAGS=() MID_TRAIN_FLAGS=() CHAT_SFT_FLAGS=() CHAT_RL_FLAGS=() CHAT_EVAL_FLAGS=()
PREFETCH_STAGE=prefetch_nanochat PREFETCH_FLAGS=(--kat=false)  # kat_speedrun.sh fetches the preference data too
AFTER_PREFETCH=()  # a command kat_speedrun.sh starts in the background once the inputs are checked
# disk room checked before the first stage (runs/lib.sh check_disk), estimated from d20's 561M parameters
DATA_DISK_GB=30  # $NANOCHAT_BASE_DIR: 240 shards (~24 GB), the tokenizer, the eval bundle, the prefetched datasets
OUTS_DISK_GB=65  # outs/: base, mid, sft, rl, each ckpt.pt and up to 2 intermediate ones of ~5 GB (weights, optimizer state)

# ----------------------------------------------------------------------------- the stages
nanochat_stages() {
    start_report  # the report card's header: system, git commit, this run's start
    # every dataset and file the later stages read, fetched and checked against their loaders now, so a
    # network or schema problem fails in minutes, not hours in (--tiny: the bundled samples, offline)
    run_stage "$PREFETCH_STAGE" "$LOG_DIR/$PREFETCH_STAGE.done" python -m scripts.prefetch "${PREFETCH_FLAGS[@]}"
    if [ ${#AFTER_PREFETCH[@]} -gt 0 ]; then "${AFTER_PREFETCH[@]}"; fi

    if [ "$TINY" = 1 ]; then
        echo "tiny preset: pretraining text, tasks, CORE bundle and preference data come from the bundled samples"
    else
        # pretraining text: 8 shards for the tokenizer now, the rest (240 for d20) while it trains
        run_stage download_tok_shards "$LOG_DIR/download_tok_shards.done" python -m nanochat.dataset -n 8
        start_background download_all_shards python -m nanochat.dataset -n 240
    fi
    # the BPE tokenizer (Rust), then its compression beside GPT-2's and GPT-4's
    run_stage tok_train "$NANOCHAT_BASE_DIR/tok/tokenizer_config.json" python -m scripts.tok_train "${TOK_TRAIN_FLAGS[@]}"
    run_stage tok_eval "$LOG_DIR/tok_eval.done" python -m scripts.tok_eval
    wait_background download_all_shards

    # pretraining, then bits per byte on train/val and the CORE score
    run_training_stage base_train base launch scripts.base_train --run="$WANDB_RUN" "${BASE_TRAIN_FLAGS[@]}"
    run_stage base_loss "$LOG_DIR/base_loss.done" launch scripts.base_loss "${BASE_LOSS_FLAGS[@]}"
    run_stage base_eval "$LOG_DIR/base_eval.done" launch scripts.base_eval "${BASE_EVAL_FLAGS[@]}"

    # midtraining: chat format, multiple choice, tool use, spelling; then the chat evals
    run_training_stage mid_train mid launch scripts.mid_train --run="$WANDB_RUN" "${MID_TRAIN_FLAGS[@]}"
    run_stage chat_eval_mid "$LOG_DIR/chat_eval_mid.done" launch scripts.chat_eval -i mid "${CHAT_EVAL_FLAGS[@]}"

    # supervised fine-tuning on conversations, one by one; then the chat evals
    run_training_stage chat_sft sft launch scripts.chat_sft --run="$WANDB_RUN" "${CHAT_SFT_FLAGS[@]}"
    run_stage chat_eval_sft "$LOG_DIR/chat_eval_sft.done" launch scripts.chat_eval -i sft "${CHAT_EVAL_FLAGS[@]}"

    if [ "$WITH_RL" = 1 ]; then
        # --rl: reinforcement learning on GSM8K, then GSM8K again
        run_training_stage chat_rl rl launch scripts.chat_rl --run="$WANDB_RUN" "${CHAT_RL_FLAGS[@]}"
        run_stage chat_eval_rl "$LOG_DIR/chat_eval_rl.done" launch scripts.chat_eval -i rl -a GSM8K "${CHAT_EVAL_FLAGS[@]}"
    fi
}

# ----------------------------------------------------------------------------- the run
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # kat_speedrun.sh sources this file for the above

parse_options "$@"  # --tiny, --rl, --force[=stage,...], --help
if [ -n "$CONTROL" ]; then
    echo "--control=$CONTROL belongs to kat_speedrun.sh (the controls of the KAT experiment)" >&2
    exit 2
fi
if [ "$TINY" = 1 ]; then
    # shellcheck source=runs/tiny.sh
    source runs/tiny.sh
fi
setup_environment  # output folders, the Python environment (uv), the number of processes
check_disk "$NANOCHAT_BASE_DIR" "$DATA_DISK_GB" "the pretraining data and datasets"
check_disk "$NANOCHAT_OUTS_DIR" "$OUTS_DISK_GB" "the checkpoints"
nanochat_stages
generate_report
echo
echo "Chat with the model:  python -m scripts.chat_cli -i sft     (or: python -m scripts.chat_web)"
echo "Stage timings:        $LOG_DIR/timings.txt"
