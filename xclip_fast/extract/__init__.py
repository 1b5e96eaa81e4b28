"""Feature extraction at dataset scale: ``xclip-fast encode`` on folders, lists, many GPUs.

- Inputs: files, folders (recursive, by video extension) and list files, in a stable order.
- Decoding runs in ``DataLoader`` worker processes while the encoder runs; each video is opened
  once and its sampled frames are reached by seeking (:class:`xclip_fast.video.VideoReader`).
- Two modes: one embedding per video (the official test-mode sampling of T frames), or sliding
  windows (``window`` frames every ``stride`` frames, at the video's rate or a chosen ``fps``), one
  embedding per window with its start and end time.
- Outputs survive interruption: one ``.npy`` per video, written to a temporary file in the run's
  own folder (``<out-dir>/.xclip-fast/``) and renamed into place, and an index (``index.jsonl``)
  that a rerun reads to skip what is complete. Records identify the video by its resolved path,
  size and modification time (:func:`source_of`), not by the path as typed (one file through
  several links, or given twice, is encoded once, and a video keeps its output name from run to
  run: :func:`~xclip_fast.extract.resume.prepare`); a video is skipped
  only when its record was made with the same settings and weights (``settings_id``), from the
  same file unchanged, and its files are whole with the shapes the record gives. When a video is
  encoded again, the outputs of its previous record that the new one no longer names (a
  ``.times.npy`` of an earlier ``--window`` run, a ``.frames.npy`` of an earlier ``--per-frame``
  run) are removed, and only those: files the run did not write are never touched.
- Failures are recorded and the run goes on; truncated videos are encoded from their readable
  frames with a warning.
- Under ``torchrun``, rank r takes videos r, r + K, r + 2K, ... of the list; rank 0 shows the
  progress bar and merges the index at the end.
- One run at a time writes into an ``--out-dir``: the run (its rank 0) locks it
  (:func:`~xclip_fast.extract.store.lock_out_dir`, released when it ends, also when killed); a second
  run into the same folder at once is refused, naming the first.

The pipeline, a module a stage: :mod:`~xclip_fast.extract.jobs` (discover: jobs, output names, what
identifies a video) -> :mod:`~xclip_fast.extract.resume` (which jobs a rerun skips, and why the
others run again) -> :mod:`~xclip_fast.extract.decode` (decode in workers) ->
:mod:`~xclip_fast.extract.extractor` (encode in batches) -> :mod:`~xclip_fast.extract.store` (write
outputs, append and merge the index). ``cli.py`` drives it.
"""

from xclip_fast.extract.decode import ClipSource
from xclip_fast.extract.extractor import Extractor, chunk_for, nan_rows, summary_line
from xclip_fast.extract.jobs import Job, discover, parse_span, read_list, source_of, video_key
from xclip_fast.extract.resume import plan, prepare, settings_id, stale, weights_digest
from xclip_fast.extract.store import (
    DONE,
    INDEX,
    STATE,
    OutDirBusy,
    append_line,
    atomic_save,
    check_out_dir,
    lock_out_dir,
    merge_index,
    read_index,
    record_key,
    remove_leftovers,
    state_dir,
    tmp_dir,
)

__all__ = ["Job", "discover", "parse_span", "read_list", "source_of", "video_key", "ClipSource", "Extractor",
           "chunk_for", "nan_rows", "summary_line", "plan", "prepare", "settings_id", "stale", "weights_digest", "DONE",
           "INDEX", "STATE", "OutDirBusy", "append_line", "atomic_save", "check_out_dir", "lock_out_dir", "merge_index",
           "read_index", "record_key", "remove_leftovers", "state_dir", "tmp_dir"]
