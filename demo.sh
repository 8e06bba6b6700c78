#!/usr/bin/env bash
# The offline end-to-end run of the recipe on CPU (or a GPU: DEVICE=cuda), in minutes: the living documentation.
#
#   bash demo.sh                      # everything into out/demo (about 4.5 minutes on 2 CPU cores)
#   OUT=/tmp/d N_SYNTH=40 TEACHER_STEPS=3 STUDENT_STEPS=3 MAX_NEW=12 bash demo.sh
#                                     # the smoke run of tests/test_demo.py: 3-step models, 12 new tokens per answer
#                                     # (without MAX_NEW=12 most of its time goes to 8 answers of 400 tokens);
#                                     # about 3 minutes of CPU time on 2 cores
#   STOP_AFTER=windows bash demo.sh   # only up to Phase 3: what ablate.py reuses (it runs this when they are missing)
#   OUT=out/demo_gpu DEVICE=cuda bash demo.sh   # every phase on a GPU (about 3 minutes on one H200)
#
# No network: a byte-level BPE tokenizer and a tiny teacher are trained here from the bundled and generated
# physics records, then the four phases distil the teacher into a smaller student, which then generates.
# Each step says what it does and skips itself when its output is complete, so a killed run just continues
# (the two trainings with --resume: from their last checkpoint, or from step 0 when there is none).
# The real recipe (Qwen3-30B-A3B-Thinking-2507 -> Qwen3-1.7B on one GPU) runs the same scripts: see README.md.
#
# Numbers that differ from the model card, and why: both models start from random weights here, so the
# learning rates are 3e-3 -> 3e-4 instead of the card's 5e-6 -> 5e-7 (which fine-tune a pretrained 1.7B), the
# runs are a few hundred steps. Training uses the card's BF16 autocast (FP32 master weights), which a CPU with
# AVX-512 BF16 or AMX runs faster than float32; on an older CPU pass float32 by editing SCRATCH.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out/demo}
PY=${PYTHON:-python}
N_SYNTH=${N_SYNTH:-1500}            # generated records, on top of the 42 hand-written ones
TEACHER_STEPS=${TEACHER_STEPS:-90}    # optimizer steps of 32 windows for the tiny teacher
STUDENT_STEPS=${STUDENT_STEPS:-220} # ... and for the student
MAX_NEW=${MAX_NEW:-400}              # tokens the student may generate at the end
DEVICE=${DEVICE:-cpu}
TEACHER_CONFIG=${TEACHER_CONFIG:-data/teacher_config.json}  # ablate.py --scale large: data/teacher_large_config.json
DATA="data/physics_cot.jsonl $OUT/data/synth.jsonl"
SCRATCH="--lr 3e-3 --min_lr 3e-4 --warmup 10 --dtype bfloat16 --save_dtype float32 --device $DEVICE --log_every 25"
# 32 windows per optimizer step as on the card, but in fewer, larger micro-batches than the card's 16 of 2: the
# same step with larger matrix products. Measured on 2 cores: the teacher is fastest in 4 micro-batches of 8 on
# average, the smaller student in 2 of 16 (about 6% faster than 4 of 8). train.py cuts each step's windows by
# length where the fewest tokens are padding (3% of the teacher's, against 11% in equal micro-batches of 8)
TEACHER_BATCH="--batch_size 8 --grad_accum 4"
STUDENT_BATCH="--batch_size 16 --grad_accum 2"
start=$(date +%s)
say() { printf '\n== [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

say "1/9 records: the 42 bundled physics chains of thought + $N_SYNTH generated ones (data/synth.py)"
if [ -f "$OUT/data/synth.jsonl" ]; then echo "already there"; else
  $PY data/synth.py --n "$N_SYNTH" --seed 0 --out "$OUT/data/synth.jsonl"; fi

say "2/9 tokenizer: byte-level BPE with Qwen3's special tokens and the DualMind tags (data/tokenizer.py)"
if [ -f "$OUT/tokenizer/tokenizer_config.json" ]; then echo "already there"; else
  $PY data/tokenizer.py --data $DATA --vocab_size 2048 --out "$OUT/tokenizer"; fi

say "3/9 tokens and roles only (cache_teacher.py --teacher none), to train the tiny teacher on"
$PY cache_teacher.py --data $DATA --teacher none --tokenizer "$OUT/tokenizer" --out "$OUT/cache_tokens"

say "4/9 the tiny teacher: 4 layers, hidden 256, plain next-token training (train.py --kd_alpha 0)"
$PY train.py --init scratch --config "$TEACHER_CONFIG" --cache "$OUT/cache_tokens" --kd_alpha 0 \
  --no_proof_weight --max_steps "$TEACHER_STEPS" --eval_every 0 --ckpt_every 50 $SCRATCH $TEACHER_BATCH \
  --out "$OUT/teacher" --resume

say "5/9 Phase 1: one teacher pass into the top-64 cache, the teacher in bf16 as on the card (cache_teacher.py)"
# 2,048 tokens per forward instead of the default 16,384 (sized for a GPU): on 2 CPU cores 13% faster, the
# activations staying in cache
$PY cache_teacher.py --data $DATA --teacher "$OUT/teacher" --out "$OUT/cache" --dtype bfloat16 --device "$DEVICE" \
  --batch_tokens 2048

say "6/9 Phase 2: the DISC pass over the teacher's entropy (topology.py)"
$PY topology.py --cache "$OUT/cache" --out "$OUT/topology"

say "7/9 Phase 3: topology-guided windows and the curriculum (windows.py)"
$PY windows.py --cache "$OUT/cache" --topology "$OUT/topology" --out "$OUT/windows"
if [ "${STOP_AFTER:-}" = windows ]; then say "STOP_AFTER=windows: data, teacher, cache, topology, windows ready"; exit 0; fi

say "8/9 Phase 4: distil into the student, 2 layers, hidden 128 (train.py)"
$PY train.py --init scratch --config data/student_config.json --cache "$OUT/cache" --topology "$OUT/topology" \
  --windows "$OUT/windows" --max_steps "$STUDENT_STEPS" --eval_every 50 --ckpt_every 50 $SCRATCH \
  $STUDENT_BATCH --out "$OUT/student" --resume

say "9/9 the student and the teacher answer four new questions, one per domain, in the DualMind format (generate.py)"
cat > "$OUT/prompts.jsonl" <<'EOF'
{"prompt": "A simple pendulum is 1.5 m long. What is its period for small oscillations, with g = 9.81 m/s^2?"}
{"prompt": "A ball is launched at 20 m/s at 45 degrees above level ground. Neglecting air resistance and taking g = 9.81 m/s^2, find its range."}
{"prompt": "A capacitor of 2 uF is charged to 12 V. How much energy does it store?"}
{"prompt": "What is the Schwarzschild radius of a 3 solar-mass black hole?"}
EOF
# greedy, so that a run's answers can be compared, with the card's repetition penalty of 1.15 (generate.py's default):
# without it a tiny model loops ("= 2.81) = 2.81) ...") and the layout breaks (measured on data/new_questions.jsonl)
GEN="--temperature 0 --max_new_tokens $MAX_NEW --dtype float32 --device $DEVICE"
for who in student teacher; do  # the answers go to the file, the speed and the check of each to the terminal
  echo "the $who:"
  $PY generate.py --model "$OUT/$who" --prompts_jsonl "$OUT/prompts.jsonl" --check $GEN 2>&1 >"$OUT/answers_$who.jsonl"
done

say "summary"
$PY - "$OUT" <<'EOF'
import json, sys
from checkpoint import read_student
out = sys.argv[1]
answers = {who: [json.loads(l) for l in open(f"{out}/answers_{who}.jsonl")] for who in ["student", "teacher"]}
first = answers["student"][0]
print(f"the student's greedy answer to {first['prompt']!r}:\n<explore>{first['output']}\n")
m = read_student(f"{out}/student")  # train.py's folder, read through checkpoint.py
a, b = m["first_eval"], m["last_eval"]
if a and b:
    print(f"student held-out KL to the teacher (T=2, top-64 + tail): {a['kl']:.4f} before distillation -> "
          f"{b['kl']:.4f} after; CE {a['ce']:.3f} -> {b['ce']:.3f}; top-1 agreement {a['top1']:.3f} -> "
          f"{b['top1']:.3f}")
else:
    print(f"student held-out evaluations missing (first {a}, last {b}): see {out}/student/train_log.jsonl")
ok = {who: [a["check"]["ok"] for a in answers[who]] for who in answers}
s, t, n = sum(ok["student"]), sum(ok["teacher"]), len(ok["student"])
print(f"DualMind layout (explore, examine, response, in order) in greedy answers to {n} new questions: "
      f"student {s} of {n}, teacher {t} of {n}")
print("the student " + ("learned the layout" if s == n else "has NOT fully learned the layout in this budget"
      if s else "did NOT learn the layout in this budget") + "; the layout, not the physics: the arithmetic of "
      "a 0.7M-parameter student is not to be trusted")
EOF
echo "demo finished in $(( $(date +%s) - start ))s; outputs in $OUT (open $OUT/windows/report.html in a browser)"
