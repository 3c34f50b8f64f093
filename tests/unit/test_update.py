"""One PPO update moves the policy the way the advantages say, and the critic toward the returns."""

import pytest
import torch

from tests.conftest import INSTRUCTIONS
from vla_rl.models import tiny_config
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.models.tiny import build_tiny_policy
from vla_rl.training import PPOUpdateConfig, TrainBatch, ppo_update
from vla_rl.training.demo import make_optimizer


@pytest.mark.parametrize("decoding,chunk", [("autoregressive", 1), ("parallel", 2)])
def test_update_improves_the_surrogate_and_fits_values(decoding, chunk, prompt_tokenizer, images):
    """A small gradient step must raise sum_i A_i * log pi(a_i) (the PPO surrogate's first-order
    term) and lower the value error. Individual samples may move either way: their tokens share
    weights, so raising one sample's tokens can lower another's."""
    cfg_model = tiny_config(decoding=decoding, action_chunk=chunk)
    policy = apply_lora(build_tiny_policy(cfg_model), LoRASettings(rank=4))
    prompts = prompt_tokenizer(INSTRUCTIONS)
    gen = torch.Generator().manual_seed(0)
    out = policy.generate(policy.pixel_values(images), prompts, generator=gen)
    adv = torch.tensor([1.0, -1.0, 0.5])
    returns = torch.tensor([1.0, 0.0, 1.0])
    batch = TrainBatch(images, prompts, out.action_tokens, out.logprobs, adv, returns, out.values)
    cfg = PPOUpdateConfig(micro_batch_size=2, normalize_advantages=False, value_clip=None)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    metrics = ppo_update(policy, optimizer, batch, cfg, gen)
    logp, _, values = policy.evaluate_actions(
        policy.pixel_values(images), prompts, out.action_tokens
    )
    delta = (logp - out.logprobs).sum(-1).detach()
    assert delta.abs().max() > 1e-5  # the step did something
    assert (adv * delta).sum() > 0, delta
    assert (values.detach() - returns).pow(2).mean() < (out.values - returns).pow(2).mean()
    for key in ("actor/policy_loss", "actor/approx_kl", "actor/clip_fraction", "actor/grad_norm",
                "critic/value_loss", "entropy_loss", "loss", "actor/lr"):  # fmt: skip
        assert key in metrics and metrics[key] == metrics[key]


def test_grpo_style_update_skips_the_critic(prompt_tokenizer, images):
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    prompts = prompt_tokenizer(INSTRUCTIONS)
    out = policy.generate(policy.pixel_values(images), prompts)
    head_before = policy.value_head.mlp[0].weight.detach().clone()
    batch = TrainBatch(images, prompts, out.action_tokens, out.logprobs, torch.tensor([1.0, -1.0, 0.0]),
                       torch.zeros(3), out.values)  # fmt: skip
    metrics = ppo_update(
        policy, make_optimizer(policy, 1e-3, 1e-2), batch, PPOUpdateConfig(value_coef=0.0)
    )
    assert "critic/value_loss" not in metrics
    assert torch.equal(policy.value_head.mlp[0].weight, head_before)


def test_bad_update_config_is_an_error():
    with pytest.raises(ValueError, match="logprob_level"):
        PPOUpdateConfig(logprob_level="sequence")
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOUpdateConfig(micro_batch_size=0)


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients(prompt_tokenizer, images):
    """actor.fsdp_config.gradient_checkpointing: every LLM layer and vision block runs its forward
    again in backward, and the LoRA gradients are the same as without it."""

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        torch.manual_seed(0)
        policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
        if checkpointing:
            policy.enable_gradient_checkpointing()
        with torch.no_grad():  # LoRA B starts at 0; give the A matrices a gradient too
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        calls = {"llm": 0, "vision": 0}
        # Hooks on modules inside a block (the block's own hook does not fire on the recompute).
        llm_layer = policy.language_model.model.layers[0].self_attn.q_proj
        tower_block = policy.vision_backbone.featurizer.blocks[0].mlp
        llm_layer.register_forward_hook(lambda *_: calls.__setitem__("llm", calls["llm"] + 1))
        tower_block.register_forward_hook(
            lambda *_: calls.__setitem__("vision", calls["vision"] + 1)
        )
        policy.train()
        prompts = prompt_tokenizer(INSTRUCTIONS)
        tokens = torch.full((3, 7), 31800)
        logp, _, values = policy.evaluate_actions(policy.pixel_values(images), prompts, tokens)
        (logp.sum() + values.sum()).backward()
        named = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return named, calls

    plain, plain_calls = grads(False)
    checkpointed, calls = grads(True)
    assert plain_calls == {"llm": 1, "vision": 1}
    assert calls == {"llm": 2, "vision": 2}  # recomputed in backward
    assert plain.keys() == checkpointed.keys() and any("vision" in n for n in plain)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=1e-4, atol=1e-6), name


def test_critic_warmup_step_trains_the_value_head_alone(prompt_tokenizer, images):
    """train_policy=False (actor.optim.critic_warmup_steps): the value error falls and every
    other weight stays bit-identical, under AdamW with weight decay (which moves weights on a
    zero gradient) and with the LoRA already moved away from its zero start."""
    from vla_rl.training.update import make_optimizer as learner_optimizer

    policy = apply_lora(build_tiny_policy(tiny_config()), LoRASettings(rank=4))
    prompts = prompt_tokenizer(INSTRUCTIONS)
    gen = torch.Generator().manual_seed(0)
    out = policy.generate(policy.pixel_values(images), prompts, generator=gen)
    returns = torch.tensor([1.0, 0.0, 1.0])
    batch = TrainBatch(images, prompts, out.action_tokens, out.logprobs,
                       torch.tensor([1.0, -1.0, 0.5]), returns, out.values)  # fmt: skip
    optimizer = learner_optimizer(policy, lr=1e-2, value_lr=1e-2, weight_decay=0.1)
    cfg = PPOUpdateConfig(micro_batch_size=2, value_clip=None, update_epochs=3)
    ppo_update(policy, optimizer, batch, cfg, gen)  # a policy step first: LoRA B is not zero now

    def error(p) -> float:
        _, _, v = p.evaluate_actions(p.pixel_values(images), prompts, out.action_tokens)
        return float((v.detach() - returns).pow(2).mean())

    rest = {n: p.detach().clone() for n, p in policy.named_parameters()
            if not n.startswith("value_head.")}  # fmt: skip
    head = {n: p.detach().clone() for n, p in policy.named_parameters()
            if n.startswith("value_head.")}  # fmt: skip
    before = error(policy)
    warmup = PPOUpdateConfig(micro_batch_size=2, value_clip=None, update_epochs=3,
                             train_policy=False)  # fmt: skip
    metrics = ppo_update(policy, optimizer, batch, warmup, gen)
    assert error(policy) < before
    params = dict(policy.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in rest.items())
    assert any(not torch.equal(params[n], w) for n, w in head.items())
    assert "critic/value_loss" in metrics and "actor/approx_kl" in metrics  # still logged


def test_critic_warmup_needs_a_critic():
    with pytest.raises(ValueError, match="needs a critic"):
        PPOUpdateConfig(value_coef=0.0, train_policy=False)
