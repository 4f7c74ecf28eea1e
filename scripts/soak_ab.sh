#!/bin/bash
# BEFORE / AFTER: work trees of the two commits (git worktree add /tmp/orig 8531316); writes /tmp/ab_*.json
# A/B: the same soak against the tree before this session (no admission control) and the current one.
for tree in ${BEFORE:-/tmp/orig} ${AFTER:-$PWD}; do
  name=$(basename $tree)
  (cd $tree && PYTHONPATH=$tree ${AFTER:-$PWD}/.venv/bin/python -m sarathi.cli serve --num-kv-blocks 40 --chunk-size 128 --threads 1 --port 8765 > /tmp/ab_server_$name.log 2>&1 &)
  for i in $(seq 120); do curl -s localhost:8765/health >/dev/null && break; sleep 1; done
  ${AFTER:-$PWD}/.venv/bin/sarathi bench soak --base-url http://127.0.0.1:8765 --num-requests 150 --max-output-tokens 64 --out /tmp/ab_$name.json > /tmp/ab_$name.log 2>&1
  pkill -f "sarathi.cli serve --num-kv-blocks 40" ; sleep 5
done
