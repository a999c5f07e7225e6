"""Sample completions of a prompt from a checkpoint, reproducibly.

The sampler draws from a torch.Generator seeded with `sample.seed`, so the same
checkpoint, prompt and settings give the same texts on the same device. Only GPT-2's
50257 real token ids are sampled, never the padding ids of the 50304-wide vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs.schema import SampleConfig
from gpt.checkpoint import load_model
from gpt.encoding import EOT, gpt2_encoding
from gpt.runtime import resolve_device, resolve_dtype



def sample(checkpoint_dir: str | Path, sample_config: SampleConfig, device: str = "auto") -> list[str]:
    """`sample.num_samples` texts, each the prompt followed by its completion."""
    torch_device = resolve_device(device)
    model, _ = load_model(checkpoint_dir, torch_device)
    dtype = resolve_dtype("auto", torch_device)
    encoding = gpt2_encoding()
    prompt = encoding.encode(sample_config.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    context = torch.tensor([prompt], dtype=torch.long, device=torch_device)
    generator = torch.Generator(device=torch_device).manual_seed(sample_config.seed)
    texts = []
    with torch.autocast(device_type=torch_device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(sample_config.num_samples):
            tokens = model.generate(
                context,
                sample_config.max_new_tokens,
                temperature=sample_config.temperature,
                top_k=sample_config.top_k,
                generator=generator,
                vocab_limit=encoding.n_vocab,
            )
            texts.append(encoding.decode(tokens[0].tolist()))
    return texts
