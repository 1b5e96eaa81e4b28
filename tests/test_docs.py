"""The README and the guides in docs/: every Python block runs as written, every relative link leads somewhere,
and every table of measured figures is what ``benchmarks/doc_tables.py`` writes from the results it cites.

A Python block runs in a fresh interpreter (CPU only, in a temporary folder) unless the line before it says
otherwise: ``<!-- doc-block: torchrun -->`` runs it on 2 CPU processes under torchrun (gloo), and
``<!-- doc-block: syntax-only (why) -->`` only compiles it, for a block that needs a download or a file the
page cannot make (the reason is required).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import needs_gloo

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- doc-block: (.*) -->$")
SYNTAX_ONLY = re.compile(r"syntax-only \((.+)\)")

sys.path.insert(0, str(ROOT / "benchmarks"))
import doc_tables  # noqa: E402

PAGES = doc_tables.PAGES


def _blocks():
    """(page, number, kind, code) of every Python block, kind 'run', 'torchrun' or 'syntax-only'."""
    found = []
    for page in PAGES:
        lines = (ROOT / page).read_text(encoding="utf-8").split("\n")
        number = 0
        for i, line in enumerate(lines):
            if line.strip() != "```python":
                continue
            end = lines.index("```", i + 1)
            code = "\n".join(lines[i + 1:end]) + "\n"
            before = lines[i - 1] if i else ""
            marker = MARKER.match(before)
            kind = "run"
            if marker:
                spec = marker.group(1)
                if spec == "torchrun":
                    kind = "torchrun"
                elif SYNTAX_ONLY.fullmatch(spec):
                    kind = "syntax-only"
                else:
                    raise ValueError(f"{page}:{i}: unknown doc-block marker {spec!r}")
            number += 1
            found.append((page, number, kind, code))
    return found


BLOCKS = _blocks()


def _ids(kind):
    return [pytest.param(code, id=f"{page}#{n}") for page, n, k, code in BLOCKS if k == kind]


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["XCLIP_FAST_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def test_every_page_has_its_blocks_found():
    """The collection sees the pages' blocks: the README's three uses, one torchrun script per guide that has
    one, and no block without a known kind."""
    by_page = {}
    for page, _, kind, _ in BLOCKS:
        by_page.setdefault(page, []).append(kind)
    assert by_page["README.md"].count("run") >= 3
    for page in ("docs/training.md", "docs/long-clips.md", "docs/huggingface.md"):
        assert "torchrun" in by_page[page], page
    text = "".join((ROOT / p).read_text(encoding="utf-8") for p in PAGES)
    assert text.count("```python") == len(BLOCKS)


@pytest.mark.parametrize("code", _ids("run"))
def test_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env=_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "describe(" in code:  # what auto runs here: SDPA without CUDA, and why
        assert "Decision(backend='torch'" in proc.stdout and "source=" in proc.stdout, proc.stdout


@pytest.mark.parametrize("code", _ids("syntax-only"))
def test_block_compiles(code):
    compile(code, "<doc block>", "exec")


@needs_gloo
@pytest.mark.parametrize("code", _ids("torchrun"))
def test_torchrun_block_runs(code, tmp_path):
    """A training script of the guides, as written, on 2 CPU processes (gloo): three finite losses, and what
    the script says it checks."""
    script = tmp_path / "script.py"
    script.write_text(code)
    # (--standalone: a free port, so that two of these may run at once)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=900, env=_env(tmp_path),
                          cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-6000:]
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", out)]
    assert len(losses) == 3 and all(x == x for x in losses), out
    if "long clip:" in code:  # frame parallelism: each process encodes its half of a 64-frame clip
        assert re.search(r"long clip: frames 0-31 here, embedding norm [0-9.]+", out), out
    if "reloaded:" in code:  # the merged checkpoint loads in transformers' own class, same logits
        found = re.search(r"reloaded: XCLIPModel, max logit difference ([0-9.e+-]+)", out)
        assert found and float(found.group(1)) < 1e-4, out
        assert (tmp_path / "xclip-finetuned" / "config.json").exists()


# -- links ----------------------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    seen, anchors, fenced = {}, set(), False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_relative_links_lead_somewhere():
    broken = []
    for page in PAGES:
        for target in LINK.findall((ROOT / page).read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            if not file.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_guide_is_linked_from_the_readme_which_stays_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = {t.partition("#")[0] for t in LINK.findall(readme)}
    assert {p for p in PAGES if p != "README.md"} | {"ARCHITECTURE.md"} <= targets
    assert len(readme.split("\n")) <= 300


# -- tables ---------------------------------------------------------------------------------------------

def test_tables_are_what_the_results_give():
    """Run `python benchmarks/doc_tables.py` after changing a results folder or a table's function."""
    diffs = doc_tables.differences()
    assert not diffs, "\n\n".join(diffs.values())[:6000]


def test_tables_of_figures_are_generated():
    """A table holding a decimal figure (a time, a ratio, MiB) outside a generated block was copied by hand."""
    copied = []
    for page in PAGES:
        inside, fenced = False, False
        for n, line in enumerate((ROOT / page).read_text(encoding="utf-8").split("\n"), 1):
            fenced ^= line.startswith("```")
            if doc_tables.BEGIN.match(line):
                inside = True
            elif line == doc_tables.END:
                inside = False
            elif line.startswith("|") and not inside and not fenced and re.search(r"\d\.\d|\d%", line):
                copied.append(f"{page}:{n}: {line[:100]}")
    assert not copied, "\n".join(copied)


def test_every_table_names_a_function_and_every_function_is_used():
    used = []
    for page in PAGES:
        used += [m.group(1) for line in (ROOT / page).read_text(encoding="utf-8").split("\n")
                 if (m := doc_tables.BEGIN.match(line))]
    assert sorted(set(used)) == sorted(doc_tables.TABLES), set(doc_tables.TABLES) ^ set(used)


def test_a_changed_figure_is_caught():
    """The comparison can fail: a page whose table differs from the results by one digit."""
    page = "docs/training.md"
    text = (ROOT / page).read_text(encoding="utf-8")
    start = text.index("<!-- table: training/block-b16 -->")
    changed = text[:start] + text[start:].replace("| original | 92.745 |", "| original | 92.746 |", 1)
    assert changed != text
    assert doc_tables.render(page, changed) == text


def test_sources_without_a_recorded_commit_cite_the_commit_that_added_them():
    """Results whose files record no commit cite the one that added their folder: checked against git."""
    if subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip() != "false":
        pytest.skip("needs the repository's whole history (not a shallow clone or an export)")
    for folder, commit in doc_tables.ADDED_IN.items():
        log = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", f"benchmarks/results/{folder}"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        assert log and log[-1].startswith(commit[:7]), (folder, log)  # the oldest commit that added it
