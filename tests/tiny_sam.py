"""A tiny SAM for tests (segment_anything's ViT-B takes 25-30 s per image on CPU): registered as ``vit_tiny``."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from training.data.sam_models import register_sam_model


def build_sam_vit_tiny(checkpoint: None = None) -> Sam:
    """A tiny SAM (about 0.2 M parameters, 256-pixel input): same classes as the real models.

    segment_anything's ViT-B takes ~25-30 s per image on CPU, far too slow for tests. Like the real builders this
    returns a randomly initialised model; `training.data.sam_models.build_sam` loads the checkpoint.
    """
    if checkpoint is not None:
        raise ValueError("build_sam_vit_tiny builds a random model; load weights with build_sam(..., checkpoint)")
    prompt_embed_dim, image_size, patch_size = 32, 256, 16
    image_embedding_size = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_embed_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def register() -> None:
    """Make ``--model_type vit_tiny`` available (scripts called in this process see it)."""
    register_sam_model("vit_tiny", build_sam_vit_tiny)
