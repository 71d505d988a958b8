#!/bin/bash
# One-seed sweep of GRPO settings around experiment=grpo_demo (rl=off, CPU, 1 thread per job, 16 at a time):
#   bash benchmarks/grpo_demo_grid.sh /tmp/grid   -> per job: the held-out accuracy curve [[RL step, accuracy], ...]
out=$1
mkdir -p $out
cat benchmarks/grpo_demo_grid.txt | xargs -P 16 -I{} bash -c 'set -- {}; name=$1; shift; OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 -m mtrain experiment=grpo_demo rl=off trainer=cpu task.export=false task.checkpoint_every_n_steps=1000 "$@" hydra.run.dir='"$out"'/$name > '"$out"'/$name.log 2>&1; echo "$name rc=$? $(python3 -c "import json;m=json.load(open(\"'"$out"'/$name/metrics.json\"));print(m[\"val_accuracy_curve\"])" 2>&1 | tail -1)"'
