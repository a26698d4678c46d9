"""A seeded, randomly initialised tiny Llama (a few MB) with the default model's tokenizer.

Usage as a script: python tiny_model.py OUT_SNAPSHOT.thaw [SEED] [PROMPT]  (builds the model
beside OUT, forks PROMPT on it and saves the snapshot to OUT)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def build_tiny_model(
    folder: Path,
    *,
    initializer_range: float = 0.5,
    seed: int = 0,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    dtype: str = "bfloat16",
) -> Path:
    """Build (once) a seeded random tiny Llama in ``folder`` with the default model's tokenizer.

    ``initializer_range`` sets how much the output depends on the prompt: 0.5 (the default)
    makes different prompts give different tokens. Another ``seed`` gives a model of the same
    shapes with other weights. Head counts that divide by N make a model a tensor-parallel
    engine of N ranks can shard (4 and 2 for TP=2); ``dtype`` is the checkpoint's (and so the
    engine's default) dtype: float32 makes greedy output independent of the batch.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thaw_agents.models import default_model

    if (folder / "config.json").exists():
        return folder
    src = default_model(progress=False)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def main() -> None:
    import thaw_agents

    out = Path(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    prompt = sys.argv[3] if len(sys.argv) > 3 else "A prompt for a different model. " * 20
    folder = build_tiny_model(out.parent / ("tiny-llama" if seed == 0 else f"tiny-llama-{seed}"), seed=seed)
    llm = thaw_agents.make_llm(str(folder), max_model_len=1024, seed=0)
    handle = thaw_agents.fork(llm, prompt)
    handle.save(out)


if __name__ == "__main__":
    main()
