#!/usr/bin/env bash
# Every INTERVAL seconds, copy the training state, log and (once done) final checkpoint of every run under RUN
# into DEST and commit them on the current branch, amending the previous snapshot commit so the branch keeps one.
# Exits after the commit that holds every expected run's final checkpoint. Stop earlier with `kill PID`.
#   nohup scripts/testbed/commit_training.sh > runs/commit_training.out 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/testbed_v2}
DEST=${DEST:-training_v2}
INTERVAL=${INTERVAL:-1500}
EXPECTED=${EXPECTED:-mixtral-8e mixtral-32e}
SNAPSHOT="Training snapshot (scripts/testbed/commit_training.sh)"
while true; do
  finished=0
  for name in $EXPECTED; do
    run=$RUN/$name
    [ -d "$run" ] || continue
    mkdir -p "$DEST/$name"
    [ -f "$run/train.log" ] && cp "$run/train.log" "$DEST/$name/train.log"
    if [ -f "$run/training_report.json" ]; then
      cp "$run"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,training_report.json} "$DEST/$name/"
      rm -f "$DEST/$name/state.pt"
      finished=$((finished + 1))
    elif [ -f "$run/resume/state.pt" ]; then
      cp "$run/resume/state.pt" "$DEST/$name/state.pt"
    fi
  done
  [ -d "$DEST" ] && git add -A "$DEST"
  if ! git diff --cached --quiet; then
    message="$SNAPSHOT $(date -u +%FT%TZ): $(tail -qn1 "$DEST"/*/train.log 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
    if [ "$(git log -1 --format=%s | cut -c1-${#SNAPSHOT})" = "$SNAPSHOT" ]; then
      git commit -q --amend -m "$message"
    else
      git commit -q -m "$message"
    fi
    echo "$(date -u +%FT%TZ) committed $(git rev-parse --short HEAD)"
  fi
  [ "$finished" -eq "$(echo $EXPECTED | wc -w)" ] && exit 0
  sleep "$INTERVAL"
done
