#!/usr/bin/env bash
# Train the second testbeds one after the other (8 experts, then 32), same budget and data order each.
# EXPERTS="8" and EXPERTS="32" may run at the same time, one thread each.
# Rerunning continues where it stopped: every run resumes from OUTPUT/resume/state.pt and a finished run
# (training_report.json present) is skipped. Needs runs/corpus_v2/train.jsonl.gz (scripts/testbed/build_corpus.py).
#   PYTHON=/path/to/python TOKENS=8000000 nohup scripts/testbed/train_v2.sh > runs/train_v2.out 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
PYTHON=${PYTHON:-python}
RUN=${RUN:-runs/testbed_v2}
TOKENS=${TOKENS:-8000000}
# Per-layer load balancing (replaces transformers' pooled loss) and router z-loss; see train.py. The balance
# weight is the smallest tried that keeps every expert above 1% of held-out tokens, per size
# (benchmarks/results/testbed.md); BALANCE overrides both.
BALANCE_8E=${BALANCE:-0.01}
BALANCE_32E=${BALANCE:-0.1}
ZLOSS=${ZLOSS:-0.001}
# bf16 autocast: about 1.25x the tokens/s of fp32 on this CPU (weights and optimizer stay float32).
AUTOCAST=${AUTOCAST:-bfloat16}
EXPERTS=${EXPERTS:-8 32}
for experts in $EXPERTS; do
  output=$RUN/mixtral-${experts}e
  [ -f "$output/training_report.json" ] && continue
  balance=$BALANCE_8E
  [ "$experts" = 32 ] && balance=$BALANCE_32E
  "$PYTHON" -m hf_moeprune.testbed.train --experts "$experts" --tokens "$TOKENS" --batch-size 16 --seq-len 256 \
    --tokenizer hf_moeprune/testbed/data/tokenizer --documents runs/corpus_v2/train.jsonl.gz \
    --balance-coef "$balance" --router-z-coef "$ZLOSS" --autocast "$AUTOCAST" --threads 1 --log-every 20 \
    --checkpoint-every 100 --resume --usage-documents hf_moeprune/testbed/data/heldout.jsonl.gz \
    --output "$output"
done
