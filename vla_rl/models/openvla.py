"""OpenVLA (Prismatic) and OpenVLA-OFT policies with a value head, for RL fine-tuning.

Architecture as released: a fused DINOv2 + SigLIP vision backbone (timm; second-to-last block's
patch features, concatenated), a 3-layer GELU MLP projector, and a Llama backbone (transformers).
The 256 projected patches go right after BOS. Actions are the last `n_action_bins` ids of Llama's
vocabulary; every distribution here is the softmax over those ids only.

OpenVLA decodes its 7 action tokens causally. OpenVLA-OFT (`decoding="parallel"`) appends C*7
empty action slots after the prompt and predicts all of them in one forward pass, the slots
attending to the prompt and to each other (bidirectionally).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD, VLAConfig


class VisionBackbone(nn.Module):
    """DINOv2 (`featurizer`) + SigLIP (`fused_featurizer`) patch features, concatenated."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        towers = [
            timm.create_model(
                model_id,
                pretrained=False,
                num_classes=0,
                img_size=size,
                act_layer=act,
                **overrides,
            )
            for model_id, size, act, overrides in zip(
                config.timm_model_ids,
                config.image_sizes,
                config.timm_override_act_layers,
                config.timm_overrides,
                strict=False,
            )
        ]
        self.featurizer = towers[0]
        self.fused_featurizer = towers[1]
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    @staticmethod
    def _penultimate(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        # OpenVLA reads the output of the second-to-last block, without the final norm and
        # without prefix (CLS / register) tokens.
        return tower.get_intermediate_layers(pixels, n={len(tower.blocks) - 2})[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 6, H, W] (DINO-normalised RGB, then SigLIP-normalised) -> [B, P, D]."""
        dino = self._penultimate(self.featurizer, pixel_values[:, :3])
        siglip = self._penultimate(self.fused_featurizer, pixel_values[:, 3:])
        return torch.cat([dino, siglip], dim=-1)


class Projector(nn.Module):
    """Prismatic's fused-gelu-mlp: D -> 4D -> hidden -> hidden."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(features)))))


class ValueHead(nn.Module):
    """MLP critic on the last-layer hidden state of the last prompt token: hidden -> ... -> 1."""

    def __init__(self, hidden_size: int, hidden_sizes: Sequence[int] = (512, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = hidden_size
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        # A zero last layer starts every value at 0, so early advantages are the raw returns
        # instead of noise from a random critic.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden).squeeze(-1)


@dataclass
class PolicyOutput:
    """What one policy call produces for a batch of B observations (K = action_dim * chunk)."""

    action_tokens: torch.Tensor  # [B, K] int64 token ids
    logprobs: torch.Tensor  # [B, K] token log-probs under the sampling distribution
    entropy: torch.Tensor  # [B, K]
    values: torch.Tensor  # [B] value of the observation (OFT: of the chunk's start)
    logits: torch.Tensor  # [B, K, n_bins] action-restricted logits (before temperature)


@dataclass
class PromptBatch:
    """Tokenised prompts, left-padded; each row starts with BOS."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] bool


def preprocess_images(
    images: torch.Tensor,
    image_size: int = 224,
    dino_mean: Sequence[float] = DINO_MEAN,
    dino_std: Sequence[float] = DINO_STD,
    siglip_mean: Sequence[float] = SIGLIP_MEAN,
    siglip_std: Sequence[float] = SIGLIP_STD,
) -> torch.Tensor:
    """uint8 RGB [B, H, W, 3] -> float32 [B, 6, H, W] (DINO-normalised, then SigLIP-normalised)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 RGB, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [B, H, W, 3], got {tuple(images.shape)}")
    if images.shape[1] != image_size or images.shape[2] != image_size:
        raise ValueError(
            f"images must be {image_size}x{image_size}, got {images.shape[1]}x{images.shape[2]}"
        )
    x = images.permute(0, 3, 1, 2).float() / 255.0
    out = []
    for mean, std in ((dino_mean, dino_std), (siglip_mean, siglip_std)):
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        out.append((x - m) / s)
    return torch.cat(out, dim=1)


class OpenVLAPolicy(nn.Module):
    """OpenVLA / OpenVLA-OFT with a value head. Parameter names follow the HF checkpoint layout."""

    def __init__(self, config: VLAConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config)
        self.projector = Projector(self.vision_backbone.embed_dim, config.hidden_size)
        llama_config = LlamaConfig(**config.text_config)
        llama_config._attn_implementation = attn_implementation
        self.language_model = LlamaForCausalLM(llama_config)
        self.value_head = ValueHead(config.hidden_size, config.value_head_hidden)
        self.image_stats = (DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD)

    # ------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.fc1.weight.dtype

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of storing them, block by block, in the LLM
        and both vision towers (actor.fsdp_config.gradient_checkpointing): far less activation
        memory at about one more forward's compute. Non-reentrant, so gradients reach LoRA
        weights even where a block's input does not require grad."""
        self.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        for tower in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer):
            tower.set_grad_checkpointing(True)

    @property
    def parallel(self) -> bool:
        return self.config.decoding == "parallel"

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 224, 224, 3] -> [B, 6, 224, 224] in the model's dtype and device."""
        pv = preprocess_images(
            images.to(self.device), self.config.image_sizes[0], *self.image_stats
        )
        return pv.to(self.dtype)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 6, H, W] -> projected patch embeddings [B, P, hidden]."""
        return self.projector(self.vision_backbone(pixel_values))

    def _prompt_embeddings(
        self, patch_embeds: torch.Tensor, prompts: PromptBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert the patches right after BOS of every left-padded row.

        Returns inputs_embeds [B, L + P, hidden] and attention_mask [B, L + P] (bool), still
        left-padded, so that every row's last prompt token sits at the last position.
        """
        ids, mask = prompts.input_ids.to(self.device), prompts.attention_mask.to(self.device)
        tok = self.language_model.get_input_embeddings()(ids)
        B, L = ids.shape
        P = patch_embeds.shape[1]
        lengths = mask.sum(dim=1)
        start = L - lengths  # index of BOS in each row
        # Output row j takes: the input token j for pads and BOS (j <= s), patch j - s - 1 for
        # j in [s + 1, s + P], and the input token j - P for the text after the patches.
        j = torch.arange(L + P, device=self.device).unsqueeze(0)  # [1, L+P]
        s = start.unsqueeze(1)  # [B, 1]
        is_patch = (j >= s + 1) & (j <= s + P)
        text_index = torch.where(j <= s, j, j - P).clamp(0, L - 1)
        out = torch.gather(tok, 1, text_index.unsqueeze(-1).expand(B, L + P, tok.shape[-1]))
        patch_index = (j - s - 1).clamp(0, P - 1)
        patches = torch.gather(
            patch_embeds.to(tok.dtype), 1, patch_index.unsqueeze(-1).expand(B, L + P, tok.shape[-1])
        )
        out = torch.where(is_patch.unsqueeze(-1), patches, out)
        new_mask = (j >= s).expand(B, L + P)
        return out, new_mask

    # ------------------------------------------------------------------ forward passes
    def _action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits restricted to the action ids [..., n_bins]."""
        logits = self.language_model.lm_head(hidden)
        return logits[..., self.config.action_vocab_start : self.config.action_vocab_end].float()

    def _llm(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values=None,
        use_cache: bool = False,
    ):
        return self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )

    def _parallel_mask(self, prompt_mask: torch.Tensor, n_slots: int) -> torch.Tensor:
        """Additive 4D mask [B, 1, T, T]: causal over the prompt, action slots see the whole
        (unpadded) prompt and every other slot; pads are never attended."""
        B, Lp = prompt_mask.shape
        T = Lp + n_slots
        dev = prompt_mask.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        causal[Lp:, Lp:] = True  # slots attend bidirectionally among themselves
        key_ok = torch.cat([prompt_mask, torch.ones(B, n_slots, dtype=torch.bool, device=dev)], 1)
        allowed = causal.unsqueeze(0) & key_ok.unsqueeze(1)  # [B, T, T]
        # A pad query would otherwise attend to nothing (NaN in softmax): let it see itself.
        allowed |= torch.eye(T, dtype=torch.bool, device=dev).unsqueeze(0)
        neg = torch.finfo(self.dtype).min
        mask = torch.zeros(B, 1, T, T, dtype=self.dtype, device=dev)
        return mask.masked_fill(~allowed.unsqueeze(1), neg)

    def forward_actions(
        self,
        pixel_values: torch.Tensor,
        prompts: PromptBatch,
        action_tokens: torch.Tensor | None = None,
        detach_value_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One full forward with teacher forcing (OpenVLA) or parallel slots (OFT).

        Args:
            pixel_values: [B, 6, H, W].
            prompts: left-padded prompt ids [B, L].
            action_tokens: [B, K] ids of the taken actions (needed for OpenVLA; ignored by OFT).
            detach_value_input: the value head reads the LLM's state without a gradient path
                back into it (a critic warm-up trains the head alone).
        Returns:
            logits [B, K, n_bins] (float32, before temperature) and values [B].
        """
        K = self.config.tokens_per_step
        embeds, mask = self._prompt_embeddings(self.embed_images(pixel_values), prompts)
        B, Lp, H = embeds.shape
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        if self.parallel:
            slots = torch.zeros(B, K, H, dtype=embeds.dtype, device=embeds.device)
            slot_pos = positions[:, -1:] + torch.arange(1, K + 1, device=embeds.device)
            out = self._llm(
                torch.cat([embeds, slots], 1),
                self._parallel_mask(mask, K),
                torch.cat([positions, slot_pos], 1),
            ).last_hidden_state
            action_hidden = out[:, Lp:]
        else:
            if action_tokens is None:
                raise ValueError("action_tokens are required for teacher-forced OpenVLA forward")
            if action_tokens.shape != (B, K):
                raise ValueError(
                    f"action_tokens must be [{B}, {K}], got {tuple(action_tokens.shape)}"
                )
            prev = action_tokens[:, :-1].to(self.device)
            tok = self.language_model.get_input_embeddings()(prev)
            full_mask = torch.cat([mask, torch.ones_like(prev, dtype=torch.bool)], 1)
            act_pos = positions[:, -1:] + torch.arange(1, K, device=embeds.device)
            out = self._llm(
                torch.cat([embeds, tok], 1), full_mask, torch.cat([positions, act_pos], 1)
            ).last_hidden_state
            # The hidden state at position t predicts token t+1: last prompt token -> action 1.
            action_hidden = out[:, Lp - 1 :]
        state = out[:, Lp - 1]
        values = self.value_head(state.detach() if detach_value_input else state).float()
        return self._action_logits(action_hidden), values

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        prompts: PromptBatch,
        temperature: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> PolicyOutput:
        """Sample one step's action tokens (OpenVLA: 7 causal steps with a KV cache; OFT: one pass).

        The reported log-probs and entropy are those of the sampling distribution (temperature and
        top-k applied), i.e. the behaviour policy that PPO's ratio divides by.
        """
        if self.parallel:
            logits, values = self.forward_actions(pixel_values, prompts)
            tokens, logp, ent = sample_action_tokens(logits, temperature, top_k, greedy, generator)
            return PolicyOutput(self._ids(tokens), logp, ent, values, logits)

        embeds, mask = self._prompt_embeddings(self.embed_images(pixel_values), prompts)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        out = self._llm(embeds, mask, positions, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        cache = out.past_key_values
        values = self.value_head(hidden).float()
        last_pos = positions[:, -1:]
        steps_logits, steps_tokens, steps_logp, steps_ent = [], [], [], []
        for k in range(self.config.tokens_per_step):
            logits = self._action_logits(hidden)
            tok, logp, ent = sample_action_tokens(logits, temperature, top_k, greedy, generator)
            steps_logits.append(logits)
            steps_tokens.append(tok)
            steps_logp.append(logp)
            steps_ent.append(ent)
            if k == self.config.tokens_per_step - 1:
                break
            next_embed = self.language_model.get_input_embeddings()(self._ids(tok)).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            last_pos = last_pos + 1
            out = self._llm(next_embed, mask, last_pos, past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state[:, -1]
            cache = out.past_key_values
        return PolicyOutput(
            self._ids(torch.stack(steps_tokens, 1)),
            torch.stack(steps_logp, 1),
            torch.stack(steps_ent, 1),
            values,
            torch.stack(steps_logits, 1),
        )

    def evaluate_actions(
        self,
        pixel_values: torch.Tensor,
        prompts: PromptBatch,
        action_tokens: torch.Tensor,
        temperature: float = 1.0,
        detach_value_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs [B, K], entropy [B, K] and values [B] of taken actions (with grad; with
        detach_value_input the values' gradient stops at the value head)."""
        logits, values = self.forward_actions(
            pixel_values, prompts, action_tokens, detach_value_input
        )
        index = (action_tokens.to(self.device) - self.config.action_vocab_start).long()
        if index.min() < 0 or index.max() >= self.config.n_action_bins:
            raise ValueError("action_tokens contain ids outside the action range")
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        logprobs = logp_all.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprobs, entropy, values

    def _ids(self, index: torch.Tensor) -> torch.Tensor:
        return index + self.config.action_vocab_start


def sample_action_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample from action-restricted logits [..., n_bins].

    Returns bin indices [...], their log-probs and the entropy of the sampling distribution.
    Greedy decoding takes the argmax and reports log-probs at temperature 1.
    """
    if temperature <= 0 and not greedy:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
    scaled = logits.float() / (1.0 if greedy else temperature)
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    logp_all = torch.log_softmax(scaled, dim=-1)
    if greedy:
        index = scaled.argmax(dim=-1)
    else:
        flat = logp_all.exp().reshape(-1, scaled.shape[-1])
        index = torch.multinomial(flat, 1, generator=generator).view(scaled.shape[:-1])
    logp = logp_all.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return index, logp, entropy


def aggregate_logprobs(token_logprobs: torch.Tensor, action_dim: int, level: str) -> torch.Tensor:
    """Token log-probs [B, C*action_dim] -> 'token' [B, C*D], 'action' [B, C] or 'chunk' [B]."""
    if level == "token":
        return token_logprobs
    B, K = token_logprobs.shape
    if K % action_dim:
        raise ValueError(f"{K} tokens do not split into actions of {action_dim}")
    per_action = token_logprobs.view(B, K // action_dim, action_dim).sum(-1)
    if level == "action":
        return per_action
    if level == "chunk":
        return per_action.sum(-1)
    raise ValueError(f"logprob level must be 'token', 'action' or 'chunk', got {level!r}")


def aggregate_entropy(token_entropy: torch.Tensor, action_dim: int, level: str) -> torch.Tensor:
    """Token entropies [B, C*action_dim] -> 'token' [B, C*D] or 'action' [B, C], where an
    action's entropy is the sum of its tokens' (conditional) entropies, as RLinf's action_level."""
    if level == "token":
        return token_entropy
    if level == "action":
        return aggregate_logprobs(token_entropy, action_dim, "action")
    raise ValueError(f"entropy level must be 'token' or 'action', got {level!r}")
