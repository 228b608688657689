#!/usr/bin/env bash
# Every number in docs/RESULTS.md, in the order the page gives them. Run from the repository root after
# `make venv`; results go to out/results/, plots to docs/. Takes about 1.5 hours on 2 cores, most of it the
# accuracy sweeps; the task models are trained once and cached in .cache/tasks (PRISM_CACHE moves it).
# The latency runs need root (ip netns, tc); without it `prism bench` reports why it skipped them.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
P=.venv/bin/prism
PY=.venv/bin/python
R=out/results
mkdir -p "$R" docs out/bench

# 1. Accuracy through exported bundles (onnxruntime), full model vs PRISM, count bias and sinks on/off
$P evaluate --task sst2 -P 2,4 --cr 1,2,4,8,16,32,64,128,256 --plot docs/sst2.png --save $R/sst2.json > $R/sst2.txt
$P evaluate --task longtext -P 2,4 --cr 1,2,4,8,16,32,64,128,256 --plot docs/longtext.png --save $R/longtext.json > $R/longtext.txt
$P evaluate --task digits -P 2,4 --cr 1,2,4,8,16,32 --plot docs/digits.png --save $R/digits.json > $R/digits.txt
$P evaluate --task wikitext -P 2,4,8 --cr 1,2,4,8,16,32,64,128 --plot docs/wikitext.png --save $R/wikitext.json > $R/wikitext.txt
$PY benchmarks/lm_context.py --devices 2,4,8 --json $R/lm_context.json  # how much context the GPT-2 uses

# 2. BERT-base shape (random weights): bytes, FLOPs, per-device time, latency over 100 Mbit/s links
$PY benchmarks/random_model.py --shape bert-base --out out/bench/bert-base
$P export out/bench/bert-base -P 2 --cr 128 --out out/bench/bert-base-p2-cr128 --overwrite
$P bench out/bench/bert-base-p2-cr128 --seq-len 512 --bandwidth 100mbit --sweep 10mbit,1gbit --repeats 5 \
    --plot docs/latency_vs_bandwidth.png --json > $R/bench_bert_base_p2_cr128.json
$PY benchmarks/paper_table.py --export out/bench/bert-base-p2-cr128 --seq-len 512 --devices 2,4,8 --cr 128 \
    --json $R/paper_table.json > $R/paper_table.txt

# 3. Exporter: MiniLM at P=4 (time, size), per-layer onnxruntime vs PyTorch eager, int8 weights
/usr/bin/time -f "%e s wall, %M kB max RSS" $P export sentence-transformers/all-MiniLM-L6-v2 -P 4 --cr 8 \
    --out out/bench/minilm-p4-cr8 --overwrite 2> $R/export_minilm_p4.txt
$P inspect out/bench/minilm-p4-cr8 --json > $R/inspect_minilm_p4.json
$PY benchmarks/layer_time.py --devices 4 --cr 8 --seq-len 256 --json > $R/layer_time_minilm.json
$PY benchmarks/layer_time.py --model out/bench/bert-base --devices 2 --cr 128 --seq-len 512 --repeats 20 \
    --json > $R/layer_time_bert_base.json
$PY benchmarks/quantization.py --samples 32 > $R/quantization.txt

# 4. Security (issue 8): 10,000 hostile messages per port against a live cluster; the cost of CurveZMQ
$PY -c "import sys; sys.path.insert(0, 'tests'); from conftest import save_tiny; from pathlib import Path; save_tiny('BertModel', Path('out/bench/tiny-bert'))"
$P export out/bench/tiny-bert -P 2 --cr 2 --out out/bench/tiny-bert-p2 --overwrite
$PY benchmarks/fuzz_runtime.py out/bench/tiny-bert-p2 --messages 10000 > $R/fuzz_runtime.json
$P bench out/bench/bert-base-p2-cr128 --seq-len 512 --bandwidth 100mbit --repeats 25 --curve both --json \
    > $R/bench_curve_cost.json
# issue 9: failover
$P export sentence-transformers/all-MiniLM-L6-v2 -P 3 --cr 1 --out out/bench/minilm-p3-cr1 --overwrite
$PY benchmarks/failover.py out/bench/minilm-p3-cr1 --requests 1000 --kill 2@3 --restart 2@8 --kill 0@13 \
    --restart 0@18 --json $R/failover_minilm_p3.json
# issue 10: Llama-3.2-1B shape (bytes, FLOPs) and the small Llama on WikiText-2
$PY benchmarks/random_model.py --shape llama-3.2-1b --out out/bench/llama-3.2-1b
$P export out/bench/llama-3.2-1b -P 2 --cr 128 --out out/bench/llama-3.2-1b-p2-cr128 --overwrite
$PY benchmarks/paper_table.py --export out/bench/llama-3.2-1b-p2-cr128 --seq-len 1024 --devices 2,4,8 --cr 128 \
    --json $R/paper_table_llama.json > $R/paper_table_llama.txt
$P evaluate --task wikitext-llama -P 2,4,8 --cr 1,4,16,64,128 --count-bias on --sinks on \
    --plot docs/wikitext_llama.png --save $R/wikitext_llama.json
$PY benchmarks/lm_context.py --task wikitext-llama --devices 2,4,8 --json $R/lm_context_llama.json
# issue 11: generation
$PY benchmarks/random_model.py --shape gpt2-medium --out out/bench/gpt2-medium
$PY benchmarks/generation.py perplexity --task wikitext --devices 2,4 --cr 1,4,16,64,128 --json $R/gen_perplexity_gpt2.json
$PY benchmarks/generation.py perplexity --task wikitext-llama --devices 2,4 --cr 1,4,16,64,128 --json $R/gen_perplexity_llama.json
$PY benchmarks/generation.py decode --model out/bench/gpt2-medium --seq-len 960 --new-tokens 63 --json $R/gen_decode_gpt2m.json
$PY benchmarks/generation.py ttft --model out/bench/gpt2-medium --seq-len 1023 --devices 2 --cr 128 --repeats 5 --json $R/gen_ttft_gpt2m.json
# issue 14: calibration
$P evaluate --task digits -P 2 --cr 4 --count-bias on --sinks on --calibrate-data task --calibrate-lr 0.01 --save $R/calib_digits.json
$PY benchmarks/calibration_longtext.py remote 0.003 150 on 4 > $R/calib_longtext.txt
$P evaluate --task sst2 -P 4 --cr 128 --count-bias on --sinks on --calibrate-data task --calibrate-time-budget 300 --save $R/calib_sst2.json
$P evaluate --task wikitext -P 8 --cr 128 --count-bias on --sinks on --calibrate-data task --calibrate-time-budget 300 --save $R/calib_wikitext.json
# issue 21: bundles for small boards (SmolLM2-135M as a float32 transformers folder; SMOLLM2 moves it)
SMOLLM2=${SMOLLM2:-/work/cache/smollm2-135m}
$PY benchmarks/bundles.py export --model "$SMOLLM2" --devices 4 --quantize none,int4,int8 --json $R/bundles.jsonl
$PY benchmarks/bundles.py quality --model "$SMOLLM2" --windows 16 --json $R/bundles.jsonl
$PY benchmarks/bundles.py runtime --model "$SMOLLM2" --arena both --rounds 2 --json $R/bundles.jsonl
$PY benchmarks/bundles.py encoder --json $R/bundles.jsonl
$PY benchmarks/bundles.py export --model out/bench/llama-3.2-1b --devices 4 --quantize none --max-seq-len 1024 \
    --json $R/bundles.jsonl
