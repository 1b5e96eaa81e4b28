"""Inputs and providers of each benchmark case: what runs, on which tensors, checked on what."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xclip_fast import reference
from xclip_fast.bench.cases import Case
from xclip_fast.bench.results import Skip
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.checkpoints import split_encoder_state_dict
from xclip_fast.encoder import PRESETS, XCLIPVideoEncoder
from xclip_fast.ops import attention as fast_attention
from xclip_fast.ops import triton_status

__all__ = ["Skip", "SDPA", "PROVIDERS", "ALL_PROVIDERS", "FAST", "Workload", "grad_out", "original_encoder",
           "original_forward"]

SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-math": "MATH"}
# provider -> (backend, compiled, chunked): matched by exact name, never by prefix
FAST = {
    "xclip-fast-torch": ("torch", False, False),
    "xclip-fast-triton": ("triton", False, False),
    "xclip-fast-torch-compiled": ("torch", True, False),
    "xclip-fast-triton-compiled": ("triton", True, False),
    "xclip-fast-torch-chunked": ("torch", False, True),
    "xclip-fast-triton-chunked": ("triton", False, True),
}
_COMPILED = ["reference-compiled", "xclip-fast-torch-compiled", "xclip-fast-triton-compiled"]
PROVIDERS = {
    # attention level: the baselines are the SDPA backends and xformers (torch.compile of one SDPA call
    # has nothing to fuse); torch.compile is measured where it can fuse, on the block and the encoder
    "attention": ["reference", *SDPA, "xformers", "xclip-fast-torch", "xclip-fast-triton"],
    "block": ["reference", *SDPA, "xformers", "xclip-fast-torch", "xclip-fast-triton", *_COMPILED],
    "encoder": ["reference", "xclip-fast-torch", "xclip-fast-triton", *_COMPILED, "xclip-fast-torch-chunked",
                "xclip-fast-triton-chunked"],
}
ALL_PROVIDERS = sorted({p for ps in PROVIDERS.values() for p in ps})


def _only_sdpa(name: str, fn):
    """``fn`` run with one SDPA backend allowed; a backend that cannot serve the inputs is a Skip."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        try:
            with sdpa_kernel([getattr(SDPBackend, SDPA[name])]):
                return fn()
        except RuntimeError as exc:
            if "No viable backend" in str(exc) or "No available kernel" in str(exc):
                raise Skip(f"SDPA {SDPA[name]} cannot run these inputs here") from None
            raise
    return run


def _xformers_attention(device):
    """xformers' memory-efficient attention on (B, H, S, D) tensors (it takes (B, S, H, D))."""
    try:
        import xformers.ops as xops
    except Exception as exc:
        raise Skip(f"xformers is not installed or does not import ({type(exc).__name__})") from None
    if device.type != "cuda":
        raise Skip("xformers attention needs CUDA")
    mea = xops.memory_efficient_attention
    probe = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
    try:  # a build for another torch loads no kernels: it then has no operator for any input
        mea(probe, probe, probe)
    except NotImplementedError as exc:
        raise Skip(f"xformers has no attention operator here: {str(exc).splitlines()[0]}") from None
    return lambda q, k, v: mea(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _mha_with(attend):
    """An ``nn.MultiheadAttention`` self-attention (in-projection, heads, out-projection) whose
    attention itself is ``attend`` on (B, H, S, D) tensors; for the original block's dataflow."""
    def mha(attn, y, attn_mask):  # y: (S, B, d) seq-first
        if attn_mask is not None:
            raise Skip("this attention kernel takes no mask")
        S, B, d = y.shape
        H = attn.num_heads
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(S, B, 3, H, d // H)
        q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.unbind(2))
        return attn.out_proj(attend(q, k, v).permute(2, 0, 1, 3).reshape(S, B, d))
    return mha


def _compile(fn, device, quick):
    """``torch.compile(fn)`` for one case: static shapes, so each case is compiled for its own sizes
    (as a user compiles for a fixed T) and no earlier case's shapes turn it dynamic."""
    if quick and device.type == "cpu":
        raise Skip("--quick: torch.compile warm-up takes minutes on CPU")
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - platform dependent
        raise Skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}") from None


def _triton_or_skip(device):
    if device.type != "cuda":
        raise Skip("triton kernels need CUDA (the CPU interpreter checks correctness, it is not for timing)")
    ok, why = triton_status(device)
    if not ok:
        raise Skip(why)


def original_encoder(enc: XCLIPVideoEncoder, T: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The original CCT and MIT (``reference.py``) with ``enc``'s weights, built for T frames (as the
    official code is; default: the trained frame count); the MIT's frame position embedding is the
    encoder's for T frames (interpolated when T differs from the trained length), so that every
    provider computes the same function."""
    cfg = enc.config
    T = cfg["num_frames"] if T is None else T
    visual = reference.CrossFrameCommunicationTransformer(cfg["input_resolution"], cfg["patch_size"], cfg["width"],
                                                          cfg["layers"], cfg["heads"], cfg["embed_dim"], T=T)
    mit = reference.MultiframeIntegrationTransformer(T, cfg["embed_dim"], cfg["mit_layers"], cfg["mit_heads"])
    visual_sd, mit_sd = split_encoder_state_dict(enc.state_dict())
    mit_sd["positional_embedding"] = enc.mit.position_embedding(T).detach()
    visual.load_state_dict(visual_sd)
    mit.load_state_dict(mit_sd)
    return visual, mit


def original_forward(visual: torch.nn.Module, mit: torch.nn.Module):
    """``video (b, T, 3, H, W) -> (b, E)`` through the original modules, as the official code calls them."""
    def forward(video):
        return mit(visual(video.flatten(0, 1))[0].view(video.shape[0], video.shape[1], -1))
    return forward


class _Attention:
    """The attention level: q/k/v (and the message token) as leaves, SDPA, xformers and our op."""

    def _setup_attention(self):
        c = self.case
        H, D = c.heads, c.width // c.heads
        if c.kind == "frames":
            N, l = c.batch * c.frames, c.tokens
            self.leaves = {"q": self._randn(N, l, H, D), "k": self._randn(N, l, H, D), "v": self._randn(N, l, H, D),
                           "q_msg": self._randn(N, H, D), "extra_k": self._randn(N, H, D),
                           "extra_v": self._randn(N, H, D)}
        else:
            self.leaves = {n: self._randn(c.batch, c.frames, H, D) for n in ("q", "k", "v")}
        for t in self.leaves.values():
            t.requires_grad_(self.grad)
        self.checked = [n for n in self.leaves if n != "q_msg"]

    def _original_attention(self, attend):
        """Concatenate the message token, attend over l+1 tokens (``attend`` on (B, H, S, D)), slice."""
        L = self.leaves
        if self.case.kind == "frames":
            q = torch.cat([L["q"], L["q_msg"][:, None]], dim=1)
            k = torch.cat([L["k"], L["extra_k"][:, None]], dim=1)
            v = torch.cat([L["v"], L["extra_v"][:, None]], dim=1)
        else:
            q, k, v = L["q"], L["k"], L["v"]
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return o[:, : L["q"].shape[1]]

    def _attention_provider(self, name):
        L = self.leaves
        if name == "reference":
            return lambda: self._original_attention(F.scaled_dot_product_attention)
        if name in SDPA:
            return _only_sdpa(name, lambda: self._original_attention(F.scaled_dot_product_attention))
        if name == "xformers":
            attend = _xformers_attention(self.device)
            return lambda: self._original_attention(attend)
        backend, _, _ = FAST[name]
        if backend == "triton":
            _triton_or_skip(self.device)
        extra = (L["extra_k"], L["extra_v"]) if self.case.kind == "frames" else ()
        return lambda: fast_attention(L["q"], L["k"], L["v"], *extra, backend=backend)

    def flops(self, mode: str) -> float | None:
        """Useful FLOPs (the attention the model needs, not what a provider wastes); None at the
        other levels."""
        if self.case.level != "attention":
            return None
        c = self.case
        if c.kind == "frames":
            B, sq, sk = c.batch * c.frames, c.tokens, c.tokens + 1
        else:
            B, sq, sk = c.batch, c.frames, c.frames
        fwd = 4.0 * B * c.heads * sq * sk * (c.width // c.heads)  # QK^T and PV, 2 FLOPs per MAC
        return fwd if mode == "fwd" else 3.5 * fwd  # backward: 5 matmuls to the forward's 2

    def bytes(self, mode: str) -> float | None:
        """Compulsory bytes: fwd reads q, k, v (+ extra k, v) and writes o; fwdbwd also reads
        q, k, v, o, do (+ extra) and writes dq, dk, dv (+ extra dk, dv); None at the other levels."""
        if self.case.level != "attention":
            return None
        c = self.case
        elt = torch.finfo(self.dtype).bits // 8
        if c.kind == "frames":
            tok, extra = c.batch * c.frames * c.tokens * c.width, c.batch * c.frames * c.width
        else:
            tok, extra = c.batch * c.frames * c.width, 0
        fwd = (4 * tok + 2 * extra) * elt
        return fwd if mode == "fwd" else fwd + (8 * tok + 4 * extra) * elt


class _Block:
    """The block level: the original CCT block (eager, per SDPA backend, xformers, compiled) and ours."""

    def _setup_block(self):
        c = self.case
        self.ref = self._own(reference.CrossFramelAttentionBlock(c.width, c.heads, T=c.frames))
        self.leaves = {"x": self._randn(c.tokens, c.batch * c.frames, c.width).requires_grad_(self.grad)}
        self.checked = ["x"]

    def _fast_block(self, backend):
        block = CrossFrameAttentionBlock(self.case.width, self.case.heads, T=self.case.frames, backend=backend)
        block.load_state_dict(self.ref.state_dict())
        return self._own(block)

    def _block_provider(self, name):
        x, T = self.leaves["x"], self.case.frames
        if name == "reference":
            return lambda: self.ref(x)
        if name == "reference-compiled":
            compiled = _compile(self.ref, self.device, self.quick)
            return lambda: compiled(x)
        if name in SDPA:
            return _only_sdpa(name, lambda: self.ref(x))
        if name == "xformers":
            mha = _mha_with(_xformers_attention(self.device))
            return lambda: reference.cross_frame_block_forward(self.ref, x, T, attention=mha)
        backend, compiled, _ = FAST[name]
        if backend == "triton":
            _triton_or_skip(self.device)
        block = self._fast_block(backend)  # one block per provider: its backend is fixed
        fn = _compile(block, self.device, self.quick) if compiled else block
        return lambda: fn(x)


class _Encoder:
    """The encoder level (inference): the original CCT + MIT (eager, compiled) and ours (eager,
    compiled, chunked)."""

    def _setup_encoder(self):
        c = self.case
        p = PRESETS[c.model]
        self.enc = XCLIPVideoEncoder.from_config(c.model, num_frames=c.frames).to(self.device, self.dtype).eval()
        self.enc.requires_grad_(False)
        r = p["input_resolution"]
        self.leaves = {"video": self._randn(c.batch, c.frames, 3, r, r)}
        self.checked = []
        self.weights_mib = sum(t.numel() * t.element_size() for t in self.enc.parameters()) / 2**20
        self.activation_mib = c.batch * c.frames * c.tokens * c.width * torch.finfo(self.dtype).bits / 8 / 2**20

    def _reference_encoder(self):
        if not hasattr(self, "_ref_modules"):
            self._ref_modules = tuple(m.to(self.device, self.dtype).eval().requires_grad_(False)
                                      for m in original_encoder(self.enc, self.case.frames))
        return self._ref_modules

    def _encoder_provider(self, name):
        video, c = self.leaves["video"], self.case
        if name in ("reference", "reference-compiled"):
            forward = original_forward(*self._reference_encoder())

            def original():
                return forward(video)
            return _compile(original, self.device, self.quick) if name == "reference-compiled" else original
        backend, compiled, chunked = FAST[name]
        if backend == "triton":
            _triton_or_skip(self.device)
        chunk = c.chunk_frames if chunked else None
        if compiled:
            enc = XCLIPVideoEncoder.from_config(c.model, num_frames=c.frames, backend=backend)
            enc.load_state_dict(self.enc.state_dict())
            enc = enc.to(self.device, self.dtype).eval().requires_grad_(False)
            fn = _compile(enc, self.device, self.quick)
            return lambda: fn(video)
        enc = self.enc

        def run():  # the encoder is shared by the eager fast providers: choose the backend at call time
            enc.backend = backend
            return enc(video, chunk_frames=chunk)
        return run


class Workload(_Attention, _Block, _Encoder):
    """Inputs and providers of one case, built deterministically from a seed (each level's in its
    own base class)."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device, grad: bool, quick: bool = False):
        self.case, self.dtype, self.device, self.grad, self.quick = case, dtype, device, grad, quick
        self.modules = []  # whose parameter gradients are cleared between calls
        torch.manual_seed(0)
        getattr(self, f"_setup_{case.level}")()

    def _randn(self, *shape) -> torch.Tensor:
        """Inputs drawn in float32 on the device (seeded), then cast: the same values in every dtype
        (on CUDA, drawing the largest cases on the CPU took seconds each)."""
        return torch.randn(*shape, device=self.device).to(self.dtype)

    def _own(self, module):
        module = module.to(self.device, self.dtype)
        module.requires_grad_(self.grad)
        self.modules.append(module)
        return module

    def provider(self, name):
        """A callable running provider ``name`` once (forward only); raises :class:`Skip`."""
        if name not in PROVIDERS[self.case.level]:
            raise Skip(f"not a provider of the {self.case.level} level")
        return getattr(self, f"_{self.case.level}_provider")(name)

    def run(self, fn, mode: str, grad_out: torch.Tensor | None = None):
        """One call in ``mode``: forward under no_grad, or forward + backward from ``grad_out``."""
        if mode == "fwd":
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(grad_out if grad_out is not None else torch.ones_like(out))
        return out

    def clear_grads(self):
        for t in self.grad_tensors():
            t.grad = None

    def grad_tensors(self):
        tensors = list(self.leaves.values())
        for m in self.modules:
            tensors += list(m.parameters())
        return tensors

    def results(self, out, mode):
        """The tensors a provider is checked on: the output, and in fwdbwd the input gradients."""
        res = {"output": out.detach()}
        if mode == "fwdbwd":
            for n in self.checked:
                g = self.leaves[n].grad
                res[f"grad {n}"] = g.detach() if g is not None else torch.zeros_like(self.leaves[n])
        return res


def grad_out(w: Workload, mode: str, seed: int = 1):
    """The output gradient of fwdbwd runs: the same values for every provider and precision."""
    if mode == "fwd":
        return None
    c = w.case
    H, D = c.heads, c.width // c.heads
    shape = {"frames": (c.batch * c.frames, c.tokens, H, D), "messages": (c.batch, c.frames, H, D),
             "block": (c.tokens, c.batch * c.frames, c.width)}[c.kind]
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(w.device, w.dtype)
