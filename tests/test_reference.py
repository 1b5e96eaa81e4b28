"""Properties of the reference modules that the rest of the suite relies on."""

import torch

from xclip_fast import reference


def test_drop_path_masks_rows_of_the_first_axis():
    """The official DropPath on a seq-first tensor keeps or drops whole token rows (all frames)."""
    p = 0.5
    x = torch.randn(64, 3, 4, dtype=torch.float64) + 10.0  # no element is near zero
    y = reference.drop_path(x, p, training=True)
    for row_x, row_y in zip(x, y):
        kept = torch.allclose(row_y, row_x / (1 - p))
        dropped = torch.equal(row_y, torch.zeros_like(row_y))
        assert kept != dropped, "a token row must be kept or dropped as a whole"
    n_dropped = sum(bool((row == 0).all()) for row in y)
    assert 10 < n_dropped < 54  # binomial(64, 0.5): both outcomes occur


def test_drop_path_is_identity_in_eval_and_at_rate_zero():
    x = torch.randn(5, 2, 3)
    assert reference.drop_path(x, 0.5, training=False) is x
    assert reference.drop_path(x, 0.0, training=True) is x
    module = reference.DropPath(0.3).eval()
    assert module(x) is x


def test_layer_norm_is_plain_layer_norm():
    # X-CLIP's LayerNorm subclass has its fp32 up-cast commented out: it is nn.LayerNorm (eps 1e-5)
    ln = reference.LayerNorm(8)
    assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-5
