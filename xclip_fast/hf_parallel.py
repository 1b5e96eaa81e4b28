"""A patched Hugging Face ``XCLIPModel`` under frame parallelism: each process holds its own frames
of every clip (:class:`xclip_fast.parallel.FrameParallel`); what crosses frames is exchanged so that
everything after the vision tower is the same on every process (see :func:`xclip_fast.hf.patch_xclip`).

The vision layers exchange the message-token inputs themselves (:mod:`xclip_fast.functional`); here
are the model-level steps of transformers' ``XCLIPModel.forward`` and ``get_video_features``, in its
order, with the two that read every frame made whole: the MIT's input (gathered) and the prompt
generator's mean over frames of the visual tokens (a sum over the processes). Imported by
:mod:`xclip_fast.hf` once transformers is there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.x_clip import modeling_x_clip as hfx
from transformers.utils import can_return_tuple

__all__ = ["video_and_mit", "video_features", "forward"]


def video_and_mit(model: nn.Module, pixel_values: torch.Tensor, frame_parallel, kwargs: dict):
    """The vision tower on this process's frames ``pixel_values (b, t, C, H, W)`` and the MIT on the
    whole clip's frame embeddings (gathered): ``(vision outputs, MIT outputs)``."""
    if pixel_values is None or pixel_values.dim() != 5:
        raise ValueError("frame parallelism needs pixel_values (b, t, C, H, W): this process's t frames of each video")
    b, t, c, h, w = pixel_values.shape
    frame_parallel.check_local(t, "pixel_values")
    vision_outputs = model.vision_model(pixel_values=pixel_values.reshape(-1, c, h, w), frame_parallel=frame_parallel,
                                        **kwargs)
    cls_features = model.visual_projection(vision_outputs[1]).view(b, t, -1)
    rest = {k: v for k, v in kwargs.items() if k not in ("num_frames", "interpolate_pos_encoding")}
    return vision_outputs, model.mit(cls_features, frame_parallel=frame_parallel, **rest)


@can_return_tuple
def video_features(model, pixel_values, frame_parallel, **kwargs):
    """``get_video_features`` with this process's frames: the vision outputs are this process's,
    ``pooler_output`` the whole clip's video embedding."""
    vision_outputs, mit_outputs = video_and_mit(model, pixel_values, frame_parallel, kwargs)
    vision_outputs.pooler_output = mit_outputs.pooler_output
    return vision_outputs

@can_return_tuple
def forward(model, input_ids, pixel_values, attention_mask, position_ids, return_loss, interpolate_pos_encoding,
            frame_parallel, **kwargs):
    """``XCLIPModel.forward`` with this process's frames in ``pixel_values`` (transformers' steps,
    in its order): the MIT's input and the prompt generator's mean over frames of the visual
    tokens are the whole clip's, so everything after the vision tower is the same on every
    process; ``vision_model_output`` holds this process's frames."""
    vision_outputs, mit_outputs = video_and_mit(model, pixel_values, frame_parallel,
                                                dict(kwargs, interpolate_pos_encoding=interpolate_pos_encoding))
    b, t = pixel_values.shape[:2]
    kwargs.pop("num_frames", None)  # (the text tower's layers take none)
    video_embeds = mit_outputs[1]
    img_features = model.prompts_visual_layernorm(vision_outputs[0][:, 1:, :]) @ model.prompts_visual_projection
    # the mean over the clip's frames: summed in float32 at least and rounded once, as mean() does
    acc = torch.promote_types(img_features.dtype, torch.float32)
    img_sum = frame_parallel.sum(img_features.view(b, t, -1, video_embeds.shape[-1]).sum(dim=1, dtype=acc))
    img_features = (img_sum / frame_parallel.num_frames).to(img_features.dtype)
    text_outputs = model.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, **kwargs)
    text_embeds = model.text_projection(text_outputs[1]).unsqueeze(0).expand(b, -1, -1)
    text_embeds = text_embeds + model.prompts_generator(text_embeds, img_features)
    video_embeds = video_embeds / video_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    logits_per_video = torch.einsum("bd,bkd->bk", video_embeds, model.logit_scale.exp() * text_embeds)
    logits_per_text = logits_per_video.T
    loss = hfx.image_text_contrastive_loss(logits_per_text) if return_loss else None
    return hfx.XCLIPOutput(loss=loss, logits_per_video=logits_per_video, logits_per_text=logits_per_text,
                           text_embeds=text_embeds, video_embeds=video_embeds, text_model_output=text_outputs,
                           vision_model_output=vision_outputs, mit_output=mit_outputs)
