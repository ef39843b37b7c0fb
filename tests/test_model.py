"""The network: Swin backbone shapes and the MoE head's arithmetic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midol_hub import MIDoLConfig, MIDoLModel, MoEProjector, get_entry


def test_swin_base_matches_the_paper_architecture():
    with torch.device("meta"):
        model = MIDoLModel(MIDoLConfig())
    backbone = model.backbone
    assert backbone.num_features == 1024
    assert [len(stage.blocks) for stage in backbone.layers] == [2, 2, 18, 2]
    assert [stage.blocks[0].attn.num_heads for stage in backbone.layers] == [4, 8, 16, 32]
    assert backbone.patch_embed.proj.kernel_size == (4, 4)
    assert backbone.layers[0].blocks[0].window_size == (7, 7)
    assert model.head.fc1_weight.shape == (5, 2048, 1024)
    assert model.head.prototypes is None  # inference configs drop the 65,536 prototypes
    backbone_params = sum(p.numel() for p in backbone.parameters())
    assert 86e6 < backbone_params < 88e6  # Swin-B without classifier: 86.7 M


def test_prototypes_are_weight_normalised_with_fixed_unit_norm():
    config = MIDoLConfig(**get_entry("midol-micro").config, keep_prototypes=True)
    model = MIDoLModel(config)
    weight = model.head.prototypes.weight
    assert weight.shape == (4096, 256)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(4096))


def test_micro_outputs_have_documented_shapes(micro):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = micro(x, output_patch_tokens=True, output_pyramid=True)
    assert out.embedding.shape == (3, 256)
    assert out.pooled.shape == (3, 256)
    assert out.routing_logits.shape == (3, 5)
    assert out.patch_tokens.shape == (3, 256, 4, 4)
    assert [tuple(s.shape) for s in out.pyramid] == [(3, 32, 32, 32), (3, 64, 16, 16), (3, 128, 8, 8), (3, 256, 4, 4)]
    # pooled is the mean of the normed final tokens; the last pyramid stage is the same stage before the norm
    torch.testing.assert_close(out.pooled, out.patch_tokens.mean(dim=(2, 3)))
    torch.testing.assert_close(micro.backbone.norm(out.pyramid[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2), out.patch_tokens)


def reference_expert(head: MoEProjector, x: torch.Tensor, e: int) -> torch.Tensor:
    """One expert as plain Linear layers: fc2 is stored transposed, as in Tutel."""
    hidden = F.gelu(x @ head.fc1_weight[e].T + head.fc1_bias[e])
    return hidden @ head.fc2_weight[e] + head.fc2_bias[e]


def test_batched_experts_equal_a_per_expert_reference():
    torch.manual_seed(0)
    head = MoEProjector(dim=16, num_experts=4, hidden_dim=32, top_k=2, num_prototypes=10)
    with torch.no_grad():
        for p in (head.fc1_bias, head.fc2_bias):
            p.normal_()
    x = torch.randn(6, 16)
    outputs = head.expert_outputs(x)
    assert outputs.shape == (6, 4, 16)
    for e in range(4):
        torch.testing.assert_close(outputs[:, e], reference_expert(head, x, e), rtol=1e-5, atol=1e-5)


def test_prototype_logits_mix_top_k_experts_by_unrenormalised_gate_probabilities():
    torch.manual_seed(1)
    head = MoEProjector(dim=8, num_experts=3, hidden_dim=12, top_k=2, num_prototypes=5)
    x = torch.randn(4, 8)
    logits, outputs, prototype_logits = head(x)
    probs = logits.softmax(-1)
    expected = []
    for b in range(4):
        top = probs[b].topk(2)
        mixed = sum(p * reference_expert(head, x[b : b + 1], int(i))[0] for p, i in zip(top.values, top.indices))
        z = F.normalize(mixed, dim=0)
        w = head.prototypes.weight
        expected.append(z @ w.T)
    torch.testing.assert_close(prototype_logits, torch.stack(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, x @ head.router.weight.T)


def test_gate_noise_acts_only_in_training_mode_and_never_on_the_routing_logits():
    torch.manual_seed(2)
    head = MoEProjector(dim=8, num_experts=5, hidden_dim=12, top_k=4, num_prototypes=5, gate_noise=1.0).eval()
    x = torch.randn(64, 8)
    clean_logits, _, clean = head(x)
    head.train()
    torch.manual_seed(3)
    logits, _, noisy = head(x)
    torch.testing.assert_close(logits, clean_logits)  # the routing loss always sees clean logits
    assert (noisy - clean).abs().max() > 1e-4
    # the noise is N(0, 1) / E on the logits: replaying the generator reproduces the mixture
    torch.manual_seed(3)
    noise = torch.randn_like(logits) / 5
    probs = (logits + noise).softmax(-1)
    top = probs.topk(4, dim=-1)
    outputs = head.expert_outputs(x)
    mixed = torch.einsum("bk,bkd->bd", top.values, outputs.gather(1, top.indices[..., None].expand(-1, -1, 8)))
    torch.testing.assert_close(noisy, head.prototypes(F.normalize(mixed, dim=-1)), rtol=1e-5, atol=1e-5)
    head.gate_noise = 0.0
    torch.testing.assert_close(head(x)[2], clean)


def test_forward_embedding_is_the_selected_experts_output(micro):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        auto = micro(x)
        forced = micro(x, expert_index=torch.tensor([4, 1]))
        outputs = micro.head.expert_outputs(auto.pooled)
        pooled_alone = micro.forward_pooled(x)
    assert torch.equal(pooled_alone, auto.pooled)  # the backbone's feature without the head, as forward gives it
    assert torch.equal(auto.expert_index, auto.routing_logits.argmax(-1))
    torch.testing.assert_close(auto.embedding, outputs[torch.arange(2), auto.expert_index])
    torch.testing.assert_close(forced.embedding[0], outputs[0, 4])
    torch.testing.assert_close(forced.embedding[1], outputs[1, 1])


def test_fused_window_attention_matches_the_plain_path():
    torch.manual_seed(0)
    config = get_entry("midol-micro").make_config()
    fused = MIDoLModel(config).eval()
    plain = MIDoLModel(MIDoLConfig(**{**get_entry("midol-micro").config, "fused_attention": False})).eval()
    plain.load_state_dict(fused.state_dict())
    attention = [m for m in fused.backbone.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)
    assert not any(m.fused_attn for m in plain.backbone.modules() if hasattr(m, "fused_attn"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = fused(x, output_pyramid=True), plain(x, output_pyramid=True)
    assert (a.pooled - b.pooled).abs().max() < 1e-5
    for stage_a, stage_b in zip(a.pyramid, b.pyramid):
        assert (stage_a - stage_b).abs().max() < 1e-4
