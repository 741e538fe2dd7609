"""The official-layout writers of tests/layouts.py, against timm's converters and open_clip's own loader.

timm is the reference for every family: its checkpoint_filter_fn turns each file back into the model that wrote
it. open_clip is on PyPI, so its files also go through open_clip's own loader, strictly. DINOv2's and EVA's model
code is not on PyPI (EVA's also needs apex and xFormers), so the key sets below spell out what their modules
hold; the writers were checked by hand against that code (strict loads, the same tokens as timm).
"""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import eva, vision_transformer

from tests.layouts import (
    CLIP_TEXT,
    write_dinov2,
    write_eva02,
    write_eva_clip,
    write_open_clip_timm,
)

DINO = {"img_size": 42, "embed_dim": 48, "depth": 2, "num_heads": 2}  # 3 x 3 patches of 14
EVA = {"img_size": 56, "embed_dim": 64, "depth": 2, "num_heads": 2}  # 4 x 4 patches of 14
TRUNK = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}  # 4 x 4 patches of 8
EMBED = 24  # CLIP embed dim of the tiny towers
TRUNK_HEAD = {**TRUNK, "num_classes": EMBED}  # an EVA-CLIP tower: its head is the CLIP projection

# Keys of one block, as the families' own modules name them.
DINOV2_BLOCK = {
    *("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"),
    *("ls1.gamma", "norm2.weight", "norm2.bias", "ls2.gamma"),
}
EVA_BLOCK = {"norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.proj.weight", "attn.proj.bias"}
EVA_BLOCK |= {"attn.rope.freqs_cos", "attn.rope.freqs_sin", "norm2.weight", "norm2.bias"}
EVA_SUBLN_ATTN = {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"}
EVA_SUBLN_MLP = {f"mlp.{n}.{p}" for n in ("w1", "w2", "ffn_ln", "w3") for p in ("weight", "bias")}
EVA_CLIP_BLOCK = (
    EVA_BLOCK | EVA_SUBLN_ATTN | EVA_SUBLN_MLP | {"attn.inner_attn_ln.weight", "attn.inner_attn_ln.bias"}
)


def perturbed(arch: str, **kwargs) -> torch.nn.Module:
    """A tiny timm model with every weight moved off its init (zero biases, unit norms, 1e-5 layer scales, zero
    registers and q/v biases), so that a key a writer drops, misnames or misplaces changes the outputs."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_converts_back(source, state_dict, convert, arch: str, kwargs: dict) -> None:
    """The family's timm converter turns the file into a fresh model strictly, with the source's tokens."""
    fresh = timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs}).eval()
    fresh.load_state_dict(convert(state_dict, fresh), strict=True)
    x = images(kwargs["img_size"])
    with torch.no_grad():
        tokens = fresh.forward_features(x)
        torch.testing.assert_close(tokens, source.forward_features(x), rtol=1e-5, atol=1e-6)


def block_keys(state_dict: dict, prefix: str = "") -> set[str]:
    return {k.removeprefix(f"{prefix}blocks.0.") for k in state_dict if k.startswith(f"{prefix}blocks.0.")}


@pytest.mark.parametrize(
    "arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"]
)
def test_dinov2_release_file(tmp_path, arch):
    source = perturbed(arch, **DINO)
    write_dinov2(source, tmp_path / "dinov2_pretrain.pth")
    sd = torch.load(tmp_path / "dinov2_pretrain.pth", weights_only=True)

    dim, registers = DINO["embed_dim"], source.num_reg_tokens
    top = {k for k in sd if not k.startswith("blocks.")}
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert top == expected | {"norm.weight", "norm.bias"} | ({"register_tokens"} if registers else set())
    assert sd["pos_embed"].shape == (1, 1 + 9, dim)  # the class position included, also with registers
    assert sd["mask_token"].shape == (1, dim)
    if registers:
        assert sd["register_tokens"].shape == (1, registers, dim)
    mlp = ("w12", "w3") if "giant" in arch else ("fc1", "fc2")
    assert block_keys(sd) == DINOV2_BLOCK | {f"mlp.{n}.{p}" for n in mlp for p in ("weight", "bias")}
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == {"0", "1"}  # not chunked

    assert_converts_back(source, sd, vision_transformer.checkpoint_filter_fn, arch, DINO)


# open_clip config: timm trunk arch, trunk kwargs, open_clip's projection width, SigLIP text tower, file name
OPEN_CLIP = {
    "ViT-B-16-SigLIP": ("vit_base_patch16_siglip_224", TRUNK, None, True, "open_clip_pytorch_model.bin"),
    "EVA02-B-16": ("eva02_base_patch16_clip_224", TRUNK_HEAD, None, False, "open_clip_model.safetensors"),
    "vit_medium_patch16_gap_256": ("vit_medium_patch16_gap_256", TRUNK, EMBED, False, "m.bin"),
}


def written_open_clip(tmp_path, config: str):
    arch, kwargs, proj_dim, siglip, name = OPEN_CLIP[config]
    source = perturbed(arch, **kwargs)
    write_open_clip_timm(source, tmp_path / name, proj_dim=proj_dim, siglip=siglip)
    return source, tmp_path / name


def load(path) -> dict:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


@pytest.mark.parametrize("config", OPEN_CLIP)
def test_open_clip_file_converts_back_to_the_timm_trunk(tmp_path, config):
    arch, kwargs, proj_dim, siglip, _ = OPEN_CLIP[config]
    source, path = written_open_clip(tmp_path, config)
    sd = load(path)

    scalars = {"logit_scale", "logit_bias"} if siglip else {"logit_scale"}
    assert {k.split(".")[0] for k in sd} == {"visual", "text"} | scalars
    head = {k for k in sd if k.startswith("visual.head.")}
    assert head == ({"visual.head.proj.weight"} if proj_dim else set())
    if config == "ViT-B-16-SigLIP":
        assert "visual.trunk.attn_pool.latent" in sd and "visual.trunk.cls_token" not in sd

    convert = eva.checkpoint_filter_fn if arch.startswith("eva") else vision_transformer.checkpoint_filter_fn
    assert_converts_back(source, sd, convert, arch, kwargs)


@pytest.mark.parametrize("config", OPEN_CLIP)
def test_open_clip_loads_the_file_strictly_and_embeds_as_timm(tmp_path, monkeypatch, config):
    _, kwargs, proj_dim, _, _ = OPEN_CLIP[config]
    source, path = written_open_clip(tmp_path, config)

    # open_clip's own entry point with the file as `pretrained` (a strict load): the real config's image tower
    # (timm arch, pool, proj), a tiny text tower, the custom-text class the writer keys. open_clip 3.3 passes no
    # size kwargs to timm, so the trunk it builds is shrunk to the writer's here.
    text = dict(open_clip.get_model_config(config)["text_cfg"], **CLIP_TEXT)
    embed_dim = proj_dim or kwargs.get("num_classes") or kwargs["embed_dim"]  # the image tower's last width
    trunk_kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", _with_kwargs(timm.create_model, trunk_kwargs))
        clip = open_clip.create_model(
            config,
            pretrained=str(path),
            force_custom_text=True,
            force_image_size=kwargs["img_size"],
            embed_dim=embed_dim,
            text_cfg=text,
        ).eval()

    x = images(kwargs["img_size"])
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x))
        if proj_dim:
            expected = expected @ load(path)["visual.head.proj.weight"].T
        torch.testing.assert_close(clip.encode_image(x), expected, rtol=1e-5, atol=1e-6)


def _with_kwargs(create_model, extra: dict):
    def create(name, **kwargs):
        return create_model(name, **{**kwargs, **extra})

    return create


@pytest.mark.parametrize(
    "arch, mim, kwargs",
    [
        # the MIM model's RoPE positions are its own grid's (see write_eva02)
        pytest.param("eva02_tiny_patch14_224", True, {**EVA, "ref_feat_shape": (4, 4)}, id="Ti-mim"),
        pytest.param("eva02_base_patch14_224", True, {**EVA, "ref_feat_shape": (4, 4)}, id="B-mim"),
        pytest.param("eva02_base_patch14_224", False, {**EVA, "num_classes": 10}, id="B-finetuned"),
    ],
)
def test_eva02_release_file(tmp_path, arch, mim, kwargs):
    source = perturbed(arch, **kwargs)
    write_eva02(source, tmp_path / "eva02.pt", mim=mim)
    checkpoint = torch.load(tmp_path / "eva02.pt", weights_only=True)
    assert list(checkpoint) == ["module"]
    sd = checkpoint["module"]

    top = {k for k in sd if not k.startswith("blocks.")}
    common = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "rope.freqs_cos"}
    common.add("rope.freqs_sin")
    if mim:
        assert top == common | {"mask_token", "lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias"}
    else:
        assert top == common | {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    if "tiny" in arch:  # fused qkv without bias, xFormers' packed SwiGLU
        packed = {"attn.qkv.weight", "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"}
        assert block_keys(sd) == EVA_BLOCK | packed
    else:
        assert block_keys(sd) == EVA_BLOCK | EVA_SUBLN_ATTN | EVA_SUBLN_MLP

    assert_converts_back(source, checkpoint, eva.checkpoint_filter_fn, arch, kwargs)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_eva_clip_release_file(tmp_path, dtype):
    arch = "eva02_base_patch16_clip_224"
    source = perturbed(arch, **TRUNK_HEAD)
    if dtype is not None:  # the weights a half-precision release can hold, so the round trip stays exact
        with torch.no_grad():
            for p in source.parameters():
                p.copy_(p.to(dtype).float())
    write_eva_clip(source, tmp_path / "EVA02_CLIP_B_psz16_s8B.pt", dtype=dtype)
    sd = torch.load(tmp_path / "EVA02_CLIP_B_psz16_s8B.pt", weights_only=True)

    assert {k.split(".")[0] for k in sd} == {"visual", "text", "logit_scale"}
    assert block_keys(sd, "visual.") == EVA_CLIP_BLOCK
    assert sd["visual.head.weight"].shape == (EMBED, TRUNK["embed_dim"]) and "visual.head.bias" in sd
    assert sd["text.text_projection"].shape == (CLIP_TEXT["width"], EMBED)
    assert sd["visual.blocks.0.attn.q_proj.weight"].dtype == (dtype or torch.float32)
    assert sd["visual.rope.freqs_cos"].dtype == torch.float32

    assert_converts_back(source, sd, eva.checkpoint_filter_fn, arch, TRUNK_HEAD)


def test_eva_rope_tables_are_the_embedding_timm_rotates_with(tmp_path):
    # The tables are skipped by timm's converter but loaded by EVA's own code, so they must be timm's own.
    source = perturbed("eva02_tiny_patch14_224", **EVA)
    write_eva02(source, tmp_path / "eva02.pt", mim=False)
    sd = torch.load(tmp_path / "eva02.pt", weights_only=True)["module"]

    sin, cos = source.rope.get_embed().tensor_split(2, dim=-1)  # [16, head_dim] each
    torch.testing.assert_close(sd["rope.freqs_cos"], cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd["rope.freqs_sin"], sin, rtol=0, atol=1e-6)
    for i in range(EVA["depth"]):
        assert torch.equal(sd[f"blocks.{i}.attn.rope.freqs_cos"], sd["rope.freqs_cos"])
