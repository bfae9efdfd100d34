"""fp32 vs bf16 autocast training steps of the copy-head generator, alternating in one process.

Question + gold paragraph -> answer, squad-open train, batch 16, source 192 tokens, 2 threads;
blocks of 5 steps alternate fp32, bf16, fp32, bf16 on one model (so both see warm caches):

    python bench/bench_precision.py
"""

import sys
import time

import torch

sys.path.insert(0, "bench")
from _common import Passage, read_jsonl  # noqa: E402

from rag_ray.encoders import DEFAULT_ENCODER  # noqa: E402
from rag_ray.generator import Generator  # noqa: E402
from rag_ray.losses import rag_token_nll  # noqa: E402

torch.set_num_threads(2)
corpus = {d["id"]: Passage(d["title"], d["text"]) for d in read_jsonl("../shared/data/squad-open/corpus.jsonl")}
train = read_jsonl("../shared/data/squad-open/train.jsonl")[: 16 * 12]
gen = Generator.from_pretrained(DEFAULT_ENCODER, max_source_length=192, max_target_length=16, device="cpu")
opt = torch.optim.AdamW(gen.parameters(), lr=1e-4)
per_step: dict[str, list[float]] = {"fp32": [], "bf16": []}
for prec in ["fp32", "bf16", "fp32", "bf16"]:
    t = time.perf_counter()
    losses = []
    for s in range(5):
        rows = train[s * 16 : (s + 1) * 16]
        inputs = gen.build_inputs([r["question"] for r in rows], [[corpus[r["doc_id"]]] for r in rows])
        target = gen.build_targets([r["answers"][0] for r in rows])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            logits = gen(inputs["input_ids"], inputs["attention_mask"], target)
        loss = rag_token_nll(logits.float(), torch.zeros(16, 1), target, gen.pad_token_id).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 2))
    per_step[prec].append((time.perf_counter() - t) / 5)
    print(prec, round(per_step[prec][-1], 2), "s/step", losses, flush=True)
print(f"bf16 speed-up (second blocks): x{per_step['fp32'][-1] / per_step['bf16'][-1]:.2f}")
