# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it read these variables
# The tiny preset (--tiny): every stage of speedrun.sh and kat_speedrun.sh at toy size, on a laptop
# CPU, offline, from the bundled samples, in minutes. Sourced after runs/lib.sh's parse_options; it
# replaces the full run's flags with its own and puts every output under tiny_run/.
#
#   TINY_RUN_DIR=/tmp/t       outputs there instead (the end-to-end test points it at a temporary folder)
#   NPROC_PER_NODE=2          torchrun over 2 processes (gloo on CPU): the distributed code paths at tiny size
#   TINY_DEVICE_TYPE=cuda     the same on GPUs (NCCL)
#   TINY_DEPTH=8              a deeper model from the same samples (default 2): with cuda, the d8 SFT model the
#                             controls start from on one GPU (runs/control.sh)
#   OMP_NUM_THREADS_TINY=N    torch threads per process (default: the cores shared among the processes)
#   KAT_SEEDS=2               GRPO runs per arm (default 1)

# outputs never touch a full run's: base/, outs/, .cache/ and report.md under one folder
TINY_ROOT="${TINY_RUN_DIR:-$REPO_ROOT/tiny_run}"
export NANOCHAT_BASE_DIR="$TINY_ROOT/base"
export NANOCHAT_OUTS_DIR="$TINY_ROOT/outs"
export NANOCHAT_KAT_CACHE="$TINY_ROOT/.cache"
export NANOCHAT_REPORT_PATH="$TINY_ROOT/report.md"
export NANOCHAT_TASKS_OFFLINE=1

NPROC="${NPROC_PER_NODE:-1}"
case "$NPROC" in
    1|2|4|8|16) ;;
    *) echo "[FAIL] the tiny preset splits its 16-sequence micro-batches over the processes:" \
            "NPROC_PER_NODE must be 1, 2, 4, 8 or 16, got '$NPROC'" >&2; exit 1 ;;
esac
TINY_ROWS=$((16 / NPROC))  # sequences per rank per micro-batch: the same total batch at any NPROC
TINY_CONV_ROWS=$(( TINY_ROWS < 8 ? TINY_ROWS : 8 ))  # conversations (SFT) or pairs (RM) per rank: 16 per step
TINY_PROMPTS=$(( NPROC > 4 ? NPROC : 4 ))  # RL prompts per step: 4, and at least one per rank
# torch threads: the cores shared among the processes. nproc reports OMP_NUM_THREADS when it is set, so
# it runs without it; macOS has no nproc
if command -v nproc >/dev/null 2>&1; then
    TINY_CORES="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
else
    TINY_CORES="$(getconf _NPROCESSORS_ONLN)"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS_TINY:-$(( TINY_CORES / NPROC > 0 ? TINY_CORES / NPROC : 1 ))}"
DEVICE_FLAGS=(--device_type="${TINY_DEVICE_TYPE:-cpu}")

# ----------------------------------------------------------------------------- nanochat's stages
DATA_DISK_GB=0 OUTS_DISK_GB=0 RM_DISK_GB=0 GRPO_RUN_DISK_GB=0  # a few hundred MB in all: no disk check
TOK_TRAIN_FLAGS=(--vocab_size=4096 --max_chars=20000000)
# --identical_batches: the bundled validation file has only 2 row groups, too few to give each of 4
# or 8 ranks its own, and with it any NPROC trains on the tokens one process does
BASE_TRAIN_FLAGS=(--depth="${TINY_DEPTH:-2}" --max_seq_len=256 --device_batch_size="$TINY_ROWS" --total_batch_size=4096
                  --num_iterations=120 --eval_every=60 --eval_tokens=16384 --core_metric_every=-1
                  --sample_every=120 --save_every=60 --identical_batches=true)
BASE_LOSS_FLAGS=(--device_batch_size="$TINY_ROWS" --split_tokens=16384 --identical_batches=true)
BASE_EVAL_FLAGS=(--bundle=sample)  # the bundled CORE sample
MID_TRAIN_FLAGS=(--device_batch_size="$TINY_ROWS" --total_batch_size=4096 --num_iterations=40 --eval_every=20
                 --eval_tokens=8192 --simple_spelling_size=200 --spelling_bee_size=200)
CHAT_SFT_FLAGS=(--device_batch_size="$TINY_CONV_ROWS" --target_examples_per_step=16 --num_iterations=20
                --eval_every=10 --eval_steps=4 --eval_metrics_every=-1 --smoltalk_size=200)
CHAT_RL_FLAGS=(--examples_per_step="$TINY_PROMPTS" --num_samples=4 --max_new_tokens=64 --num_iterations=4
               --eval_every=-1 --eval_examples=8 --eval_samples=2)
CHAT_EVAL_FLAGS=(--max_problems=20 --max_new_tokens=64)

# ----------------------------------------------------------------------------- the KAT experiment's stages
PAIRS_FLAGS=(--local_dir=nanochat/samples/kat --se_test_fraction=0.1)  # the bundled preference pairs
RM_FLAGS=(--device_batch_size="$TINY_CONV_ROWS" --pairs_per_step=32 --num_epochs=2 --lr=1e-3 --head_lr=1e-2
          --eval_every=-1)
GRPO_FLAGS=(--max_steps=8 --prompts_per_step="$TINY_PROMPTS" --samples_per_prompt=4 --max_new_tokens=48
            --learning_rate=1e-3 --beta=0.1 --density_k=10 --eval_every=-1 --eval_prompts=8 --save_every=2)
GRPO_SEEDS="${KAT_SEEDS:-1}"  # one run per arm keeps the preset within its minutes
DIVERSITY_FLAGS=(--num_prompts=24 --num_samples=2 --max_tokens=48 --num_resamples=2000 --num_corpus_resamples=200
                 --tiny=true)  # the report says plainly that none of it is evidence
