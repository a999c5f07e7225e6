"""The GPT language model, following karpathy/nanoGPT's model.py top to bottom.

Same architecture and parameter names as nanoGPT (pre-LayerNorm blocks, GELU MLP,
`scaled_dot_product_attention`, token embedding tied to the output head, vocabulary
padded to 50304), so a nanoGPT `ckpt.pt` loads into it unchanged.

Generation adds one thing nanoGPT lacks: a `KVCache`, so each new token runs the model on
itself only. It gives the same logits as re-running the whole context (the training
forward is untouched), also past block_size, where the context is re-run cropped.

Training and evaluation add another: `model(idx, targets, return_logits=False)` computes the
loss through `head_cross_entropy`, a few hundred positions of the 50304-wide head at a time,
so the full (b, t, vocab) logits (and cross-entropy's three buffers of their size) never
exist; same loss and gradients as nanoGPT's `F.cross_entropy(lm_head(x))`, which the default
`return_logits=True` still computes.

References:
1) OpenAI's GPT-2 TensorFlow implementation: https://github.com/openai/gpt-2/blob/master/src/model.py
2) karpathy/nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from configs.schema import ModelConfig

# Prefixes that wrappers add to state-dict keys: torch.compile (`_orig_mod.`) and DDP (`module.`).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Most logits per chunk of head_cross_entropy: 2**24 is 64 MB in float32, ~333 positions of a 50304-wide
# head. Smaller chunks add per-chunk work (the weight gradient's sum); larger ones save no time on CPU
# and cost memory (BENCHMARKS.md, "Training (CPU)").
LOSS_CHUNK_LOGITS = 2**24


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # True: biases in Linears and LayerNorms, like GPT-2. False: a bit better and faster

    @classmethod
    def from_model_config(cls, model: ModelConfig) -> GPTConfig:
        return cls(**{f.name: getattr(model, f.name) for f in fields(cls)})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class LayerKVCache:
    """One layer's keys and values (B, nh, T, hs) of the positions seen so far, at most block_size."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0  # positions filled

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values of new positions after the cached ones; all of them so far."""
        B, nh, T, hs = k.shape
        start, end = self.length, self.length + T
        assert end <= self.block_size, f"the cache holds {self.block_size} positions; {end} were asked for"
        if self.keys is None or self.keys.shape[0] != B or self.keys.dtype != k.dtype:
            self.keys = k.new_empty(B, nh, self.block_size, hs)
            self.values = v.new_empty(B, nh, self.block_size, hs)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer for the positions generated so far (generation only).

    `model(idx, kv_cache=cache)` runs idx at the positions after the cached ones and adds
    them to the cache; `reset()` empties it (a new prefill)."""

    def __init__(self, config: GPTConfig):
        self.layers = [LayerKVCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reset(self) -> None:
        for layer in self.layers:
            layer.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # query, key, values for all heads in batch, with the head dimension moved forward
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None:
            # causal self-attention; (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T), flash kernels where available
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            # the new positions attend to all cached ones and causally among themselves
            start = kv_cache.length
            k, v = kv_cache.append(k, v)  # (B, nh, start + T, hs)
            mask = None  # a prefill (start 0) is causal; one new token sees every position
            if start > 0 and T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=start == 0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output head share one matrix
        # https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. Position embeddings are excluded by default; the token
        embedding is counted because it doubles as the output head's weight."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits and loss. With targets: logits at every position and the mean
        cross-entropy (targets of -1 are ignored); with return_logits=False the loss only
        (logits None), computed in chunks without ever holding the full logits: what the
        trainer and evaluation use. Without targets: logits of the last position only,
        which is all that generation needs.

        With a kv_cache, idx holds the positions after the cached ones (all of them when
        the cache is empty) and is added to the cache."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            return logits, None
        if not return_logits:
            return None, head_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final layer-normed activations (b, t, n_embd), which `lm_head` turns into logits:
        for scoring only some positions (HellaSwag's endings) without the full-vocabulary head."""
        device = idx.device
        b, t = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        assert start + t <= self.config.block_size, f"Cannot forward sequence of length {start + t}, block size is only {self.config.block_size}"
        pos = torch.arange(start, start + t, dtype=torch.long, device=device)  # shape (t)

        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        layer_caches = kv_cache.layers if kv_cache is not None else [None] * len(self.transformer.h)
        for block, layer_cache in zip(self.transformer.h, layer_caches):
            x = block(x, layer_cache)
        return self.transformer.ln_f(x)

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        fused: bool | None = None,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings (dim >= 2) only; biases
        and LayerNorm gains are not decayed. `fused=None` uses the fused kernel where
        the device supports it (CUDA and, since torch 2.4, CPU)."""
        param_dict = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for p in param_dict.values() if p.dim() >= 2]
        nodecay_params = [p for p in param_dict.values() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        if fused is None:
            fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (b, vocab_size) of the token after idx (b, t), from its last block_size tokens
        at positions 0.. as in training.

        With a cache that holds idx[:, :-1], only the newest token is run. Otherwise (an empty
        cache, or one that is full: absolute positions mean a window slid by one token shares
        nothing with the cached one) the cache is refilled from the cropped context, so the
        logits are those of the uncached forward either way."""
        block_size = self.config.block_size
        if kv_cache is not None and 0 < kv_cache.length < block_size:
            assert kv_cache.length == idx.size(1) - 1, "the cache must hold all of idx but its newest token"
            idx_cond = idx[:, -1:]
        else:
            idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
            if kv_cache is not None:
                kv_cache.reset()
        logits, _ = self(idx_cond, kv_cache=kv_cache)
        return logits[:, -1, :]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend the sequences idx (LongTensor (b, t)) by up to max_new_tokens sampled tokens.

        The context is cropped to the last block_size tokens. `generator` makes the
        sampling reproducible; `vocab_limit` (e.g. 50257) never samples the padding ids
        above GPT-2's real vocabulary; `top_k` keeps the k most likely tokens, `top_p` the
        smallest set whose probability reaches p. Once a row samples `stop_token` it repeats
        it, and generation ends when every row has. `use_cache=False` re-runs the whole
        context for every token (same tokens, slower). Call model.eval() first.
        """
        kv_cache = KVCache(self.config) if use_cache else None
        stopped = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self.next_logits(idx, kv_cache).float() / temperature
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("Inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            if top_p is not None and top_p < 1.0:
                logits = top_p_filter(logits, top_p)
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            if stop_token is not None:
                idx_next = idx_next.masked_fill(stopped, stop_token)
                stopped |= idx_next == stop_token
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None and bool(stopped.all()):
                break
        return idx


def head_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """The mean cross-entropy of the logits x @ weight.T against targets (-1: ignored), computed
    chunk_rows positions at a time (default: equal chunks of at most LOSS_CHUNK_LOGITS logits), so only one
    chunk's logits exist at any moment. Under autocast the matmuls run in its dtype and the
    softmax in float32, as autocast runs lm_head and F.cross_entropy. With gradients, the
    forward also computes them, chunk by chunk while the logits are at hand (HeadCrossEntropy)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if chunk_rows is None:  # equal chunks of at most LOSS_CHUNK_LOGITS logits
        chunks = math.ceil(x.size(0) * weight.size(0) / LOSS_CHUNK_LOGITS)
        chunk_rows = math.ceil(x.size(0) / chunks)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return HeadCrossEntropy.apply(x, weight, targets, chunk_rows)
    loss_sum, count, _, _ = _head_loss_and_grads(x, weight, targets, chunk_rows, with_grads=False)
    return loss_sum / count


class HeadCrossEntropy(torch.autograd.Function):
    """head_cross_entropy with gradients. d loss / d logits is softmax minus the one-hot target,
    so while a chunk's logits exist the forward turns them into that and takes x's gradient
    (it @ weight) and weight's (its transpose @ x, summed over chunks in float32). The same
    three matmuls as lm_head's forward and backward; the backward only scales the results."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        loss_sum, count, grad_x, grad_weight = _head_loss_and_grads(x, weight, targets, chunk_rows, with_grads=True)
        ctx.save_for_backward(grad_x, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_x, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count  # the loss is the sum over positions / count
        return grad_x * scale.to(grad_x.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None


def _head_loss_and_grads(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, with_grads: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss over x's rows, the count of scored ones, and (with_grads) the gradients of
    the sum w.r.t. x and weight (float32)."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):  # the casts below are explicit
        w = weight.to(dtype)
        grad_x = torch.empty_like(x) if with_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            loss_sum += _head_chunk(x[rows].to(dtype), w, targets[rows], grad_x[rows] if with_grads else None, grad_weight)
        count = (targets != -1).sum()
    return loss_sum, count, grad_x, grad_weight


def _head_chunk(
    x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, grad_x: torch.Tensor | None, grad_weight: torch.Tensor | None
) -> torch.Tensor:
    """The summed loss of one chunk of rows; with grad_x, writes their gradient there and adds the
    weight's to grad_weight. A function of its own, so the chunk's logits are freed on return."""
    ignored = (targets == -1)[:, None]
    targets = targets[:, None].masked_fill(ignored, 0)
    logits = x @ w.T
    logp_target = torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, targets)
    loss = -logp_target.masked_fill(ignored, 0.0).sum()
    if grad_x is None:
        return loss
    # softmax - one-hot, in the matmul's dtype; the target's p - 1 from float32, where it has the digits
    grad = torch.softmax(logits, dim=-1)
    del logits
    grad[torch.arange(len(targets), device=grad.device), targets[:, 0]] = (logp_target[:, 0].exp() - 1).to(grad.dtype)
    grad_x.copy_((grad @ w).masked_fill_(ignored, 0.0))  # ignored rows: their x gets no gradient …
    x = x.masked_fill(ignored, 0.0)  # … and adds nothing to the weight's
    if grad.dtype == torch.float32:
        grad_weight.addmm_(grad.T, x)
    else:
        grad_weight += grad.T @ x
    return loss


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of logits (b, vocab): keep the smallest set of most likely tokens whose
    probability reaches top_p (at least one token), set the others to -inf."""
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p, -float("Inf"))
    return logits.scatter(-1, sorted_ids, sorted_logits)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """State-dict keys without the `_orig_mod.` / `module.` prefixes that wrappers add."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def load_nanogpt_state_dict(model: GPT, state_dict: dict[str, Any]) -> GPT:
    """Load nanoGPT weights (`ckpt.pt['model']`), also from a compiled or DDP model.

    Older nanoGPT versions without flash attention saved a causal-mask buffer as
    `attn.bias`; it is not a weight and is dropped.
    """
    cleaned = strip_wrapper_prefixes(state_dict)
    expected = model.state_dict().keys()
    cleaned = {k: v for k, v in cleaned.items() if not (k.endswith(".attn.bias") and k not in expected)}
    model.load_state_dict(cleaned, strict=True)
    return model
