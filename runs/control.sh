# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it read these variables
# The positive control (kat_speedrun.sh --control): plant a known tic and check that the experiment
# sees it. Sourced after runs/lib.sh's parse_options (and runs/tiny.sh with --tiny).
#
# The starting policy is the main SFT model fine-tuned briefly with the tic (em dashes) in a fraction
# of its conversations (stage control_sft), so it writes the tic at a small base rate: GRPO can only
# amplify what the policy samples. kat_inject then plants the tic in the chosen responses of the
# densest half of the train pairs (the regions density-aware sampling draws less often), and the same
# KAT stages run at a small size (about 20 minutes on one GPU). The diversity report gains a
# "Positive control" section. Everything goes under its own root (control_run/, or tiny_run/control/),
# reading the main run's tokenizer (a link) and SFT checkpoint, never writing them.
#
#   KAT_INJECT_STYLE, KAT_INJECT_RATE, KAT_INJECT_WHERE   the planted tic (emdash, 0.5, dense)
#   KAT_CONTROL_SFT_TIC_RATE                             the SFT conversations with the tic (0.3)
#   KAT_LOCAL_DIR=nanochat/samples/kat                   the bundled pairs, on a machine without internet
#   KAT_SEEDS                                            GRPO runs per arm (default 1)
# After changing the injection: --force=kat_inject,train_rm,train_rm_judge,grpo_density,grpo_baseline,eval_diversity

AFTER_PREFETCH=()  # the pairs are built in the control's own root, after control_environment
GRPO_SEEDS="${KAT_SEEDS:-1}"  # one run per arm: the planted tic is a large effect, and the control stays ~20 minutes
INJECT_FLAGS=(--inject_style="${KAT_INJECT_STYLE:-emdash}" --inject_rate="${KAT_INJECT_RATE:-0.5}"
              --inject_where="${KAT_INJECT_WHERE:-dense}")
# without the spelling drills, which cannot carry the tic and would only dilute it
CONTROL_SFT_FLAGS=(--tic_style="${KAT_INJECT_STYLE:-emdash}" --tic_rate="${KAT_CONTROL_SFT_TIC_RATE:-0.3}"
                   --eval_metrics_every=-1 --simple_spelling_size=0 --spelling_bee_size=0)
if [ "$TINY" = 1 ]; then
    # at the full LR the 2-layer model starts to write an em dash now and then
    CONTROL_SFT_FLAGS+=(--device_batch_size="$TINY_CONV_ROWS" --target_examples_per_step=16 --num_iterations=60
                        --init_lr_frac=1.0 --eval_every=-1 --eval_steps=4 --smoltalk_size=200)
    RM_FLAGS=(--device_batch_size="$TINY_ROWS" --pairs_per_step=16 --num_epochs=3 --lr=1e-3 --head_lr=1e-2 --eval_every=-1)
else
    CONTROL_SFT_FLAGS+=(--num_iterations=100 --eval_every=-1 --eval_steps=20)
    # one GPU, about 20 minutes: a few thousand pairs, a short RM run with a higher LR than the main
    # one, and GRPO with a loose KL so that the planted preference can move the policy within 80 steps
    if [ -n "${KAT_LOCAL_DIR:-}" ]; then
        PAIRS_FLAGS=(--local_dir="$KAT_LOCAL_DIR" --se_test_fraction=0.1)
    else
        PAIRS_FLAGS=(--max_pairs=4000)
    fi
    RM_FLAGS=(--pairs_per_step=32 --num_iterations=150 --lr=2e-5 --head_lr=2e-3 --eval_every=-1)
    GRPO_FLAGS=(--max_steps=80 --prompts_per_step=16 --samples_per_prompt=8 --max_new_tokens=128
                --learning_rate=2e-5 --beta=0.02 --density_k=10 --eval_every=-1 --eval_prompts=64 --save_every=20)
    DIVERSITY_FLAGS=(--num_prompts=100 --num_samples=4 --max_tokens=192)
fi

# Every output path moves to the control's own root; the tokenizer (and downloaded task data) are
# the main run's, linked, and the main SFT model (MAIN_SFT_DIR) is read, never written.
control_environment() {
    local main_base main_outs
    main_base="$(readlink -f "$NANOCHAT_BASE_DIR")"
    main_outs="$(readlink -f "$NANOCHAT_OUTS_DIR")"
    if [ ! -e "$main_outs/sft/ckpt.pt" ] || [ ! -e "$main_base/tok/tokenizer_config.json" ]; then
        echo "[FAIL] --control runs on an existing SFT model and tokenizer, and $main_outs/sft/ckpt.pt or" \
             "$main_base/tok/ is missing: run bash speedrun.sh first (or point NANOCHAT_OUTS_DIR and" \
             "NANOCHAT_BASE_DIR at a run that has them)" >&2
        exit 1
    fi
    if [ "$TINY" = 1 ]; then
        CONTROL_ROOT="$(dirname "$main_base")/control"  # beside the tiny run's base/ and outs/
    else
        CONTROL_ROOT="${NANOCHAT_CONTROL_DIR:-$REPO_ROOT/control_run}"
    fi
    mkdir -p "$CONTROL_ROOT/base" "$CONTROL_ROOT/outs"
    [ -e "$CONTROL_ROOT/.gitignore" ] || printf '*\n' > "$CONTROL_ROOT/.gitignore"  # outputs, never source
    MAIN_SFT_DIR="$main_outs/sft"
    if [ -L "$CONTROL_ROOT/outs/sft" ]; then
        rm "$CONTROL_ROOT/outs/sft"  # earlier versions linked the main SFT model here; control_sft now trains its own
    fi
    local links=("$CONTROL_ROOT/base/tok:$main_base/tok") link target
    if [ -d "$main_base/task_data" ]; then
        links+=("$CONTROL_ROOT/base/task_data:$main_base/task_data")  # control_sft's mixture, not downloaded twice
    fi
    for link in "${links[@]}"; do
        target="${link#*:}"
        link="${link%%:*}"
        if [ -e "$link" ] && [ ! -L "$link" ]; then
            echo "[FAIL] $link exists and is not a link to $target; move it away" >&2
            exit 1
        fi
        ln -sfn "$target" "$link"
    done
    export NANOCHAT_BASE_DIR="$CONTROL_ROOT/base" NANOCHAT_OUTS_DIR="$CONTROL_ROOT/outs"
    export NANOCHAT_KAT_CACHE="$CONTROL_ROOT/.cache" NANOCHAT_REPORT_PATH="$CONTROL_ROOT/report.md"
    LOG_DIR="$NANOCHAT_OUTS_DIR/pipeline_logs"
    mkdir -p "$LOG_DIR"
    start_report
    echo "positive control under $CONTROL_ROOT (tokenizer $main_base/tok, starting from the SFT model $MAIN_SFT_DIR)"
}
