#!/usr/bin/env bash
# The KAT experiment on top of the nanochat speedrun: does sampling RLHF prompts inversely to
# their density in embedding space reduce mode collapse compared with uniform sampling?
#
#   bash kat_speedrun.sh             # 8xH100: speedrun.sh's stages, then the experiment
#   bash kat_speedrun.sh --tiny      # everything on a 2-core CPU, offline, from bundled samples
#   bash kat_speedrun.sh --force=grpo_density,grpo_baseline   # rerun chosen stages
#   WANDB_RUN=kat NPROC_PER_NODE=8 bash kat_speedrun.sh
#   bash kat_speedrun.sh --control=sampler  # a control (sampler|tic|null), est. 15 min on one GPU, on an existing outs/sft
#   bash kat_speedrun.sh --tiny --control=null   # the same on a CPU, on the tiny preset's SFT model (plumbing only)
#   KAT_SEEDS=5 bash kat_speedrun.sh        # GRPO runs per arm (default 3; 1 with --tiny)
#   KAT_SHUFFLED=1 bash kat_speedrun.sh     # a third arm: the density weights shuffled across prompts
#   KAT_PARALLEL_RUNS=6 bash kat_speedrun.sh   # all GRPO runs at once if they are at most 6 (default: the GPUs), else one by one
#
# GRPO run i of an arm writes outs/grpo_<arm> (i = 0) or outs/grpo_<arm>_s<i> with --seed=42+i. With a
# GPU per run they all run at once, one GPU each; otherwise one after another over every GPU.
# Options, skip/resume and --rl are speedrun.sh's (runs/lib.sh); the --tiny sizes are runs/tiny.sh,
# the controls (what each plants, where it writes, its overrides) runs/control.sh.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=speedrun.sh
source ./speedrun.sh  # runs/lib.sh, nanochat_stages and the d20 run's flags

# ----------------------------------------------------------------------------- the full experiment's flags
# runs/tiny.sh and runs/control.sh replace them.
PAIRS_FLAGS=(--max_pairs=100000)
DENSITY_FLAGS=(--k=10 --beta=1.0)
RM_FLAGS=()
GRPO_FLAGS=(--max_steps=5000 --beta=0.1 --density_k=10)  # lr, advantages, KL: scripts.grpo's measured defaults
GRPO_SEEDS="${KAT_SEEDS:-3}"  # runs per arm: the arms' difference is measured against the spread between seeds
DIVERSITY_FLAGS=()
PREFETCH_STAGE=prefetch PREFETCH_FLAGS=()  # the preference data too
AFTER_PREFETCH=(start_pairs_build)  # runs/control.sh clears it: the control builds its own pairs in its own root
declare -A GRPO_SAMPLER=([density]=density [baseline]=uniform [shuffled]=shuffled)  # arm -> --prompt_sampling
declare -A GRPO_SEED_OFFSET=()  # arm -> added to its runs' seeds (the null control gives its arms different ones)
GRPO_ARMS=(density baseline)  # KAT_SHUFFLED=1 adds shuffled (check_kat_options)
RM_DISK_GB=40  # rm and rm_judge: ckpt.pt and up to 2 intermediate ones, weights and AdamW state (~6.7 GB each)
GRPO_RUN_DISK_GB=70  # one GRPO run: 21 weights-only trajectory checkpoints (2.2 GB, fp32) and 3 with AdamW state

# ----------------------------------------------------------------------------- the stages
# the preference pairs (CPU work and the Stack Exchange stream) build while the GPUs train; kat_stages waits
start_pairs_build() {
    start_background kat_pairs_build run_stage kat_pairs "$NANOCHAT_KAT_CACHE/data/pairs_all.jsonl" \
        python -m scripts.kat_pairs "${PAIRS_FLAGS[@]}"
}

kat_data_stages() {
    local data="$NANOCHAT_KAT_CACHE/data"
    # preference pairs from HH-RLHF, UltraFeedback and Stack Exchange in one schema, split train/test
    wait_background kat_pairs_build  # started after prefetch
    run_stage kat_pairs "$data/pairs_all.jsonl" python -m scripts.kat_pairs "${PAIRS_FLAGS[@]}"
    # every prompt embedded by the SFT model; its density among its k nearest neighbours -> sampling weights
    run_stage kat_embed "$data/prompt_embeddings.npy" launch scripts.kat_embed --source=sft
    run_stage kat_density "$data/prompt_weights.jsonl" python -m scripts.kat_density "${DEVICE_FLAGS[@]}" \
        "${DENSITY_FLAGS[@]}"
}

# queue_grpo_runs PREFIX [FLAGS...]: GRPO_SEEDS runs of each arm in GRPO_ARMS with the same steps and
# batch, seed index by seed index, as stages PREFIXgrpo_<arm>[_s<i>] (their outs/ folders) with
# --seed=42+i (+ GRPO_SEED_OFFSET[arm]); the arms differ only in the prompt sampler
queue_grpo_runs() {
    local prefix="$1" i arm stage
    shift
    for ((i = 0; i < GRPO_SEEDS; i++)); do
        for arm in "${GRPO_ARMS[@]}"; do
            stage="${prefix}grpo_$arm"
            if [ "$i" -gt 0 ]; then stage+="_s$i"; fi
            queue_training_stage "$stage" scripts.grpo --run="$WANDB_RUN" "${GRPO_FLAGS[@]}" "$@" \
                --prompt_sampling="${GRPO_SAMPLER[$arm]}" --seed=$((42 + i + ${GRPO_SEED_OFFSET[$arm]:-0})) \
                --out_dir "$NANOCHAT_OUTS_DIR/$stage"
        done
    done
}

kat_stages() {
    kat_data_stages
    # the prompts in 3-D for the web UI's /viz page
    run_stage embedding_map "$NANOCHAT_KAT_CACHE/data/embedding_map.json" python -m nanochat.kat.embedding_map
    # the reward model: the SFT backbone plus a scalar head, on the train pairs (Bradley-Terry)
    run_training_stage train_rm rm launch scripts.train_rm --run="$WANDB_RUN" "${RM_FLAGS[@]}"
    # the independent judge: a second reward model on the other half of the train pairs, never GRPO's reward
    run_training_stage train_rm_judge rm_judge launch scripts.train_rm --role=judge --run="$WANDB_RUN" "${RM_FLAGS[@]}"
    # GRPO from the SFT model; the runs of one seed index share the seed (runs/lib.sh runs them)
    queue_grpo_runs ""
    run_queued_stages
    # SFT and both arms sampled on the same held-out prompts: diversity, tics, paired statistics
    run_stage eval_diversity "$NANOCHAT_KAT_CACHE/diversity_report.md" launch scripts.eval_diversity \
        "${DIVERSITY_FLAGS[@]}"
}

# KAT_SEEDS and KAT_SHUFFLED, checked before the first stage rather than hours into the run
check_kat_options() {
    if ! [[ "$GRPO_SEEDS" =~ ^[1-9][0-9]*$ ]]; then
        echo "[FAIL] KAT_SEEDS must be a positive whole number (GRPO runs per arm), got '$GRPO_SEEDS'" >&2
        exit 2
    fi
    if [ "${KAT_SHUFFLED:-0}" = 1 ]; then
        GRPO_ARMS+=(shuffled)
    fi
    echo "GRPO arms: ${GRPO_ARMS[*]}, $GRPO_SEEDS run(s) each (--seed=42 to $((41 + GRPO_SEEDS)))"
}

kat_summary() {
    local outs="$NANOCHAT_OUTS_DIR" models="base,mid,sft,rm" arms seed_suffixes="" i
    if [ -e "$outs/rm_judge/ckpt.pt" ]; then models+=",rm_judge"; fi
    arms="$(IFS=,; echo "${GRPO_ARMS[*]}")"
    for ((i = 1; i < GRPO_SEEDS; i++)); do seed_suffixes+=",_s$i"; done
    if [ -n "$seed_suffixes" ]; then seed_suffixes="{$seed_suffixes}"; fi
    cat <<EOF

==================================================================== where everything is
report card:        ${NANOCHAT_REPORT_PATH:-$REPO_ROOT/report.md}
diversity report:   $NANOCHAT_KAT_CACHE/diversity_report.md (plots and JSON beside it)
checkpoints:        $outs/{$models}/ckpt.pt
GRPO runs:          $outs/grpo_{$arms}$seed_suffixes/ckpt.pt
training logs:      $outs/<stage>/training_log.txt, TensorBoard: tensorboard --logdir $outs
preference data:    $NANOCHAT_KAT_CACHE/data/ (pairs_all.jsonl, prompts_all.jsonl, prompt_weights.jsonl, stats.txt)
stage logs/timings: $LOG_DIR/

chat with a model:  python -m scripts.chat_cli -i grpo_density   (or -i grpo_baseline, -i sft)
web UI (both arms side by side, embedding map at /viz):  python -m scripts.chat_web
EOF
}

# ----------------------------------------------------------------------------- the run
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (tests/test_control_runs.py): the stages above only

parse_options "$@"  # --tiny, --rl, --control=KIND, --force[=stage,...], --help
if [ "$TINY" = 1 ]; then
    # shellcheck source=runs/tiny.sh
    source runs/tiny.sh
fi
if [ -n "$CONTROL" ]; then
    # shellcheck source=runs/control.sh
    source runs/control.sh
fi
setup_environment  # output folders, the Python environment (uv), the number of processes
check_kat_options  # KAT_SEEDS, KAT_SHUFFLED

if [ -n "$CONTROL" ]; then
    if [ "$TINY" = 1 ]; then
        nanochat_stages  # the CPU preset makes (or finds) its own tiny SFT model
    fi
    control_stages  # in the control's own root, the main run's tokenizer and SFT model linked
    generate_report
    control_summary
else
    check_disk "$NANOCHAT_BASE_DIR" "$DATA_DISK_GB" "the pretraining data and datasets"
    check_disk "$NANOCHAT_OUTS_DIR" $((OUTS_DISK_GB + RM_DISK_GB + GRPO_SEEDS * ${#GRPO_ARMS[@]} * GRPO_RUN_DISK_GB)) \
        "the checkpoints of $((GRPO_SEEDS * ${#GRPO_ARMS[@]})) GRPO runs and the rest"
    nanochat_stages
    kat_stages
    generate_report
    kat_summary
fi
