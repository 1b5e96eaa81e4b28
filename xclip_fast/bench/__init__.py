"""Speed and peak memory of xclip-fast against the original model, torch.compile, SDPA and xformers.

The runner behind ``xclip-fast bench`` and the pytest-benchmark suite in ``benchmarks/`` (it lives
in the package so that the installed command can import it). Every figure is measured in one
process, on one device, on the same inputs, and reported as a ratio against ``reference``.

Levels:
- ``attention``: frame attention with the message token (original: concatenate the message token
  to the frame tokens, attend over l+1 tokens, slice l back out) and the cross-frame message
  attention over T tokens per video.
- ``block``: one ``CrossFramelAttentionBlock`` (official) against the fast block.
- ``encoder``: the whole video encoder, inference, including the chunked mode for long clips.

Each provider's result is checked against a high-precision run (float64 on CPU, float32 without
TF32 on CUDA) before it is timed; the tolerance is the larger of the dtype's tolerance and twice the
error of the reference provider itself in the same dtype. A provider that cannot run is listed as
skipped with its reason.

Files: ``cases.py`` (problem sizes), ``workloads.py`` (inputs and providers), ``measure.py`` (time
and memory), ``run.py`` (the run and the command line), ``results.py`` (the result schema, table,
CSV/JSON), ``plot.py`` (the optional plot).
"""

from xclip_fast.bench.cases import LEVELS, MODES, Case, build_cases
from xclip_fast.bench.results import Result
from xclip_fast.bench.run import add_arguments, main, run_case
from xclip_fast.bench.workloads import ALL_PROVIDERS, PROVIDERS, Skip, Workload, grad_out

__all__ = ["LEVELS", "MODES", "Case", "build_cases", "Result", "add_arguments", "main", "run_case", "ALL_PROVIDERS",
           "PROVIDERS", "Skip", "Workload", "grad_out"]
