# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it read these variables
# The controls (kat_speedrun.sh --control=sampler|tic|null): runs whose answer is known, each able to
# fail. Sourced after runs/lib.sh's parse_options (and runs/tiny.sh with --tiny); control_stages runs one.
#
#   sampler  GRPO's reward gains a bonus for a marker (--plant_marker=auto: one the SFT model writes) on
#            the rarest density quintile's train prompts; both arms; eval_diversity --control=sampler
#   tic      a starting policy that writes em dashes now and then (control_sft); the policy RM plus a
#            bonus for an em dash on a fraction 0, 0.25, 0.5 of the train prompts; scripts.tic_control
#   null     the density arm on uniform weights (kat_density --beta=0) with other seeds than the
#            uniform arm; eval_diversity --control=null
# Each control writes under its own root, control_run/<kind>/ beside the main run's outs/ (or
# $NANOCHAT_CONTROL_DIR/<kind>), and reads the main run's tokenizer and SFT model (links), never writing
# them; the main run's diversity report lists every outcome found there.
#
#   KAT_SEEDS=3            GRPO runs per arm (per dose for tic): default 3, 1 with --tiny (plumbing only)
#   KAT_LOCAL_DIR=DIR      the preference pairs (default nanochat/samples/kat, the bundled ones: offline)
#   KAT_PARALLEL_RUNS=N    GRPO runs at once (default: all of a control's runs, sharing the GPU)

AFTER_PREFETCH=()  # the pairs are built in the control's own root, after control_environment
GRPO_SEEDS="${KAT_SEEDS:-3}"
PAIRS_FLAGS=(--local_dir="${KAT_LOCAL_DIR:-nanochat/samples/kat}" --se_test_fraction=0.1)
DENSITY_FLAGS=(--k=10 --beta=1.0)
TIC_DOSES=(0 0.25 0.5)
# the tic control's starting policy: SFT with em dashes in some conversations (GRPO amplifies only what
# the policy writes); without the spelling drills, which cannot carry the tic and would only dilute it
CONTROL_SFT_FLAGS=(--tic_style=emdash --tic_rate="${KAT_CONTROL_SFT_TIC_RATE:-0.3}" --eval_metrics_every=-1
                   --simple_spelling_size=0 --spelling_bee_size=0)
# the collapse-resistant objective (scripts.grpo's defaults, named): Dr. GRPO advantages, the KL in the reward
OBJECTIVE_FLAGS=(--adv_norm=none --kl=seq_reward --beta=0.1)
if [ "$TINY" = 1 ]; then
    GRPO_SEEDS="${KAT_SEEDS:-1}"  # the preset's minutes: one run per arm, so every verdict is "incomplete"
    CONTROL_SFT_FLAGS+=(--device_batch_size="$TINY_CONV_ROWS" --target_examples_per_step=16 --num_iterations=60
                        --init_lr_frac=1.0 --eval_every=-1 --eval_steps=4 --smoltalk_size=200)
    GRPO_FLAGS=(--max_steps=8 --prompts_per_step="$TINY_PROMPTS" --samples_per_prompt=4 --max_new_tokens=48
                --learning_rate=1e-3 "${OBJECTIVE_FLAGS[@]}" --density_k=10 --traj_every=4 --traj_prompts=8
                --save_every=4)
    PROBE_FLAGS=(--plant_probe_prompts=8 --plant_probe_samples=4)  # the marker's base rate, in seconds
    # the 2-layer control_sft model writes an em dash only now and then: more probes, a lower floor (plumbing only)
    TIC_PROBE_FLAGS=(--plant_probe_prompts=16 --plant_probe_samples=8 --plant_min_rate=0.005)
    TIC_CONTROL_FLAGS=(--tiny=true)
else
    # One GPU, a d8 SFT model made of the bundled samples; estimated, not yet measured: pairs, embeddings,
    # density and the RM (3 epochs of ~150 pairs) ~2 min; 6 GRPO runs of 150 steps side by side on the GPU
    # (16 prompts x 8 samples x 128 tokens, ~1.5 s a step alone, ~3 s shared) ~8 min; eval_diversity on
    # the final prompts (SFT + 6 models + their matched-KL points, 8 samples each) ~4 min: ~15 min of GPU time.
    # The tic control: control_sft ~1 min, then 9 runs (3 doses x 3 seeds) side by side ~12 min: ~16 min.
    CONTROL_SFT_FLAGS+=(--num_iterations=100 --eval_every=-1 --eval_steps=20)
    RM_FLAGS=(--pairs_per_step=32 --num_epochs=3 --lr=2e-5 --head_lr=2e-3 --eval_every=-1)
    # 1e-5, not scripts.grpo's 1e-6 (set for models of billions of parameters): a d8 policy must move within 150 steps
    GRPO_FLAGS=(--max_steps=150 --prompts_per_step=16 --samples_per_prompt=8 --max_new_tokens=128
                --learning_rate=1e-5 "${OBJECTIVE_FLAGS[@]}" --density_k=10 --traj_every=25 --traj_prompts=32
                --save_every=50)
    DIVERSITY_FLAGS=(--num_prompts=500 --num_samples=8 --max_tokens=128)
    PROBE_FLAGS=() TIC_PROBE_FLAGS=()  # scripts.grpo's: 64 prompts x 8 samples, the marker in 2% to 80% of them
    TIC_CONTROL_FLAGS=()
fi
case "$CONTROL" in
    sampler)
        # the marker the SFT model writes nearest a 25% base rate, rewarded by 1 RM spread on quintile 1 only
        GRPO_FLAGS+=(--plant_marker=auto --plant_quintile=1 --plant_fraction=1 --plant_bonus=1 --judge=
                    "${PROBE_FLAGS[@]}")
        DIVERSITY_FLAGS+=(--control=sampler --judge=) ;;
    tic)
        GRPO_ARMS=(baseline)  # the uniform sampler: the dose, not the sampler, is what varies
        GRPO_FLAGS+=(--plant_marker=— --plant_quintile=0 --plant_bonus=1 --judge= "${TIC_PROBE_FLAGS[@]}") ;;
    null)
        DENSITY_FLAGS=(--k=10 --beta=0)  # weights density^0: the density arm samples uniformly
        DIVERSITY_FLAGS+=(--control=null) ;;
esac
if [ -z "${KAT_PARALLEL_RUNS:-}" ] && [ "$TINY" != 1 ]; then
    # small runs leave a GPU mostly idle: all of them at once on the one GPU, each its own process
    if [ "$CONTROL" = tic ]; then
        export KAT_PARALLEL_RUNS=$((GRPO_SEEDS * ${#TIC_DOSES[@]}))
    else
        export KAT_PARALLEL_RUNS=$((GRPO_SEEDS * 2))
    fi
fi

# Every output path moves to the control's own root; the tokenizer (and downloaded task data) are
# the main run's, linked, and the main SFT model (MAIN_SFT_DIR) is read, never written: linked as
# outs/sft for sampler and null, the start of control_sft's own outs/sft for tic.
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
    # control_run/ beside outs/: where scripts.eval_diversity looks for the outcomes (nanochat.kat.controls)
    CONTROL_ROOT="${NANOCHAT_CONTROL_DIR:-$(dirname "$main_outs")/control_run}/$CONTROL"
    mkdir -p "$CONTROL_ROOT/base" "$CONTROL_ROOT/outs"
    [ -e "$CONTROL_ROOT/../.gitignore" ] || printf '*\n' > "$CONTROL_ROOT/../.gitignore"  # outputs, never source
    MAIN_SFT_DIR="$main_outs/sft"
    local links=("$CONTROL_ROOT/base/tok:$main_base/tok") link target
    if [ -d "$main_base/task_data" ]; then
        links+=("$CONTROL_ROOT/base/task_data:$main_base/task_data")  # control_sft's mixture, not downloaded twice
    fi
    if [ "$CONTROL" != tic ]; then
        links+=("$CONTROL_ROOT/outs/sft:$MAIN_SFT_DIR")  # the policy's start, the RM's backbone, the embedder
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
    echo "$CONTROL control under $CONTROL_ROOT (tokenizer $main_base/tok, starting from the SFT model $MAIN_SFT_DIR)"
}

# The control's stages, on kat_speedrun.sh's: its data and policy RM, its GRPO runs, its verdict.
control_stages() {
    control_environment
    if [ "$CONTROL" = tic ]; then
        run_training_stage control_sft sft launch scripts.control_sft --run="$WANDB_RUN" \
            --source="$MAIN_SFT_DIR" "${CONTROL_SFT_FLAGS[@]}"
    fi
    kat_data_stages
    run_training_stage train_rm rm launch scripts.train_rm --run="$WANDB_RUN" "${RM_FLAGS[@]}"
    local dose
    case "$CONTROL" in
        sampler)
            queue_grpo_runs ""
            run_queued_stages
            run_stage eval_diversity "$NANOCHAT_KAT_CACHE/control_outcome.json" launch scripts.eval_diversity \
                "${DIVERSITY_FLAGS[@]}" ;;
        null)
            run_training_stage train_rm_judge rm_judge launch scripts.train_rm --role=judge --run="$WANDB_RUN" \
                "${RM_FLAGS[@]}"
            GRPO_SEED_OFFSET["density"]="$GRPO_SEEDS"  # the density arm's seeds follow the uniform arm's
            queue_grpo_runs ""
            run_queued_stages
            run_stage eval_diversity "$NANOCHAT_KAT_CACHE/control_outcome.json" launch scripts.eval_diversity \
                "${DIVERSITY_FLAGS[@]}" ;;
        tic)
            for dose in "${TIC_DOSES[@]}"; do
                mkdir -p "$LOG_DIR/tic_dose_$dose"  # the runs' logs, beside their stage names
                queue_grpo_runs "tic_dose_$dose/" --plant_fraction="$dose"
            done
            run_queued_stages
            run_stage tic_control "$NANOCHAT_KAT_CACHE/control_outcome.json" python -m scripts.tic_control \
                "${TIC_CONTROL_FLAGS[@]}" ;;
    esac
}

control_summary() {
    cat <<EOF

==================================================================== the $CONTROL control
outcome:        $NANOCHAT_KAT_CACHE/control_outcome.json
its report:     $NANOCHAT_KAT_CACHE/$([ "$CONTROL" = tic ] && echo control_report.md || echo diversity_report.md) (the Controls section opens it)
report card:    $NANOCHAT_REPORT_PATH
GRPO runs:      $NANOCHAT_OUTS_DIR/$([ "$CONTROL" = tic ] && echo "tic_dose_*/")grpo_*/
stage logs:     $LOG_DIR/
The main run's diversity report lists this outcome (scripts.eval_diversity --controls_dir=$(dirname "$CONTROL_ROOT")).
EOF
    python -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(sys.argv[2] + " control: " + r["status"] + (" (tiny preset: not evidence)" if r["tiny"] else ""))' \
        "$NANOCHAT_KAT_CACHE/control_outcome.json" "$CONTROL"
}
