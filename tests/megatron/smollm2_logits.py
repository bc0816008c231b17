"""SmolLM2-135M (the real weights) in the megatron backend against transformers: logits of
a text, and packed logprobs/entropies. Prints one JSON line of relative differences.

    python tests/megatron/smollm2_logits.py
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kimi_rl.config import AlgoConfig, BackendConfig
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.megatron import MegatronPolicy, _micro, rope_freqs
from kimi_rl.policy.model import smollm2_dir
from kimi_rl.policy.packing import pack

TEXTS = ["The capital of France is Paris. The capital of Italy is",
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
         "12 + 30 = 42, and 42 * 2 ="]


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mp = MegatronPolicy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                        BackendConfig(name="megatron", logits_chunk=16), AlgoConfig())
    ids = [tok(t).input_ids for t in TEXTS]
    out = {"vocab": mp.shape.vocab_size, "layers": mp.shape.num_layers}
    with torch.no_grad():  # full logits of the first text, through the megatron modules
        pb = pack([ids[0][:1]], [ids[0][1:]], 4096)[0]
        mb = _micro(pb, 1, mp.device)
        gpt = mp.gpt
        h = gpt.decoder(hidden_states=gpt.embedding(input_ids=mb.input_ids, position_ids=None),
                        attention_mask=mb.segments,
                        rotary_pos_emb=rope_freqs(mb.position_ids, mp.shape.head_dim,
                                                  mp.shape.rope_theta))
        logits = h.transpose(0, 1) @ gpt.shared_embedding_or_output_weight().T
        ref = hf(torch.tensor([ids[0]])).logits
        out["logits"] = rel(logits, ref)
    hp = HFPolicy(hf, BackendConfig(), AlgoConfig())
    pb = pack([i[:3] for i in ids], [i[3:] for i in ids], 4096, row_tokens=96)[0]  # one row
    (a, ea), (b, eb) = mp.logprobs(pb), hp.logprobs(pb)
    out["packed_rows"] = list(pb.input_ids.shape)
    out["logprobs"], out["entropy"] = rel(a, b), rel(ea, eb)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
