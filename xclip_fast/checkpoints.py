"""Loading official X-CLIP checkpoints and Hugging Face X-CLIP weights into ``XCLIPVideoEncoder``.

Official files are ``torch.save({"model": state_dict, ...})`` with the video encoder under
``visual.*`` and ``mit.*`` (our keys exactly). Hugging Face keys map as follows (DESIGN.md §1):
``vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}`` ->
``visual.{class_embedding, conv1, positional_embedding}``, ``vision_model.{pre,post}_layernorm`` ->
``visual.ln_{pre,post}``, ``vision_model.encoder.layers.{i}`` -> ``visual.transformer.resblocks.{i}``
with ``self_attn -> attn``, ``layer_norm{1,2} -> ln_{1,2}``, ``mlp.fc{1,2} -> mlp.c_{fc,proj}`` and
the separate ``q/k/v_proj`` merged into ``in_proj_weight/bias`` (rows q, k, v);
``visual_projection.weight (E, d)`` -> ``visual.proj (d, E)``; ``mit.position_embedding`` ->
``mit.positional_embedding``, ``mit.encoder.layers.{j}`` -> ``mit.resblocks.{j}``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict

import torch

__all__ = ["hf_to_official", "official_to_hf", "config_from_state_dict", "load_official", "load_hf",
           "split_encoder_state_dict", "HUB_NAME"]

# a Hugging Face hub model name, "owner/name"
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def split_encoder_state_dict(sd: dict) -> tuple[dict, dict]:
    """An encoder state dict (official keys) split into the CCT's ``visual.*`` and the MIT's ``mit.*``
    parts, prefixes removed (the state dicts of the reference modules)."""
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    mit = {k.removeprefix("mit."): v for k, v in sd.items() if k.startswith("mit.")}
    return visual, mit

# (official, Hugging Face) name prefixes; "{i}" is a layer index
_TOP = [
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layernorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.transformer.resblocks.{i}.", "vision_model.encoder.layers.{i}."),
    ("visual.proj", "visual_projection.weight"),
    ("mit.positional_embedding", "mit.position_embedding"),
    ("mit.resblocks.{i}.", "mit.encoder.layers.{i}."),
]
_LAYER = [
    ("attn.", "self_attn."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("message_attn.", "message_attn."),
    ("message_fc.", "message_fc."),
    ("message_ln.", "message_ln."),
]
_TRANSPOSED = ("visual.proj",)
_IGNORED_HF = re.compile(r"(^|\.)position_ids$")  # a buffer, not a weight


def _prefix_regex(prefix: str):
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(\d+)"))


def _translate(key: str, pairs, src: int):
    """Rename ``key`` by the first pair whose ``src`` side (0 official, 1 HF) prefixes it."""
    for pair in pairs:
        m = _prefix_regex(pair[src]).match(key)
        if m:
            dst = pair[1 - src].replace("{i}", m.group(1)) if m.groups() else pair[1 - src]
            return dst, key[m.end():], pair
    return None


def _normalise_hf_keys(sd: dict) -> dict:
    """Standalone ``XCLIPVisionModel`` state dicts (transformers 5.x) have no ``vision_model.`` prefix."""
    vision_only = ("embeddings.", "encoder.", "pre_layernorm.", "post_layernorm.")
    if any(k.startswith(vision_only) for k in sd) and not any(k.startswith("vision_model.") for k in sd):
        return {("vision_model." + k if k.startswith(vision_only) else k): v for k, v in sd.items()}
    return sd


def hf_to_official(state_dict: dict) -> tuple[dict, list]:
    """Hugging Face X-CLIP keys -> official ``visual.*``/``mit.*`` keys.

    Returns ``(converted, skipped)``: ``skipped`` lists the keys that are not part of the video
    encoder (text model, prompts, logit scale, ...)."""
    out, skipped = {}, []
    qkv = defaultdict(dict)
    for key, value in _normalise_hf_keys(state_dict).items():
        if _IGNORED_HF.search(key):
            continue
        hit = _translate(key, _TOP, src=1)
        if hit is None:
            skipped.append(key)
            continue
        name, rest, pair = hit
        if "{i}" in pair[0]:  # inside a layer
            inner = _translate(rest, _LAYER, src=1)
            if inner is None:
                skipped.append(key)
                continue
            sub, rest2, _ = inner
            m = re.fullmatch(r"([qkv])_proj\.(weight|bias)", rest2)
            if m and sub.endswith("attn."):
                qkv[f"{name}{sub}in_proj_{m.group(2)}"][m.group(1)] = value
                continue
            out[name + sub + rest2] = value
        else:
            out[name + rest] = value.t() if name in _TRANSPOSED else value
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete q/k/v projections for {name}: found only {sorted(parts)}")
        shapes = {p: tuple(parts[p].shape) for p in "qkv"}
        if len(set(shapes.values())) > 1:
            hf_name = official_to_hf_name(name)
            raise ValueError(f"q/k/v projections of different shapes for {hf_name}: "
                             + ", ".join(f"{p}_proj {shape}" for p, shape in shapes.items()))
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, skipped


def official_to_hf_name(key: str) -> str:
    """The Hugging Face name of an official key (``in_proj_*`` as ``{q,k,v}_proj.*``), for messages."""
    hit = _translate(key, _TOP, src=0)
    if hit is None:
        return key
    name, rest, pair = hit
    if "{i}" not in pair[0]:
        return name + rest
    inner = _translate(rest, _LAYER, src=0)
    if inner is None:
        return name + rest
    sub, rest2, _ = inner
    return name + sub + rest2.replace("in_proj_", "{q,k,v}_proj.")


def official_to_hf(state_dict: dict) -> dict:
    """Official ``visual.*``/``mit.*`` keys -> Hugging Face ``XCLIPModel`` keys (video encoder part)."""
    out = {}
    for key, value in state_dict.items():
        hit = _translate(key, _TOP, src=0)
        if hit is None:
            raise ValueError(f"not a video-encoder key: {key}")
        name, rest, pair = hit
        if "{i}" not in pair[0]:
            out[name + rest] = value.t() if key in _TRANSPOSED else value
            continue
        inner = _translate(rest, _LAYER, src=0)
        if inner is None:
            raise ValueError(f"unknown layer key: {key}")
        sub, rest2, _ = inner
        m = re.fullmatch(r"in_proj_(weight|bias)", rest2)
        if m:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{name}{sub}{part}_proj.{m.group(1)}"] = chunk
        else:
            out[name + sub + rest2] = value
    return out


def _indices(sd: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _layers(sd: dict, prefix: str, what: str) -> int:
    """The number of blocks under ``prefix`` (``visual.transformer.resblocks`` or ``mit.resblocks``);
    a gap in the numbering is an error (a damaged or filtered checkpoint)."""
    found = _indices(sd, re.escape(prefix) + r"\.(\d+)\.")
    if found and found != list(range(len(found))):
        missing = sorted(set(range(found[-1] + 1)) - set(found))
        raise ValueError(f"{what}: blocks {missing} are missing from the checkpoint ({prefix}.<i> for i in "
                         f"{found[0]}..{found[-1]}); it is incomplete")
    return len(found)


def config_from_state_dict(sd: dict) -> dict:
    """Constructor arguments of :class:`XCLIPVideoEncoder` read off official-key weights.

    Head counts cannot be read off weights: the official convention (64-wide heads) is used. MLP
    widths come from the weights. A vision-only state dict has no projection and no MIT:
    ``embed_dim`` then defaults to 512 and ``num_frames`` to 8 (override them when loading)."""
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding") if k not in sd]
    if missing:
        raise ValueError(f"cannot read the model configuration: missing {missing}")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if "visual.proj" in sd:
        embed_dim = sd["visual.proj"].shape[1]
    elif "mit.positional_embedding" in sd:
        embed_dim = sd["mit.positional_embedding"].shape[2]
    else:
        embed_dim = 512
    frames = sd["mit.positional_embedding"].shape[1] if "mit.positional_embedding" in sd else 8
    config = dict(
        input_resolution=patch * grid, patch_size=patch, width=width,
        layers=_layers(sd, "visual.transformer.resblocks", "the vision transformer"), heads=max(1, width // 64),
        embed_dim=embed_dim, num_frames=frames, mit_layers=max(1, _layers(sd, "mit.resblocks", "the MIT")),
        mit_heads=max(1, embed_dim // 64),
    )
    for key, name in (("visual.transformer.resblocks.0.mlp.c_fc.weight", "intermediate_size"),
                      ("mit.resblocks.0.mlp.c_fc.weight", "mit_intermediate_size")):
        if key in sd:
            config[name] = sd[key].shape[0]
    return config


# released depths per vision width (B/32, B/16: 768 x 12; L/14, L/14@336: 1024 x 24)
_RELEASED_LAYERS = {768: 12, 1024: 24}


def _check_depth(config: dict, overrides: dict, strict: bool, source: str) -> None:
    """A checkpoint whose vision depth differs from every released model of its width would load as
    a shallower (or deeper) model without complaint: refuse under ``strict`` unless ``layers=`` is
    given, so a file missing its last blocks is not taken for a smaller model."""
    width, layers = config["width"], config["layers"]
    expected = _RELEASED_LAYERS.get(width)
    if "layers" in overrides or expected is None or layers == expected:
        return
    message = (f"{source}: the checkpoint holds {layers} vision blocks where released X-CLIP models of width "
               f"{width} have {expected}; it may be missing blocks. Pass layers={layers} to load it as a "
               f"{layers}-block model")
    if strict:
        raise ValueError(message + " (or strict=False)")
    warnings.warn(message, stacklevel=4)


def _dtype(value, default: torch.dtype) -> torch.dtype:
    """``dtype=`` as a torch dtype or its name (``"float16"``)."""
    from xclip_fast.dtypes import BY_NAME

    if value is None:
        return default
    if isinstance(value, torch.dtype) and value in BY_NAME.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in BY_NAME:
        return BY_NAME[value.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(BY_NAME)} (or the torch dtype), got {value!r}")


def _load_into(cls, sd: dict, skipped: list, strict: bool, config: dict, overrides: dict, source: str):
    dtype = _dtype(overrides.pop("dtype", None), sd["visual.conv1.weight"].dtype)
    _check_depth(config, overrides, strict, source)
    config = {**config, **overrides}
    encoder = cls(**config).to(dtype)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"{source} does not match the video encoder: "
                         f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'} "
                         "(pass strict=False to load what matches)")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: shape mismatch (wrong configuration?): " + "; ".join(wrong))
    encoder.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    encoder.load_report = dict(skipped=skipped, missing=missing, unexpected=unexpected)
    if missing:
        warnings.warn(f"{source}: {len(missing)} encoder weights were not in the checkpoint and keep their random "
                      f"initialisation (strict=False): {missing[:6]}{' ...' if len(missing) > 6 else ''}",
                      stacklevel=3)
    return encoder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path: str, weights_only: bool = True) -> dict:
    """A checkpoint file (``.safetensors`` or a PyTorch pickle) as a dict; any failure is one
    ``ValueError`` naming the file and the problem."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package") from exc
        try:
            return load_file(path)
        except Exception as exc:
            raise ValueError(f"cannot read {path} as a safetensors file ({_first_line(exc)})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        if weights_only and "Unsupported global" in str(exc):
            raise ValueError(f"{path} holds more than tensors (official files also pickle their training "
                             "config); if you trust the file, pass weights_only=False") from exc
        raise ValueError(f"cannot read {path} as a PyTorch or safetensors checkpoint ({_first_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _source(obj) -> str:
    return f"{os.fspath(obj)}" if isinstance(obj, (str, os.PathLike)) else f"the given {type(obj).__name__}"


def load_official(cls, path_or_state_dict, *, strict: bool = True, weights_only: bool = True, **overrides):
    """See :meth:`XCLIPVideoEncoder.from_official`."""
    obj = path_or_state_dict
    source = _source(obj)
    if isinstance(obj, (str, os.PathLike)):
        obj = read_checkpoint(os.fspath(obj), weights_only)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict or a {{'model': state_dict}} checkpoint, got {type(obj).__name__}")
    sd = obj.get("model", obj) if "model" in obj and isinstance(obj["model"], dict) else obj
    if not any(k.startswith("visual.") for k in sd):
        hint = " (looks like Hugging Face weights: use from_hf)" if any("vision_model." in k for k in sd) else ""
        raise ValueError(f"{source}: no 'visual.*' keys: not an official X-CLIP checkpoint{hint}")
    video = {k: v for k, v in sd.items() if k.startswith(("visual.", "mit."))}
    skipped = sorted(k for k in sd if k not in video)
    return _load_into(cls, video, skipped, strict, config_from_state_dict(video), overrides, source)


def _config_from_hf(config) -> dict:
    """Constructor arguments from a transformers ``XCLIPConfig`` or ``XCLIPVisionConfig`` (any MLP
    width, activation and LayerNorm epsilon)."""
    vision = getattr(config, "vision_config", config)
    image = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return dict(
        input_resolution=image, patch_size=patch, width=vision.hidden_size, layers=vision.num_hidden_layers,
        heads=vision.num_attention_heads, embed_dim=vision.mit_hidden_size, num_frames=vision.num_frames,
        mit_layers=vision.mit_num_hidden_layers, mit_heads=vision.mit_num_attention_heads,
        layer_norm_eps=vision.layer_norm_eps, intermediate_size=vision.intermediate_size,
        mit_intermediate_size=vision.mit_intermediate_size, hidden_act=getattr(vision, "hidden_act", "quick_gelu"),
    )


def _read_hf_config(path: str):
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a JSON model configuration ({_first_line(exc)})") from exc
    try:
        from transformers import XCLIPConfig, XCLIPVisionConfig

        return (XCLIPConfig if "vision_config" in raw else XCLIPVisionConfig).from_dict(raw)
    except Exception as exc:
        raise ValueError(f"{path} is not an X-CLIP configuration ({_first_line(exc)})") from exc


def _read_hf_folder(folder: str):
    sd = None
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            sd = read_checkpoint(path)
            break
    if sd is None:
        shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"{folder}: no model.safetensors, pytorch_model.bin or *.safetensors shards")
        sd = {}
        for f in shards:
            sd.update(read_checkpoint(os.path.join(folder, f)))
    cfg_path = os.path.join(folder, "config.json")
    return sd, (_read_hf_config(cfg_path) if os.path.exists(cfg_path) else None)


def looks_local(path: str) -> bool:
    """A path the user means as a local file or folder (so a missing one is not looked up on the hub)."""
    return (path.startswith((".", "/", "~")) or os.sep in path.rstrip(os.sep).split("/", 1)[-1]
            or path.endswith((".pth", ".pt", ".bin", ".safetensors", ".json")) or not HUB_NAME.fullmatch(path))


def _download(name: str):
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as exc:
        raise ValueError(f"{name!r} is not a local file or folder, and fetching it as a Hugging Face hub model "
                         f"failed ({type(exc).__name__}: {_first_line(exc)})") from exc
    return _read_hf_folder(folder)


def load_hf(cls, obj, *, strict: bool = True, **overrides):
    """See :meth:`XCLIPVideoEncoder.from_hf`.

    Accepts a transformers ``XCLIPModel``/``XCLIPVisionModel`` (configuration from its config), a
    state dict, a ``.safetensors``/``.bin`` file, a ``save_pretrained`` folder (with config.json),
    or a hub name such as ``"microsoft/xclip-base-patch32"`` (downloaded with huggingface_hub, so it
    needs network access; a path that exists locally always wins, and one that looks local is never
    looked up). Without a config, head counts follow the official 64-wide convention unless
    ``heads=``/``mit_heads=`` are given. A vision-only model has no projection and no MIT: load it
    with ``strict=False`` (those stay randomly initialised and are listed as missing).
    """
    config = None
    source = _source(obj)
    if isinstance(obj, torch.nn.Module):
        config = getattr(obj, "config", None)
        sd = obj.state_dict()
    elif isinstance(obj, dict):
        sd = obj
    elif isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if os.path.isdir(path):
            sd, config = _read_hf_folder(path)
        elif os.path.isfile(path):
            sd = read_checkpoint(path)
        elif looks_local(path):
            raise ValueError(f"{path}: no such file or folder")
        else:
            sd, config = _download(path)
    else:
        raise ValueError(f"expected a transformers model, a state dict or a path, got {type(obj).__name__}")
    converted, skipped = hf_to_official(sd)
    if not any(k.startswith("visual.") for k in converted):
        raise ValueError(f"{source}: no X-CLIP vision weights found (expected 'vision_model.*' keys)")
    base = _config_from_hf(config) if config is not None else config_from_state_dict(converted)
    return _load_into(cls, converted, skipped, strict, base, overrides, source)
