#!/usr/bin/env bash
# The quality report's device run (bench/results/quality.md): four bench/quality.py runs sharing one H100, each cut
# at LIMIT seconds, with everything packed into $OUT at the end. Prepare the carried folder here first:
#   mkdir -p .carry && tar cf - -C ../shared/models lincat-ref | xz -T0 > .carry/ref.tar.xz
#   cp -r ../shared/models/stories260K ../shared/data/corpus/heldout/gutenberg_00036_war_of_the_worlds.txt .carry/
#   python bench/pack_tokens.py ../shared/models/lincat-ref ../shared/data/corpus/train .carry/train.npy
#   python bench/pack_tokens.py ../shared/models/stories260K ../shared/data/corpus/train .carry/stories_train.npy \
#       --max-tokens 4000000
#   xz -T0 .carry/*.npy
# then run `bash bench/quality_device.sh` on the device with carry [".carry", ".whl"] (.whl: rich, pyyaml and
# their dependencies as wheels, see the device README).
set -u
LIMIT=${LIMIT:-530}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/c && tar xJf .carry/ref.tar.xz -C /tmp/c && xz -dc .carry/train.npy.xz > /tmp/c/train.npy && xz -dc .carry/stories_train.npy.xz > /tmp/c/stories_train.npy
python3 -c "import torch, transformers, peft, accelerate, rich, yaml; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name())"
R=/tmp/q; mkdir -p $R
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
Q="python3 bench/quality.py --heldout .carry/gutenberg_00036_war_of_the_worlds.txt --ppl-tokens 32768 --deadline $((LIMIT-120))"
timeout $LIMIT $Q --teacher /tmp/c/lincat-ref --train /tmp/c/train.npy --out $R/ref20 --work /tmp/w1 --tokens 2e7 --recipes lolcats --label "20M tokens (paper-scale budget)" > $R/ref20.log 2>&1 &
timeout $LIMIT $Q --teacher /tmp/c/lincat-ref --train /tmp/c/train.npy --out $R/ref5a --work /tmp/w2 --tokens 5e6 --recipes swa,hedgehog,lolcats,lolcats-hybrid > $R/ref5a.log 2>&1 &
timeout $LIMIT $Q --teacher /tmp/c/lincat-ref --train /tmp/c/train.npy --out $R/ref5b --work /tmp/w3 --tokens 5e6 --recipes liger,lolcats-kd,lolcats-2k,lolcats-shared > $R/ref5b.log 2>&1 &
timeout $LIMIT $Q --teacher .carry/stories260K --train /tmp/c/stories_train.npy --out $R/stories --work /tmp/w4 --tokens 2e6 --seq-len 256 --batch 16 --lengths 256,512 --recipes swa,hedgehog,lolcats,liger,lolcats-kd,lolcats-hybrid > $R/stories.log 2>&1 &
wait
nvidia-smi --query-gpu=name,memory.used --format=csv
cat $R/*/quality.md > $OUT/quality_all.md
for d in $R/*/; do cp $d/deltas.tar.gz $OUT/deltas_$(basename $d).tar.gz; done  # for PIQA here
tail -n 30 $R/*.log
tar czf $OUT/quality_logs.tar.gz -C $R --exclude=deltas.tar.gz .
ls -la $OUT
