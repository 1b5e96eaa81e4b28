"""The launch plan: default tiles, the tuning table and its fallback, packing of short sequences."""

import json

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed on this platform")
from xclip_fast.kernels import plan as P  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setattr(P, "TABLE_PATH", str(path))
    P.clear_caches()
    yield path
    P.clear_caches()


def test_the_committed_table_parses():
    assert isinstance(P.load_table(), dict)  # may be empty until a GPU run fills it


def test_launch_plan_reads_the_table_for_its_arch_and_falls_back(table):
    table.write_text(json.dumps({"format": 2, "entries": [
        {"arch": 90, "dtype": "bfloat16", "head_dim": 64, "extra": True, "seq_bucket": 256,
         "fwd": [128, 64, 8, 3], "bwd": [64, 64, 8, 2]},
        {"arch": 90, "dtype": "bfloat16", "head_dim": 64, "extra": True, "seq_bucket": 64, "bwd_per_sm": 3},
        {"op": "quick_gelu", "arch": 90, "dtype": "bfloat16", "block": 4096, "num_warps": 8}]}))
    default = P.launch_plan(64, torch.bfloat16, True, False, arch=90)
    tuned = P.launch_plan(64, torch.bfloat16, True, False, arch=90, bucket=P.seq_bucket(197))
    assert tuned.fwd == P.Tiles(128, 64, 8, 3) and tuned.bwd == P.Tiles(64, 64, 8, 2)
    assert tuned.bwd_per_sm == 1, "8 warps of the backward: one program per SM unless the entry says"
    assert tuned.packed_dq == default.packed_dq, "a kernel the entry does not name keeps its default tiles"
    assert tuned.source == "sm_90 bfloat16 D=64 extra=True S<=256" and default.source == "default"
    short = P.launch_plan(64, torch.bfloat16, True, False, arch=90, bucket=64)
    assert short.bwd_per_sm == 3 and short.bwd == default.bwd
    for other in [dict(arch=80, bucket=256), dict(arch=90, bucket=1024)]:  # another GPU / another length
        assert P.launch_plan(64, torch.bfloat16, True, False, **other).source == "default"
    assert P.load_table()[("quick_gelu", 90, "bfloat16")] == (4096, 8)


@pytest.mark.parametrize("raw, message", [
    ({"format": 7, "entries": []}, "format 7, expected 2"),
    ({"format": 1, "entries": []}, "three-launch backward"),  # the tiles of the kernels before these
    ({"format": 2, "entries": [{"arch": 90, "dtype": "bfloat16", "head_dim": 64, "extra": True, "seq_bucket": 256,
                                "dkdv": [32, 64, 4, 2]}]}, r"unknown fields \['dkdv'\]"),
])
def test_a_table_these_kernels_cannot_read_is_refused(table, raw, message):
    table.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        P.load_table()


def test_default_tiles_per_architecture():
    """sm_90 pipelines the sequence forward deeper; the backward's programs per SM follow its warps."""
    hopper, other = (P.launch_plan(64, torch.bfloat16, True, False, arch=a) for a in (90, 80))
    assert hopper.fwd.num_stages == 3 and other.fwd.num_stages == 2 and hopper.bwd == other.bwd
    assert hopper.bwd_per_sm == 8 // hopper.bwd.num_warps
    assert P.launch_plan(128, torch.float16, True, False).bwd.num_warps == 8


def test_sequence_buckets_and_packing():
    assert [P.seq_bucket(n) for n in (1, 16, 17, 197, 257, 1024, 5000)] == [16, 16, 64, 256, 512, 1024, 1 << 62]
    plan = P.launch_plan(64, torch.float16, False, False)
    assert P.pack_group(plan, 8, 8) == 8 and P.pack_group(plan, 32, 32) == 2 and P.pack_group(plan, 33, 33) == 1
    assert P.pack_group(P.launch_plan(64, torch.float16, True, False), 8, 8) == 1  # the extra token: never packed
