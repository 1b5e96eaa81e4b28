"""The README's code runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

from _helpers import needs_gloo

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block in the README section {title!r}"
    return blocks[0]


def _torchrun(section: str, tmp_path) -> str:
    """The section's script run as written on 2 CPU processes (gloo); its standard output."""
    script = tmp_path / "script.py"
    script.write_text(_section_code(section))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU and gloo, as CI runs it
    # (--standalone: a free port, so that two of these may run at once)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 3 and all(x == x for x in losses), proc.stdout
    return proc.stdout




@needs_gloo
def test_training_script_runs_under_torchrun(tmp_path):
    """The Training section's script: autocast, GradScaler, torch.compile and DDP on 2 processes."""
    _torchrun("Training", tmp_path)


@needs_gloo
def test_frame_parallel_script_runs_under_torchrun(tmp_path):
    """The Frame parallelism section's script: training under DDP and a long clip's inference."""
    out = _torchrun("Frame parallelism", tmp_path)
    assert re.search(r"long clip: frames 0-31 here, embedding norm [0-9.]+", out), out


@needs_gloo
def test_hf_finetuning_script_runs_under_torchrun(tmp_path):
    """The Hugging Face fine-tuning script: a patched XCLIPModel with PEFT LoRA, the contrastive
    loss, frame parallelism over 2 processes under DDP, bf16 autocast; the merged checkpoint loads
    in transformers' own class and gives the same logits."""
    out = _torchrun("Fine-tuning a Hugging Face model", tmp_path)
    found = re.search(r"reloaded: XCLIPModel, max logit difference ([0-9.e+-]+)", out)
    assert found and float(found.group(1)) < 1e-4, out
    assert (tmp_path / "xclip-finetuned" / "config.json").exists()


def test_how_auto_chooses_runs(tmp_path):
    """The Backends section's snippet: what auto would run for B/16's frame attention, and why."""
    script = tmp_path / "auto.py"
    script.write_text(_section_code("Backends"))
    env = dict(os.environ, XCLIP_FAST_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Decision(backend='torch'" in proc.stdout and "source=" in proc.stdout, proc.stdout
