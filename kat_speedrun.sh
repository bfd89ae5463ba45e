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
# Options, skip/resume and --rl are speedrun.sh's (runs/lib.sh); the --tiny sizes are runs/tiny.sh,
# the positive control (what it plants, where it writes, its overrides) runs/control.sh.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=speedrun.sh
source ./speedrun.sh  # runs/lib.sh, nanochat_stages and the d20 run's flags

# ----------------------------------------------------------------------------- the full experiment's flags
# runs/tiny.sh and runs/control.sh replace them.
PAIRS_FLAGS=(--max_pairs=100000)
RM_FLAGS=()
GRPO_FLAGS=(--max_steps=5000 --learning_rate=1e-5 --beta=0.1 --density_k=10)  # the seed's flags, as written there
DIVERSITY_FLAGS=()

# ----------------------------------------------------------------------------- the stages
kat_stages() {
    local data="$NANOCHAT_KAT_CACHE/data"
    # preference pairs from HH-RLHF, UltraFeedback and Stack Exchange in one schema, split train/test
    run_stage kat_pairs "$data/pairs_all.jsonl" python -m scripts.kat_pairs "${PAIRS_FLAGS[@]}"
    # every prompt embedded by the SFT model; its density among its k nearest neighbours -> sampling weights
    run_stage kat_embed "$data/prompt_embeddings.npy" launch scripts.kat_embed --source=sft
    run_stage kat_density "$data/prompt_weights.jsonl" python -m scripts.kat_density "${DEVICE_FLAGS[@]}" --k=10 --beta=1.0
    # the prompts in 3-D for the web UI's /viz page
    run_stage embedding_map "$data/embedding_map.json" python -m nanochat.kat.embedding_map
    if [ "$CONTROL" = 1 ]; then
        # the planted tic; after kat_density, which picks the pairs by prompt density. It rewrites
        # responses only, so the embeddings and weights stay valid
        run_stage kat_inject "$data/style_injection.json" python -m scripts.kat_inject "${INJECT_FLAGS[@]}"
    fi
    # the reward model: the SFT backbone plus a scalar head, on the train pairs (Bradley-Terry)
    run_training_stage train_rm rm launch scripts.train_rm --run="$WANDB_RUN" "${RM_FLAGS[@]}"
    # the independent judge: the same on the other half of the train pairs; GRPO never sees it
    run_training_stage train_rm_judge rm_judge launch scripts.train_rm --run="$WANDB_RUN" "${RM_FLAGS[@]}" --role=judge
    # GRPO twice from the SFT model, same seeds, steps and batch; only the prompt sampler differs
    run_training_stage grpo_density grpo_density launch scripts.grpo --run="$WANDB_RUN" \
        "${GRPO_FLAGS[@]}" --density_aware=True --out_dir "$NANOCHAT_OUTS_DIR/grpo_density"
    run_training_stage grpo_baseline grpo_baseline launch scripts.grpo --run="$WANDB_RUN" \
        "${GRPO_FLAGS[@]}" --density_aware=False --out_dir "$NANOCHAT_OUTS_DIR/grpo_baseline"
    # SFT and both arms sampled on the same held-out prompts: diversity, tics, paired statistics
    run_stage eval_diversity "$NANOCHAT_KAT_CACHE/diversity_report.md" launch scripts.eval_diversity \
        "${DIVERSITY_FLAGS[@]}"
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

# ----------------------------------------------------------------------------- the run
parse_options "$@"  # --tiny, --rl, --control, --force[=stage,...], --help
if [ "$TINY" = 1 ]; then
    # shellcheck source=runs/tiny.sh
    source runs/tiny.sh
fi
if [ "$CONTROL" = 1 ]; then
    # shellcheck source=runs/control.sh
    source runs/control.sh
fi
setup_environment  # output folders, the Python environment (uv), the number of processes

if [ "$CONTROL" = 1 ]; then
    if [ "$TINY" = 1 ]; then
        nanochat_stages  # the CPU preset makes (or finds) its own tiny SFT model
    fi
    control_environment  # the control's own root, the main run's tokenizer linked
    # its starting policy: the main SFT model fine-tuned briefly with the tic in some conversations
    run_training_stage control_sft sft launch scripts.control_sft --run="$WANDB_RUN" \
        --source="$MAIN_SFT_DIR" "${CONTROL_SFT_FLAGS[@]}"
else
    nanochat_stages
fi
kat_stages
generate_report
kat_summary
