#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
A="experiment=qwen3_30b_a3b_shape rl=on data.packing=true data.max_length=2048 data.batch_size=4 data.num_digits=3 data.num_train=60000 data.num_val=64 task.accuracy=false task.accuracy_before=false task.export=false trainer.enable_progress_bar=false trainer=fsdp task.checkpoints=false trainer.val_check_interval=1000 trainer.devices=1 task.compile=true trainer.max_steps=40"
for p in simple advanced; do
  timeout 200 python -m torch.distributed.run --standalone --nproc_per_node 1 -m mtrain $A trainer.profiler=$p hydra.run.dir=/tmp/r_$p > /tmp/log_$p.txt 2>&1
  tail -2 /tmp/log_$p.txt
  cp /tmp/r_$p/fit-profile.txt $OUT/fit-profile-$p.txt
  python -c "import json; m=json.load(open('/tmp/r_$p/metrics.json')); print('$p', m['tokens_per_s_steady'], m['seconds'])"
done
