#!/usr/bin/env bash
# The KAT experiment on top of the nanochat speedrun: does sampling RLHF prompts inversely to
# their density in embedding space reduce mode collapse compared with uniform sampling?
#
#   bash kat_speedrun.sh             # 8xH100: speedrun.sh's stages, then the experiment
#   bash kat_speedrun.sh --tiny      # everything on a 2-core CPU, offline, from bundled samples
#   bash kat_speedrun.sh --force=grpo_density,grpo_baseline   # rerun chosen stages
#   WANDB_RUN=kat NPROC_PER_NODE=8 bash kat_speedrun.sh
#   bash kat_speedrun.sh --control          # positive control, ~20 min on one GPU, on an existing outs/sft
#   bash kat_speedrun.sh --tiny --control   # the same on a CPU, on the tiny preset's SFT model
#
# After speedrun.sh's stages: preference pairs -> prompt embeddings -> density weights ->
# reward model -> GRPO with density sampling (outs/grpo_density) -> GRPO with uniform sampling
# (outs/grpo_baseline) -> diversity evaluation -> report. The two GRPO runs are one script with
# the same seeds, steps and batch; only the prompt sampler differs.
#
# --control plants a known tic (em dashes in the chosen responses of the densest half of the
# train pairs, scripts.kat_inject between kat_density and train_rm) and runs the same stages at a
# small size, so that diversity_report.md gains a "Positive control" section: the RM's preference
# for the tic on held-out probes and the tic rates of SFT and both arms with CIs. Its starting
# policy (outs/sft under the control's root, stage control_sft) is the main SFT model fine-tuned
# briefly with the same tic in a fraction of its conversations (KAT_CONTROL_SFT_TIC_RATE, default
# 0.3), so it emits the tic at a small base rate: GRPO can only amplify what the policy samples,
# and a policy that never writes an em dash (the tiny preset's) would make the control fail for
# that reason alone. It writes under its own root (control_run/, or tiny_run/control/ with
# --tiny: base/, outs/, .cache/, report.md) and reads the main run's tokenizer (a symlink) and
# SFT checkpoint, so it never touches the main experiment. Override the injection with
# KAT_INJECT_STYLE, KAT_INJECT_RATE, KAT_INJECT_WHERE; on a machine without internet,
# KAT_LOCAL_DIR=nanochat/samples/kat reads the bundled pairs. After changing the injection, rerun
# what follows it: --force=kat_inject,train_rm,grpo_density,grpo_baseline,eval_diversity.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=speedrun.sh
source ./speedrun.sh

# The flags of each KAT stage for the preset in use: full or --tiny, each with or without --control.
kat_preset() {
    PAIRS_FLAGS=(--max_pairs=100000)
    RM_FLAGS=()
    GRPO_FLAGS=(--max_steps=5000 --learning_rate=1e-5 --beta=0.1 --density_k=10)  # the seed's flags, as written there
    EVAL_FLAGS=()
    INJECT_FLAGS=()
    if [ "$TINY" = 1 ]; then
        PAIRS_FLAGS=(--local_dir=nanochat/samples/kat --se_test_fraction=0.1)
        RM_FLAGS=(--device_batch_size=$TINY_CONV_ROWS --pairs_per_step=32 --num_epochs=2 --lr=1e-3 --head_lr=1e-2 --eval_every=-1)
        GRPO_FLAGS=(--max_steps=8 --prompts_per_step=$TINY_PROMPTS --samples_per_prompt=4 --max_new_tokens=48
                    --learning_rate=1e-3 --beta=0.1 --density_k=10 --eval_every=-1 --eval_prompts=8)
        EVAL_FLAGS=(--num_prompts=24 --num_samples=2 --max_tokens=48 --num_resamples=2000 --num_corpus_resamples=200)
    fi
    if [ "$CONTROL" = 1 ]; then
        # the densest half: the crowded regions density-aware sampling draws less often
        INJECT_FLAGS=(--inject_style="${KAT_INJECT_STYLE:-emdash}" --inject_rate="${KAT_INJECT_RATE:-0.5}"
                      --inject_where="${KAT_INJECT_WHERE:-dense}")
        # without the spelling drills, which cannot carry the tic and would only dilute it
        CONTROL_SFT_FLAGS=(--tic_style="${KAT_INJECT_STYLE:-emdash}" --tic_rate="${KAT_CONTROL_SFT_TIC_RATE:-0.3}"
                           --eval_metrics_every=-1 --simple_spelling_size=0 --spelling_bee_size=0)
        if [ "$TINY" = 1 ]; then
            # at the full LR the 2-layer model starts to write an em dash now and then
            CONTROL_SFT_FLAGS+=(--device_batch_size=$TINY_CONV_ROWS --target_examples_per_step=16 --num_iterations=60
                                --init_lr_frac=1.0 --eval_every=-1 --eval_steps=4 --smoltalk_size=200)
            RM_FLAGS=(--device_batch_size=$TINY_ROWS --pairs_per_step=16 --num_epochs=3 --lr=1e-3 --head_lr=1e-2 --eval_every=-1)
        else
            CONTROL_SFT_FLAGS+=(--num_iterations=100 --eval_every=-1 --eval_steps=20)
            # one GPU, about 20 minutes from an existing SFT model: a few thousand pairs, a short RM
            # run with a higher LR than the main one, and GRPO with a loose KL so that the planted
            # preference can move the policy within 80 steps
            if [ -n "${KAT_LOCAL_DIR:-}" ]; then
                PAIRS_FLAGS=(--local_dir="$KAT_LOCAL_DIR" --se_test_fraction=0.1)
            else
                PAIRS_FLAGS=(--max_pairs=4000)
            fi
            RM_FLAGS=(--pairs_per_step=32 --num_iterations=150 --lr=2e-5 --head_lr=2e-3 --eval_every=-1)
            GRPO_FLAGS=(--max_steps=80 --prompts_per_step=16 --samples_per_prompt=8 --max_new_tokens=128
                        --learning_rate=2e-5 --beta=0.02 --density_k=10 --eval_every=-1 --eval_prompts=64 --save_every=20)
            EVAL_FLAGS=(--num_prompts=100 --num_samples=4 --max_tokens=192)
        fi
    fi
}

kat_stages() {
    local data="$NANOCHAT_KAT_CACHE/data"
    kat_preset
    if [ "$CONTROL" = 1 ]; then
        run_training_stage control_sft sft launch scripts.control_sft $DEVICE_FLAGS --run="$WANDB_RUN" \
            --source="$MAIN_SFT_DIR" "${CONTROL_SFT_FLAGS[@]}"
    fi
    run_stage kat_pairs "$data/pairs_all.jsonl" python -m scripts.kat_pairs "${PAIRS_FLAGS[@]}"
    run_stage kat_embed "$data/prompt_embeddings.npy" launch scripts.kat_embed $DEVICE_FLAGS --source=sft
    run_stage kat_density "$data/prompt_weights.jsonl" python -m scripts.kat_density $DEVICE_FLAGS --k=10 --beta=1.0
    run_stage embedding_map "$data/embedding_map.json" python -m nanochat.kat.embedding_map
    if [ "$CONTROL" = 1 ]; then
        # after kat_density: picking pairs by prompt density needs the weights; it rewrites
        # responses only, so the embeddings and weights stay valid
        run_stage kat_inject "$data/style_injection.json" python -m scripts.kat_inject "${INJECT_FLAGS[@]}"
    fi
    run_training_stage train_rm rm launch scripts.train_rm $DEVICE_FLAGS --run="$WANDB_RUN" "${RM_FLAGS[@]}"
    run_training_stage grpo_density grpo_density launch scripts.grpo $DEVICE_FLAGS --run="$WANDB_RUN" \
        "${GRPO_FLAGS[@]}" --density_aware=True --out_dir "$NANOCHAT_OUTS_DIR/grpo_density"
    run_training_stage grpo_baseline grpo_baseline launch scripts.grpo $DEVICE_FLAGS --run="$WANDB_RUN" \
        "${GRPO_FLAGS[@]}" --density_aware=False --out_dir "$NANOCHAT_OUTS_DIR/grpo_baseline"
    run_stage eval_diversity "$NANOCHAT_KAT_CACHE/diversity_report.md" launch scripts.eval_diversity $DEVICE_FLAGS \
        "${EVAL_FLAGS[@]}"
}

# --control: switch every output path to the control's own root; the tokenizer (and downloaded
# task data) are the main run's, linked, and the main SFT model is read, never written.
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
    if [ ! -e "$NANOCHAT_BASE_DIR/report/header.md" ] || forced report; then
        python -m nanochat.report reset
    fi
    echo "positive control under $CONTROL_ROOT (tokenizer $main_base/tok, starting from the SFT model $MAIN_SFT_DIR)"
}

kat_summary() {
    local outs="$NANOCHAT_OUTS_DIR"
    cat <<EOF

==================================================================== where everything is
report card:        ${NANOCHAT_REPORT_PATH:-$REPO_ROOT/report.md}
diversity report:   $NANOCHAT_KAT_CACHE/diversity_report.md (plots and JSON beside it)
checkpoints:        $outs/{base,mid,sft,rm,grpo_density,grpo_baseline}/ckpt.pt
training logs:      $outs/<stage>/training_log.txt, TensorBoard: tensorboard --logdir $outs
preference data:    $NANOCHAT_KAT_CACHE/data/ (pairs_all.jsonl, prompts_all.jsonl, prompt_weights.jsonl, stats.txt)
stage logs/timings: $LOG_DIR/

chat with a model:  python -m scripts.chat_cli -i grpo_density   (or -i grpo_baseline, -i sft)
web UI (both arms side by side, embedding map at /viz):  python -m scripts.chat_web
EOF
    if [ "$CONTROL" = 1 ]; then
        echo "positive control:   read the \"Positive control\" section of the diversity report first"
    fi
}

kat_main() {
    parse_options "$@"
    setup_environment
    if [ "$CONTROL" = 1 ]; then
        if [ "$TINY" = 1 ]; then
            nanochat_stages  # the CPU preset makes (or finds) its own tiny SFT model
        fi
        control_environment
    else
        nanochat_stages
    fi
    kat_stages
    generate_report
    kat_summary
}

kat_main "$@"
