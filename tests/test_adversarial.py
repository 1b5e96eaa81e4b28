"""Hostile and unusual inputs: no silent wrong answers.

- Non-finite values stay inside their own sequence / clip, on every kernel path (packed short
  sequences, unpacked long ones, the extra token), forward and backward, as SDPA behaves.
- Random shapes and strides (seq-first views, expanded tensors, non-contiguous last dims) against a
  float64 reference.
- Second-order gradients are refused loudly by every fast Function.
- The bad-input table of each public entry point: what raises, with which message.
"""

import math

import pytest
import torch
from _helpers import BACKENDS, assert_rel, needs_triton

import xclip_fast
from xclip_fast import ops
from xclip_fast.blocks import CrossFrameAttentionBlock, ResidualAttentionBlock
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.ops import packed_attention, resolve_backend
from xclip_fast.testing import TOLERANCES, attention_f64

DTYPE = torch.float32


# ------------------------------------------------------------------------------------------------
# non-finite values stay in their own sequence
# ------------------------------------------------------------------------------------------------
# (B, S, H, D, extra): packed (S small: several sequences share a tile), unpacked, extra token
PATHS = {"packed": (6, 5, 2, 16, False), "unpacked": (3, 70, 1, 16, False), "extra": (3, 9, 2, 16, True)}


def _inputs(B, S, H, D, extra, device):
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    if extra:
        ts += [torch.randn(B, H, D, generator=g) for _ in range(2)]
    return [t.to(device, DTYPE) for t in ts]


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v", "grad"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_value_stays_in_its_sequence(backend, path, where, bad, device):
    """One corrupt sequence (index 1): every other sequence's output and gradients equal the clean
    float64 result. On the kernels, the corrupt sequence is never silently finite: wherever float64
    attention on the corrupt input is non-finite, so is the result (packed tiles may mark more of
    that sequence non-finite). The torch backend gives there what SDPA gives (PyTorch's CPU flash
    kernel returns finite rows for a NaN query; the modules still carry the NaN through their
    residual connections, see the encoder test below)."""
    B, S, H, D, extra = PATHS[path]
    clean = _inputs(B, S, H, D, extra, device)
    dirty = [t.clone() for t in clean]
    grad = torch.randn(B, S, H, D, device=device, dtype=DTYPE)
    if where == "grad":
        grad[1, 2, 0, 3] = bad
    else:
        dirty["qkv".index(where)][1, S // 2, 0, 3] = bad
    leaves = [t.clone().requires_grad_() for t in dirty]
    out = xclip_fast.attention(*leaves, backend=backend)
    out.backward(grad)
    tol = 1e-4  # fp32 against float64 (see testing.TOLERANCES: 1e-5 per op, sums over S tokens)
    others = [i for i in range(B) if i != 1]
    names = ["q", "k", "v", "extra_k", "extra_v"]
    for inputs, g, check in ((clean, torch.where(torch.isfinite(grad), grad, 0.0), "others"), (dirty, grad, "bad")):
        ref_leaves = [t.double().requires_grad_() for t in inputs]
        ref = attention_f64(*ref_leaves)
        ref.backward(g.double())
        pairs = [("output", out, ref)] + [(f"grad {n}", t.grad, r.grad) for n, t, r in zip(names, leaves, ref_leaves)]
        for what, ours, theirs in pairs:
            if check == "others":
                assert_rel(f"{what} of the other sequences", ours[others], theirs[others], tol)
            elif backend == "triton":
                silent = torch.isfinite(ours[1]) & ~torch.isfinite(theirs[1])
                assert not silent.any(), f"{what} of the corrupt sequence is silently finite"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_clip_leaves_the_other_clips_alone(backend, device):
    """The whole encoder: one clip with a NaN frame; the other clips' embeddings and the gradients
    they send back are the clean run's (message attention and MIT pack clips together)."""
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32,
                            num_frames=4, mit_heads=2, backend=backend).to(device, DTYPE)
    video = torch.randn(5, 4, 3, 16, 16, device=device, dtype=DTYPE)
    dirty = video.clone()
    dirty[2, 1, 0, 3, 3] = math.nan
    clean_in, dirty_in = video.clone().requires_grad_(), dirty.requires_grad_()
    clean_out, dirty_out = enc(clean_in), enc(dirty_in)
    others = [0, 1, 3, 4]
    assert not torch.isfinite(dirty_out[2]).all()
    assert_rel("other clips' embeddings", dirty_out[others], clean_out[others], 1e-6)
    clean_out[others].sum().backward()
    dirty_out[others].sum().backward()
    assert_rel("other clips' input gradients", dirty_in.grad[others], clean_in.grad[others], 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mit_nan_in_one_video(backend, device):
    block = ResidualAttentionBlock(32, 2, backend=backend).to(device, DTYPE)
    x = torch.randn(4, 6, 32, device=device, dtype=DTYPE)  # (S=T, B videos, d)
    dirty = x.clone()
    dirty[1, 3, 5] = math.nan
    out_clean, out_dirty = block(x), block(dirty)
    others = [0, 1, 2, 4, 5]
    assert_rel("other videos", out_dirty[:, others], out_clean[:, others], 1e-6)
    assert not torch.isfinite(out_dirty[:, 3]).all()


# ------------------------------------------------------------------------------------------------
# random shapes and strides
# ------------------------------------------------------------------------------------------------
def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (B, S, H, D) in another memory layout."""
    if kind == "seq-first":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "last-dim":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "heads-first":
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return t


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_shapes_and_layouts_against_float64(backend, seed, device):
    g = torch.Generator().manual_seed(seed)
    B, SQ, SK, H = (int(torch.randint(1, n, (1,), generator=g)) for n in (4, 40, 40, 4))
    D = [8, 16, 24, 40, 64][seed % 5]
    extra = seed % 2 == 0
    kinds = ["seq-first", "last-dim", "heads-first", "plain"]
    q = _strided(torch.randn(B, SQ, H, D, generator=g).to(device, DTYPE), kinds[seed % 4])
    k = _strided(torch.randn(B, SK, H, D, generator=g).to(device, DTYPE), kinds[(seed + 1) % 4])
    v = torch.randn(1, SK, H, D, generator=g).to(device, DTYPE).expand(B, SK, H, D)  # one value set, stride 0
    ek = torch.randn(B, H, D, generator=g).to(device, DTYPE) if extra else None
    ev = torch.randn(1, H, D, generator=g).to(device, DTYPE).expand(B, H, D) if extra else None
    leaves = [t for t in (q, k, v, ek, ev) if t is not None]
    for t in leaves:
        t.requires_grad_()
    out = xclip_fast.attention(q, k, v, ek, ev, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = attention_f64(*ref_leaves[:3], *(ref_leaves[3:] if extra else []))
    tol = TOLERANCES[DTYPE]
    assert_rel(f"output B{B} SQ{SQ} SK{SK} H{H} D{D}", out, ref, tol)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(grad.to(device, DTYPE))
    ref.backward(grad.to(device))
    for name, t, r in zip(["q", "k", "v", "extra_k", "extra_v"], leaves, ref_leaves):
        assert_rel(f"grad {name}", t.grad, r.grad, tol)


# ------------------------------------------------------------------------------------------------
# second-order gradients
# ------------------------------------------------------------------------------------------------
def _double_backward(fn, *inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    sum(g.square().sum() for g in grads).backward()


@needs_triton
@pytest.mark.parametrize("op", ["attention", "packed_attention", "quick_gelu"])
def test_second_order_gradients_are_refused_by_the_operators(op, device):
    x = torch.randn(2, 5, 2, 16, device=device, dtype=torch.float64, requires_grad=True)
    if op == "attention":
        fn = lambda q: xclip_fast.attention(q, q, q, backend="triton")  # noqa: E731
    elif op == "packed_attention":
        fn = lambda q: packed_attention(torch.stack([q, q, q], 2), backend="triton")  # noqa: E731
    else:
        fn = lambda q: torch.ops.xclip_fast.quick_gelu(q)  # noqa: E731
    with pytest.raises(RuntimeError, match="second-order gradients through the triton .* are not supported"):
        _double_backward(fn, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradients_are_refused_by_the_block(backend, device):
    """A gradient penalty through the fast block fails loudly instead of dropping its term."""
    block = CrossFrameAttentionBlock(32, 2, T=2, backend=backend).to(device, torch.float64)
    x = torch.randn(5, 4, 32, device=device, dtype=torch.float64, requires_grad=True)
    # the triton backend refuses in its operators; on CPU the torch backend's SDPA refuses first
    with pytest.raises(RuntimeError, match="differentiate twice|second-order gradients|derivative for .* is not "
                                           "implemented"):
        _double_backward(block, x)


# ------------------------------------------------------------------------------------------------
# the backend resolver
# ------------------------------------------------------------------------------------------------
def test_auto_never_raises_for_what_torch_can_do(monkeypatch):
    """On a (simulated) GPU, "auto" takes torch for what the kernels cannot do; "triton" says why."""
    monkeypatch.setattr(ops, "triton_status", lambda device=None: (True, "CUDA device"))
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, dtype=torch.float16, head_dim=64) == "triton"
    for kwargs, why in [(dict(head_dim=129), "head dim D=129 exceeds the triton kernels' maximum 128"),
                        (dict(head_dim=64, attn_mask=True), "an attention mask is not supported"),
                        (dict(head_dim=64, dropout=True), "attention dropout is not supported"),
                        (dict(head_dim=64, dtype=torch.int32), "dtype torch.int32 is not supported")]:
        kwargs.setdefault("dtype", torch.float16)
        assert resolve_backend("auto", cuda, **kwargs) == "torch"
        with pytest.raises(ValueError, match=why):
            resolve_backend("triton", cuda, **kwargs)


@needs_triton
def test_interpreter_refuses_bf16_and_auto_falls_back(device):
    if torch.cuda.is_available():
        pytest.skip("the interpreter is only used without CUDA")
    q = torch.randn(1, 3, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 matrix products are wrong in Triton's CPU interpreter"):
        xclip_fast.attention(q, q, q, backend="triton")
    out = xclip_fast.attention(q, q, q, backend="auto")
    assert_rel("auto in bf16", out, attention_f64(q, q, q), TOLERANCES[torch.bfloat16])


# ------------------------------------------------------------------------------------------------
# the bad-input table of the public entry points
# ------------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_INPUTS = [
    # (entry point, call, exception, message)
    ("attention", lambda: xclip_fast.attention(_t(2, 3, 2, 8), [1], _t(2, 3, 2, 8)), TypeError,
     "k must be a torch.Tensor, got list"),
    ("attention", lambda: xclip_fast.attention(_t(2, 3, 2, 8), _t(2, 3, 2, 8), _t(2, 3, 2, 8), _t(2, 2, 8), None),
     ValueError, "extra_k and extra_v must be given together"),
    ("attention", lambda: xclip_fast.attention(_t(2, 3, 2, 8), _t(2, 3, 2, 8), _t(2, 3, 2, 8), backend="flash"),
     ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'flash'"),
    ("attention", lambda: xclip_fast.attention(*(torch.ones(2, 3, 2, 8, dtype=torch.int32),) * 3), ValueError,
     "dtype must be one of"),
    ("packed_attention", lambda: packed_attention(_t(2, 3, 2, 2, 8)), ValueError,
     r"qkv must be \(B, S, 3, H, D\), got \(2, 3, 2, 2, 8\)"),
    ("packed_attention", lambda: packed_attention(_t(2, 3, 3, 2, 8), _t(2, 3, 2, 8)), ValueError,
     r"extra_kv must be \(B=2, 2, H=2, D=8\), got \(2, 3, 2, 8\)"),
    ("packed_attention", lambda: packed_attention(_t(2, 3, 3, 2, 8), _t(2, 2, 2, 8, dtype=torch.float64)), ValueError,
     "dtypes differ"),
    ("CrossFrameAttentionBlock", lambda: CrossFrameAttentionBlock(64, 5), ValueError,
     "d_model must be divisible by n_head, got d_model=64, n_head=5"),
    ("CrossFrameAttentionBlock", lambda: CrossFrameAttentionBlock(64, 2, T=-1), ValueError, "T must be an int >= 0"),
    ("CrossFrameAttentionBlock.forward", lambda: CrossFrameAttentionBlock(64, 2)(_t(5, 4, 64), T=True), ValueError,
     "T must be an int >= 1"),
    ("CrossFrameAttentionBlock.forward", lambda: CrossFrameAttentionBlock(64, 2)(_t(5, 4, 64), T=3), ValueError,
     r"b\*T=4\) must be divisible by T=3"),
    ("ResidualAttentionBlock.forward", lambda: ResidualAttentionBlock(32, 2)(_t(4, 2, 16)), ValueError,
     r"x must be \(S, B, d=32\)"),
    ("XCLIPVideoEncoder", lambda: XCLIPVideoEncoder(num_frames=0), ValueError, "num_frames=0 must be an int >= 1"),
    ("XCLIPVideoEncoder", lambda: XCLIPVideoEncoder(width=100, heads=12), ValueError,
     "width=100 must be divisible by heads=12"),
    ("XCLIPVideoEncoder", lambda: XCLIPVideoEncoder(hidden_act="nope"), ValueError, "unknown activation"),
    ("XCLIPVideoEncoder.forward", lambda: _tiny()(torch.ones(1, 2, 3, 16, 16, dtype=torch.int32)), TypeError,
     "must hold floating point .* or uint8"),
    ("XCLIPVideoEncoder.forward", lambda: _tiny()(_t(1, 2, 3, 16, 16), chunk_frames=0), ValueError,
     "chunk_frames must be an int >= 1"),
    ("XCLIPVideoEncoder.forward", lambda: _tiny()(_t(1, 2, 1, 16, 16)), ValueError, "expected 3 channels"),
    ("XCLIPVideoEncoder.encode_frames", lambda: _tiny().encode_frames([_t(3, 16, 16)], num_frames=True), ValueError,
     "num_frames must be an int >= 1"),
    ("XCLIPVideoEncoder.encode_frames", lambda: _tiny().encode_frames([[1, 2]], num_frames=1), TypeError,
     "frames must be a torch.Tensor .*, got list"),
    ("from_official", lambda: XCLIPVideoEncoder.from_official({"model": {"text.weight": _t(2)}}), ValueError,
     "no 'visual.\\*' keys"),
    ("from_official", lambda: XCLIPVideoEncoder.from_official(_tiny().state_dict(), dtype="float17"), ValueError,
     "dtype must be one of"),
    ("from_hf", lambda: XCLIPVideoEncoder.from_hf("./no/such/weights.safetensors"), ValueError,
     "no such file or folder"),
    ("from_hf", lambda: XCLIPVideoEncoder.from_hf(3), ValueError, "expected a transformers model, a state dict"),
    ("patch_xclip", lambda: xclip_fast.patch_xclip(torch.nn.Linear(2, 2)), ValueError,
     "expected a transformers XCLIPModel or XCLIPVisionModel"),
]


def _tiny(**kw):
    cfg = dict(input_resolution=16, patch_size=8, width=64, layers=1, heads=2, embed_dim=32, num_frames=2,
               mit_heads=2, backend="torch")
    cfg.update(kw)
    return XCLIPVideoEncoder(**cfg)


@pytest.mark.parametrize("entry, call, exc, message", BAD_INPUTS,
                         ids=[f"{e}-{i}" for i, (e, *_) in enumerate(BAD_INPUTS)])
def test_bad_input_table(entry, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# ------------------------------------------------------------------------------------------------
# the registered operators check their own inputs (real and fake implementations)
# ------------------------------------------------------------------------------------------------
def _q(B=2, S=3, H=2, D=8, dtype=torch.float32):
    return torch.randn(B, S, H, D).to(dtype)


def _lse(B=2, H=2, S=3, dtype=torch.float32):
    return torch.randn(B, H, S, dtype=dtype)


OPS = torch.ops.xclip_fast if ops._lib is not None else None
RAW_BAD_INPUTS = [
    # (name, call on device tensors, message shared with the Python API (or None), python API call)
    ("k-batch", lambda t: OPS.attention_fwd(t(_q()), t(_q(B=1)), t(_q(B=1)), None, None, 0.5),
     r"k must be \(B=2, Sk, H=2, D=8\), got \(1, 3, 2, 8\)", lambda t: xclip_fast.attention(t(_q()), t(_q(B=1)),
                                                                                             t(_q(B=1)))),
    ("k-heads", lambda t: OPS.attention_fwd(t(_q()), t(_q(H=1)), t(_q(H=1)), None, None, 0.5),
     r"k must be \(B=2, Sk, H=2, D=8\), got \(2, 3, 1, 8\)", None),
    ("k-head-dim", lambda t: OPS.attention_fwd(t(_q()), t(_q(D=4)), t(_q(D=4)), None, None, 0.5),
     r"k must be \(B=2, Sk, H=2, D=8\), got \(2, 3, 2, 4\)", None),
    ("v-shorter", lambda t: OPS.attention_fwd(t(_q()), t(_q(S=5)), t(_q(S=4)), None, None, 0.5),
     "k and v shapes differ", lambda t: xclip_fast.attention(t(_q()), t(_q(S=5)), t(_q(S=4)))),
    ("extra-shape", lambda t: OPS.attention_fwd(t(_q()), t(_q()), t(_q()), t(_t(2, 2, 4)), t(_t(2, 2, 4)), 0.5),
     r"extra_k must be \(B=2, H=2, D=8\), got \(2, 2, 4\)", None),
    ("half-extra", lambda t: OPS.attention_fwd(t(_q()), t(_q()), t(_q()), t(_t(2, 2, 8)), None, 0.5),
     "extra_k and extra_v must be given together", None),
    ("integers", lambda t: OPS.attention_fwd(*(t(torch.ones(2, 3, 2, 8, dtype=torch.int32)),) * 3, None, None, 0.5),
     "dtype must be one of", None),
    ("mixed-dtypes", lambda t: OPS.attention_fwd(t(_q()), t(_q(dtype=torch.float64)), t(_q()), None, None, 0.5),
     "dtypes differ", lambda t: xclip_fast.attention(t(_q()), t(_q(dtype=torch.float64)), t(_q()))),
    ("empty-keys", lambda t: OPS.attention_fwd(t(_q()), t(_q(S=0)), t(_q(S=0)), None, None, 0.5),
     "every dimension must be >= 1", lambda t: xclip_fast.attention(t(_q()), t(_q(S=0)), t(_q(S=0)))),
    ("head-dim-over-128", lambda t: OPS.attention_fwd(*(t(_q(D=136)),) * 3, None, None, 0.5),
     "head dim D=136 exceeds the triton kernels' maximum 128", None),
    ("nan-scale", lambda t: OPS.attention_fwd(*(t(_q()),) * 3, None, None, math.nan),
     "scale must be a finite real number", lambda t: xclip_fast.attention(*(t(_q()),) * 3, scale=math.nan)),
    ("bwd-lse-dtype", lambda t: OPS.attention_bwd(*(t(_q()),) * 3, None, None, t(_q()), t(_lse(dtype=torch.float64)),
                                                  t(_q()), 0.5),
     "lse must be torch.float32 for torch.float32 inputs", None),
    ("bwd-lse-shape", lambda t: OPS.attention_bwd(*(t(_q()),) * 3, None, None, t(_q()), t(_lse(S=2)), t(_q()), 0.5),
     r"lse must be \(B=2, H=2, Sq=3\), got \(2, 2, 2\)", None),
    ("bwd-grad-shape", lambda t: OPS.attention_bwd(*(t(_q()),) * 3, None, None, t(_q()), t(_lse()), t(_q(S=2)), 0.5),
     r"grad must have the queries' shape \(2, 3, 2, 8\)", None),
    ("packed-qkv", lambda t: OPS.packed_attention_fwd(t(_t(2, 3, 2, 2, 8)), None, 0.5),
     r"qkv must be \(B, S, 3, H, D\), got \(2, 3, 2, 2, 8\)", lambda t: packed_attention(t(_t(2, 3, 2, 2, 8)))),
    ("packed-extra", lambda t: OPS.packed_attention_fwd(t(_t(2, 3, 3, 2, 8)), t(_t(2, 2, 1, 8)), 0.5),
     r"extra_kv must be \(B=2, 2, H=2, D=8\), got \(2, 2, 1, 8\)", None),
    ("packed-bwd-out", lambda t: OPS.packed_attention_bwd(t(_t(2, 3, 3, 2, 8)), None, t(_q(S=4)), t(_lse()), t(_q()),
                                                          0.5), r"out must have the queries' shape \(2, 3, 2, 8\)",
     None),
    ("quick-gelu-integers", lambda t: OPS.quick_gelu(t(torch.ones(4, dtype=torch.int64))), "dtype must be one of",
     None),
    ("quick-gelu-bwd-shape", lambda t: OPS.quick_gelu_backward(t(_t(4, 3)), t(_t(3, 4))),
     r"grad must have the shape of x \(4, 3\)", None),
]


@needs_triton
@pytest.mark.parametrize("where", ["real", "fake"])
@pytest.mark.parametrize("name, call, message, api", RAW_BAD_INPUTS, ids=[c[0] for c in RAW_BAD_INPUTS])
def test_raw_operators_validate_their_inputs(name, call, message, api, where, device):
    """On a GPU these calls read out of bounds or return garbage; each is refused before any launch,
    by the real implementation and by the fake one (meta tensors: what torch.compile traces)."""
    move = (lambda x: x.to(device)) if where == "real" else (lambda x: x.to("meta"))
    with pytest.raises(ValueError, match=message) as info:
        call(move)
    assert str(info.value).startswith("xclip_fast::")
    if api is not None and where == "real":  # the Python API says the same
        with pytest.raises(ValueError, match=message):
            api(move)


@needs_triton
def test_head_dim_one_with_any_strides(device):
    """A size-1 last dimension whose stride is not 1 counts as contiguous in PyTorch (and was
    passed on as such to an assertion); any strides are documented as accepted."""
    base = torch.randn(200, dtype=torch.float64, device=device)
    # contiguous but for the stride of the size-1 last dim: .contiguous() keeps such a tensor as it is
    q = torch.as_strided(base, (2, 5, 2, 1), (10, 2, 1, 7))
    k = torch.as_strided(base, (2, 5, 2, 1), (10, 2, 1, 5), 100)
    v = torch.as_strided(base, (2, 5, 2, 1), (1, 20, 10, 9), 60)
    out, lse = torch.ops.xclip_fast.attention_fwd(q, k, v, None, None, 1.0)
    assert_rel("output", out, attention_f64(q, k, v, scale=1.0), 1e-12)
    grad = torch.as_strided(torch.randn(100, dtype=torch.float64, device=device), (2, 5, 2, 1), (10, 2, 1, 3))
    dq, dk, dv, _, _ = torch.ops.xclip_fast.attention_bwd(q, k, v, None, None, out, lse, grad, 1.0)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    attention_f64(*ref, scale=1.0).backward(grad)
    for n, g, r in zip("qkv", (dq, dk, dv), ref):
        assert_rel(f"grad {n}", g, r.grad, 1e-12)
