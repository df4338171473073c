#!/usr/bin/env bash
# A new user's first day, run for real: a fresh clone of this repository and a fresh virtual
# environment, `pip install -e .`, then the commands of the README and the guides as they are
# written, each with a small budget appended (a few meta-steps, a few evaluation episodes), and a
# check that each left what it promises: the metrics table, the predictions file, figures and
# last.ckpt under the run folder, a resume through runs/<name>/latest/, the Task2Vec descriptors.
#
#   bash scripts/first_day.sh                # fresh clone + fresh venv (what CI runs)
#   bash scripts/first_day.sh --reuse-env    # the working tree's files in a temporary folder, with
#                                            # the current python and its packages (the test suite)
#
# FIRST_DAY_DIR=<folder> keeps the work folder (default: a temporary one, removed at the end).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
REUSE=${FIRST_DAY_REUSE_ENV:-0}
[ "${1:-}" = "--reuse-env" ] && REUSE=1
WORK=${FIRST_DAY_DIR:-$(mktemp -d)}
[ -z "${FIRST_DAY_DIR:-}" ] && trap 'rm -rf "$WORK"' EXIT
export WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$SECONDS

step() { echo; echo "first_day: \$ $*"; }
fail() { echo "first_day: FAILED: $*" >&2; exit 1; }
has() { [ -e "$1" ] || fail "missing $1"; echo "first_day: ok: $1"; }
# run a command, keep its output in $OUT (also shown), stop on a non-zero exit
run() { step "$@"; rc=0; OUT=$("$@" 2>&1) || rc=$?; [ "$rc" = 0 ] || { echo "$OUT" | tail -30; fail "exit $rc: $*"; }; echo "$OUT" | grep -E '^(tasklight|test/|wrote)' || true; }

if [ "$REUSE" = 1 ]; then
    mkdir -p "$WORK/tasklight"
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$WORK/tasklight"
    cd "$WORK/tasklight"
    PY=${FIRST_DAY_PYTHON:-python}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$(dirname "$(command -v "$PY")"):$PATH"
    command -v tasklight >/dev/null || fail "no tasklight command beside $PY"
else
    git clone -q "$REPO" "$WORK/tasklight"
    cd "$WORK/tasklight"
    python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
    # the README's set-up command (CPU runners: give pip the CPU index, PIP_INDEX_URL / PIP_EXTRA_INDEX_URL)
    run pip install -q -e .
fi

# budgets appended to the documented commands
SIN="--trainer.max_steps 20 --trainer.val_check_interval 10 --data.init_args.val_episodes 4 --data.init_args.test_episodes 8 --data.init_args.meta_batch_size 5"
OMNI="--trainer.max_steps 2 --trainer.val_check_interval 2 --data.init_args.meta_batch_size 2 --data.init_args.q_queries 2 --data.init_args.val_episodes 2 --data.init_args.test_episodes 4 --data.init_args.num_workers 0 --model.init_args.net.init_args.hidden 8"

# README, "Set up": a real job
run tasklight fit --config configs/maml_sinusoid.yaml $SIN
echo "$OUT" | grep -q '^test/mse ' || fail "no metrics table"
has runs/maml_sinusoid/latest/checkpoints/last.ckpt
ls runs/maml_sinusoid/latest/checkpoints/ | grep -q '^epoch=' || fail "no best checkpoint"
ls runs/maml_sinusoid/latest/plots/*.png >/dev/null || fail "no figures in runs/maml_sinusoid/latest/plots"
has runs/maml_sinusoid/latest/plots

# README, "The command line"
run tasklight fit  --config configs/maml_omniglot.yaml $OMNI
has runs/maml_omniglot/latest/checkpoints/last.ckpt
run tasklight fit  --config maml_omniglot $OMNI --test_after_fit false
run tasklight test --config configs/maml_omniglot.yaml --ckpt_path runs/maml_omniglot/latest/checkpoints/last.ckpt $OMNI
echo "$OUT" | grep -q '^test/acc ' || fail "no metrics table from test"
run tasklight predict --config configs/maml_omniglot.yaml --ckpt_path runs/maml_omniglot/latest/checkpoints/last.ckpt $OMNI
pred=$(echo "$OUT" | sed -n 's/^tasklight: predictions written to \([^ ]*\) .*/\1/p')
has "$pred"
has runs/maml_omniglot/latest/checkpoints/last.ckpt   # test and predict left `latest` where it was
run tasklight fit  --config configs/maml_omniglot.yaml --ckpt_path runs/maml_omniglot/latest/checkpoints/last.ckpt $OMNI --trainer.max_steps 3 --test_after_fit false
echo "$OUT" | grep -q 'tasklight: checkpoints: last' || fail "resume of maml_omniglot"
run tasklight fit  --config configs/maml_omniglot.yaml --data.init_args.n_way 20 $OMNI --test_after_fit false
run tasklight fit  --config configs/maml_sinusoid.yaml --print_config
echo "$OUT" | grep -q 'class_path: tasklight' || fail "--print_config printed no config"
run tasklight fit  --model MAMLModule --model.net MLP --data SinusoidDataModule --trainer.max_steps 3 --data.init_args.test_episodes 4
has runs/MAMLModule/latest/checkpoints/last.ckpt
run tasklight --version
echo "$OUT" | grep -q '^tasklight .*torch .*lightning' || fail "--version"
# a resume through latest/ (the README: `--ckpt_path runs/<name>/latest/...`)
run tasklight fit --config configs/maml_sinusoid.yaml --ckpt_path runs/maml_sinusoid/latest/checkpoints/last.ckpt $SIN --trainer.max_steps 30
echo "$OUT" | grep -q 'step=29\|last .*last.ckpt' || fail "resume"
# README: any other Lightning logger
run tasklight fit --config configs/maml_sinusoid.yaml --trainer.logger lightning.pytorch.loggers.CSVLogger $SIN --run_name csv
ls runs/csv/latest/*/version_*/metrics.csv >/dev/null || fail "no CSV metrics"

# docs/guides/episodic_datamodule.md: the guide's DataModule as the user's package my_pkg, from the command line
mkdir -p my_pkg
python - <<'PY'
import re
text = open("docs/guides/episodic_datamodule.md").read()
code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
open("my_pkg/__init__.py", "w").write(code.split("\ndata = ")[0])
PY
run tasklight fit --model MAMLModule --model.net MLP --data my_pkg.LineDataModule --trainer.max_steps 3
has runs/MAMLModule/latest/checkpoints/last.ckpt

# docs/task2vec.md: the pipeline
T2V="--trainer.max_steps 2 --data.init_args.num_workers 0 --trainer.limit_val_batches 1 --trainer.limit_test_batches 1"
run tasklight fit --config configs/task2vec_probe_omniglot.yaml $T2V --test_after_fit false
has runs/task2vec_probe_omniglot/latest/checkpoints/last.ckpt
run tasklight embed --config configs/task2vec_embed_omniglot.yaml --task2vec.mc_samples 1 --task2vec.max_examples 16
has runs/task2vec/omniglot_alphabets/descriptors.pt
run tasklight fit --config configs/task2vec_multitask_omniglot.yaml $T2V
echo "$OUT" | grep -q '^test/' || fail "no metrics table from the multi-task run on Task2Vec descriptors"

echo
echo "first_day: all commands ran and left their outputs ($((SECONDS - start)) s)"
