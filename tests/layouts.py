"""Writers of the official release layouts of teacher checkpoints, from timm models (tests only).

Each writer takes a timm model (random weights, tiny sizes) and saves its weights keyed, shaped and wrapped the
way the family's own release files are, so that a loader is tested against the real on-disk format. timm's
`checkpoint_filter_fn` of the family turns every file back into the timm model: tests/test_layouts.py checks
that, and checks the files against the family's reference code where it installs (open_clip).

Layouts were read from the reference code: facebookresearch/dinov2 (hub/backbones.py, models/
vision_transformer.py), mlfoundations/open_clip (timm_model.py, transformer.py), baaivision/EVA (EVA-02/asuka
modeling_pretrain.py / modeling_finetune.py / rope.py, EVA-CLIP/rei eva_vit_model.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.layers import GluMlp, SwiGLU
from torch import Tensor, nn

# The text tower written next to the image tower of CLIP-style files: tiny but complete, so that the reference
# code loads the file strictly. A loader of image teachers must ignore all of it.
CLIP_TEXT = {"width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": 64}


def write_dinov2(model: nn.Module, path: str | Path) -> None:
    """DINOv2 release file (dinov2_vitb14_pretrain.pth, dinov2_vitb14_reg4_pretrain.pth): a bare state dict.

    For timm vit_{small,base,large,giant}_patch14_dinov2 and vit_*_patch14_reg4_dinov2. The torch.hub model that
    loads the release files strictly is built with block_chunks=0, so blocks are `blocks.N.*`; only the FSDP
    training checkpoints chunk them (`blocks.C.N.*`, with nn.Identity fillers).
    """
    gen = torch.Generator().manual_seed(0)
    dim = model.embed_dim
    own = dict(model.state_dict())
    out = {}
    if model.reg_token is None:
        # Both keep the class token's position in pos_embed [1, 1 + N, D].
        out["cls_token"] = own.pop("cls_token")
        out["pos_embed"] = own.pop("pos_embed")
    else:
        # timm's reg4 models are no_embed_class: pos_embed [1, N, D] covers the patches only, and timm folds
        # DINOv2's class position into the class token (cls_token + pos_embed[:, :1]). DINOv2 stores pos_embed
        # [1, 1 + N, D] and adds its first row to the class token; its registers [1, R, D] get no position.
        class_pos = 0.02 * torch.randn(1, 1, dim, generator=gen)
        out["cls_token"] = own.pop("cls_token") - class_pos
        out["pos_embed"] = torch.cat([class_pos, own.pop("pos_embed")], dim=1)
        out["register_tokens"] = own.pop("reg_token")
    out["mask_token"] = 0.02 * torch.randn(1, dim, generator=gen)  # [1, D], iBOT's masked patch; unused here
    packed_swiglu = isinstance(model.blocks[0].mlp, GluMlp)
    for key, value in own.items():
        if packed_swiglu:
            # ViT-g: SwiGLUFFNFused, w12 [2H, D] (SiLU of the first half gates the second) and w3 [D, H].
            key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out[key] = value
    torch.save(out, path)


def write_open_clip_timm(
    model: nn.Module, path: str | Path, *, proj_dim: int | None = None, siglip: bool = True
) -> None:
    """open_clip checkpoint of a CLIP whose image tower is a timm trunk: a bare state dict.

    For open_clip configs with `timm_model_name`, e.g. ViT-B-16-SigLIP (vit_base_patch16_siglip_224: MAP pooling,
    visual.trunk.attn_pool.*, no class token, timm_proj "none") or EVA02-B-16 (eva02_base_patch16_clip_224 built
    with num_classes=embed_dim: the projection is the trunk's own visual.trunk.head.*). visual.trunk.* holds the
    timm model's keys as they are. proj_dim: configs with timm_proj "linear" (e.g. vit_medium_patch16_gap_256)
    add open_clip's own projection visual.head.proj.weight [proj_dim, num_features], without bias. text.* is a
    CustomTextCLIP text tower, then logit_scale [] and, for SigLIP, logit_bias []. A path ending in
    .safetensors gives open_clip_model.safetensors, any other open_clip_pytorch_model.bin.
    """
    gen = torch.Generator().manual_seed(0)
    out = {f"visual.trunk.{k}": v for k, v in model.state_dict().items()}
    if proj_dim is not None:
        out["visual.head.proj.weight"] = 0.02 * torch.randn(proj_dim, model.num_features, generator=gen)
    embed_dim = proj_dim or model.num_classes or model.num_features
    out |= {f"text.{k}": v for k, v in _clip_text_tower(embed_dim, siglip, gen).items()}
    out["logit_scale"] = torch.tensor(math.log(10.0))
    if siglip:
        out["logit_bias"] = torch.tensor(-10.0)
    if str(path).endswith(".safetensors"):
        save_file(out, str(path))
    else:
        torch.save(out, path)


def write_eva02(model: nn.Module, path: str | Path, *, mim: bool = True) -> None:
    """EVA-02 release file of baaivision/EVA (asuka), saved through DeepSpeed: {"module": state dict}.

    For timm eva02_{tiny,small}_patch14_* (fused attn.qkv.weight [3D, D] without bias, xFormers' packed SwiGLU
    mlp.w12 [2H, D] / mlp.w3 [D, H]) and eva02_{base,large}_patch14_* (subln: attn.{q,k,v}_proj.weight [D, D],
    mlp.w1 / mlp.w2 [H, D], mlp.ffn_ln [H], mlp.w3 [D, H]); both keep attn.q_bias / attn.v_bias [D] (the k bias
    is fixed at zero) and save the RoPE tables.
    mim=True: the MIM-pretrained file (eva02_B_pt_in21k_p14.pt; model built with num_classes=0): the final
    `norm` applied to every token (timm renames it fc_norm), mask_token [1, 1, D] and lm_head [P, D], P the width
    of the EVA-CLIP features it regresses. The MIM model's RoPE positions are t = arange(grid) (its own grid is
    the pretraining grid): build the timm model with ref_feat_shape equal to its grid.
    mim=False: the fine-tuned classifier (eva02_B_pt_in21k_ft_in1k_p14.pt; num_classes > 0): fc_norm over the
    mean patch token and head [C, D]; positions t = arange(grid) / grid * 16 (timm's ref_feat_shape (16, 16)).
    """
    gen = torch.Generator().manual_seed(0)
    out = _eva_state_dict(model)
    if mim:
        dim, target_dim = model.embed_dim, 24  # P: a tiny stand-in for the teacher's width
        out = {
            ("norm." + k.removeprefix("fc_norm.") if k.startswith("fc_norm.") else k): v
            for k, v in out.items()
        }
        out["mask_token"] = 0.02 * torch.randn(1, 1, dim, generator=gen)
        out["lm_head.weight"] = 0.02 * torch.randn(target_dim, dim, generator=gen)
        out["lm_head.bias"] = torch.zeros(target_dim)
    torch.save({"module": out}, path)


def write_eva_clip(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """EVA-CLIP release file (EVA02_CLIP_B_psz16_s8B.pt, trained as CustomCLIP): a bare state dict.

    For timm eva02_{base,large}_patch{16,14}_clip_* built with num_classes = the CLIP embed dim E. visual.* is the
    EVAVisionTransformer: EVA-02 B/L's keys plus attn.inner_attn_ln [D] (timm attn.norm), the final norm over
    every token (class token pooling) and head [E, D] with bias, the CLIP projection. text.* is its text tower,
    then logit_scale []. dtype: the B/L releases are fp16 (EVA-CLIP README); None keeps float32. The RoPE tables
    stay float32 either way.
    """
    gen = torch.Generator().manual_seed(0)
    visual = {
        k: v if dtype is None or "rope." in k else v.to(dtype) for k, v in _eva_state_dict(model).items()
    }
    out = {f"visual.{k}": v for k, v in visual.items()}
    text = _clip_text_tower(model.num_classes, False, gen)
    out |= {f"text.{k}": v if dtype is None else v.to(dtype) for k, v in text.items()}
    out["logit_scale"] = torch.tensor(math.log(100.0))
    torch.save(out, path)


def eva_rope_tables(model: nn.Module) -> tuple[Tensor, Tensor]:
    """EVA's VisionRotaryEmbeddingFast buffers (freqs_cos, freqs_sin), each [H * W, head_dim], rows row-major.

    The first half of head_dim rotates with the patch row, the second with its column; inside each half the
    channel pair (2i, 2i + 1) turns at 1 / theta^(2i / (head_dim / 2)). Positions are in pretraining-grid units,
    t = arange(grid) / grid * pt_seq_len, where timm's ref_feat_shape plays pt_seq_len.
    """
    rope = model.rope
    (rows, cols), ref = rope.feat_shape, rope.ref_feat_shape or rope.feat_shape
    half = rope.dim // 2  # rope.dim is head_dim
    freqs = 1.0 / (rope.temperature ** (torch.arange(0, half, 2).float() / half))  # [head_dim / 4]
    # [grid, head_dim / 2]: angle of every channel, each frequency repeated for its pair
    by_row = (torch.arange(rows) / rows * ref[0])[:, None] * freqs
    by_col = (torch.arange(cols) / cols * ref[1])[:, None] * freqs
    by_row, by_col = by_row.repeat_interleave(2, -1), by_col.repeat_interleave(2, -1)
    angles = torch.cat([by_row[:, None].expand(-1, cols, -1), by_col[None].expand(rows, -1, -1)], dim=-1)
    angles = angles.reshape(rows * cols, -1)
    return angles.cos(), angles.sin()


def _eva_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The timm Eva's weights under EVA's own names (EVA-02 asuka and EVA-CLIP name them alike)."""
    mlp = model.blocks[0].mlp
    if isinstance(mlp, SwiGLU):  # EVA's SwiGLU with subln: w1 is gated by SiLU, ffn_ln before w3
        swaps = [("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln.")]
        swaps.append(("mlp.fc2.", "mlp.w3."))
    elif isinstance(mlp, GluMlp):  # xFormers' packed SwiGLU (Ti/S): w12 [2H, D], SiLU of the first half
        swaps = [("mlp.fc1.", "mlp.w12."), ("mlp.fc2.", "mlp.w3.")]
    else:  # plain GELU Mlp, ffn_ln with subln
        swaps = [("mlp.norm.", "mlp.ffn_ln.")]
    # EVA adds separate q_bias / v_bias to bias-free projections; inner_attn_ln normalises before attn.proj.
    swaps += [("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias")]
    swaps.append(("attn.norm.", "attn.inner_attn_ln."))
    out = {}
    for key, value in model.state_dict().items():
        for old, new in swaps:
            key = key.replace(old, new)
        out[key] = value
    if model.rope is not None:
        # Persistent buffers, saved once for the model and again under every attention that holds the module.
        cos, sin = eva_rope_tables(model)
        for prefix in ["rope.", *(f"blocks.{i}.attn.rope." for i in range(len(model.blocks)))]:
            out[prefix + "freqs_cos"], out[prefix + "freqs_sin"] = cos, sin
    return out


def _clip_text_tower(embed_dim: int, siglip: bool, gen: torch.Generator) -> dict[str, Tensor]:
    """open_clip's TextTransformer keys, which EVA-CLIP's share: CLIP_TEXT sizes, width W, output embed_dim E."""
    width, ctx, vocab = CLIP_TEXT["width"], CLIP_TEXT["context_length"], CLIP_TEXT["vocab_size"]

    def rand(*shape: int) -> Tensor:
        return 0.02 * torch.randn(*shape, generator=gen)

    out = {"token_embedding.weight": rand(vocab, width), "positional_embedding": rand(ctx, width)}
    for i in range(CLIP_TEXT["layers"]):
        block = f"transformer.resblocks.{i}."
        out |= {
            block + "ln_1.weight": torch.ones(width),
            block + "ln_1.bias": torch.zeros(width),
            block + "attn.in_proj_weight": rand(3 * width, width),
            block + "attn.in_proj_bias": torch.zeros(3 * width),
            block + "attn.out_proj.weight": rand(width, width),
            block + "attn.out_proj.bias": torch.zeros(width),
            block + "ln_2.weight": torch.ones(width),
            block + "ln_2.bias": torch.zeros(width),
            block + "mlp.c_fc.weight": rand(4 * width, width),
            block + "mlp.c_fc.bias": torch.zeros(4 * width),
            block + "mlp.c_proj.weight": rand(width, 4 * width),
            block + "mlp.c_proj.bias": torch.zeros(width),
        }
    out |= {"ln_final.weight": torch.ones(width), "ln_final.bias": torch.zeros(width)}
    if siglip:  # proj_bias=True: an nn.Linear
        out |= {
            "text_projection.weight": rand(embed_dim, width),
            "text_projection.bias": torch.zeros(embed_dim),
        }
    else:  # a [W, E] parameter, applied as x @ text_projection
        out["text_projection"] = rand(width, embed_dim)
    return out
