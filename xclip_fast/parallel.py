"""Frame parallelism: the frames of the same videos spread over the processes of a group.

In a CCT layer every step is frame-local (patch embedding, intra-frame attention, MLP, LayerNorms)
except the message attention among the T message tokens of each video, and the MIT pools over all
frames. So each process of a frame group holds a contiguous slice of the frames of the same videos,
and the processes exchange one small tensor per layer: the message-token inputs ``(b, T, d)``
(``message_fc`` of the class tokens), gathered before the message attention, which every process
then computes for the whole clip, keeping its own slice. Once more before the MIT: the per-frame
embeddings ``(b, T, E)``, so every process ends with the same video embedding.

The exchange is a ``torch.distributed`` functional collective (all-gather forward, reduce-scatter
backward), which autograd, ``torch.compile``, DDP and FSDP2 understand. Use::

    fp = FrameParallel(num_frames=64, group=mesh["frames"])   # or a ProcessGroup, or None (world)
    with fp.expect_exchange():                                 # raises if the model ignored frame_parallel=
        embeds = encoder(video[:, fp.frames], frame_parallel=fp)   # each process: its own frames only

A model that does not know ``frame_parallel=`` may ignore it: an unpatched Hugging Face model (not
passed through :func:`xclip_fast.patch_xclip`, or reloaded with ``from_pretrained``) passes the
keyword down without using it, and each process then computes its own frames only, silently. Every
exchange marks the :class:`FrameParallel` that ran it, so :meth:`FrameParallel.expect_exchange` and
:meth:`FrameParallel.average_gradients` can tell.

Gradients. The loss is the same on every process (it reads the video embedding), and every
process's gradients are made for the average over the frame group that data-parallel training takes
(DDP, FSDP2 over all processes): the redundant parts (message attention, MIT, anything after the
encoder) get the whole clip's gradient on every process, the frame-local parts ``W`` times their own
frames' share, so that the average over the ``W`` processes is, for every parameter, the gradient one
process computes over the whole clip. The data-parallel reduction must therefore span the frame
group: DDP/FSDP2 over every process (on a videos x frames mesh: over both dimensions), or
:meth:`FrameParallel.average_gradients` when nothing else reduces. Gradients that reach the input
frames carry the same factor ``W``.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["FrameParallel", "frame_sizes"]


def frame_sizes(num_frames: int, world_size: int) -> tuple[int, ...]:
    """How ``num_frames`` frames are split over ``world_size`` processes, in rank order: contiguous
    slices as ``torch.tensor_split`` makes them (the first ``num_frames % world_size`` processes hold
    one frame more). Every process needs at least one frame."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if num_frames < world_size:
        raise ValueError(f"frame parallelism over {world_size} processes needs num_frames >= {world_size} "
                         f"(every process holds at least one frame), got num_frames={num_frames}")
    q, r = divmod(num_frames, world_size)
    return tuple(q + (i < r) for i in range(world_size))


def _group_of(group):
    """A ``ProcessGroup`` from a process group, a 1-D ``DeviceMesh`` or None (the default group)."""
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    get_group = getattr(group, "get_group", None)
    if get_group is not None and getattr(group, "ndim", None) == 1:
        return get_group()
    raise TypeError("group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh (e.g. mesh['frames']) or "
                    f"None (the default group), got {type(group).__name__}"
                    + (f" with {group.ndim} dimensions" if hasattr(group, "ndim") else ""))


# How long an exchange on the CPU (gloo) waits for the backend's worker thread to let go of its
# tensors (it does within microseconds; a bound so that a tensor held elsewhere costs no more)
_SETTLE_S = 0.05


def _settle(*pairs) -> None:
    """Waits (the GIL released) until gloo's worker thread has dropped the work of a finished
    collective, i.e. until each tensor of ``pairs`` = ``(tensor, references)`` is down to
    ``references`` holders again. That thread releases the work after waking the waiting caller; a
    tensor Python has seen keeps its Python object alive while C++ holds it, so the thread's release
    takes the GIL. A process that exits right after its last exchange (a script's end) could reach
    interpreter finalization first, and a thread taking the GIL then is ended by Python, which
    aborts the process ("terminate called without an active exception")."""
    if all(t._use_count() <= n for t, n in pairs):
        return
    deadline = time.monotonic() + _SETTLE_S
    while any(t._use_count() > n for t, n in pairs) and time.monotonic() < deadline:
        time.sleep(1e-5)


def _eager_cpu(x: torch.Tensor) -> bool:
    """An exchange that runs now on gloo's worker threads (not traced, not a fake tensor)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not isinstance(x, torch._subclasses.FakeTensor))


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous (torch 2.11's reduce-scatter
    refuses a strided one, as the gradient of a slice of the gathered tensor is) and hands it to
    :class:`_SettledGrad` (``box``), which waits for the reduce-scatter's worker to let go of it."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.box is not None:
            ctx.box.append(grad)
        return grad, None


class _SettledGrad(torch.autograd.Function):
    """The identity on the gathered input, whose backward (after the reduce-scatter) waits until
    gloo's worker has dropped that collective's tensors (see :func:`_settle`)."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _settle((grad, 1), *((g, 1) for g in ctx.box))
        ctx.box.clear()
        return grad, None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenation along dim 0 of ``x`` from every process, differentiable: its backward is a
    reduce-scatter (sum) of the gradient, each process receiving its rows. On the CPU (gloo), run
    now, it returns (and its backward ends) once the backend's worker thread has let go of the
    collective's tensors (:func:`_settle`)."""
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    x = x.contiguous()
    if not _eager_cpu(x):
        return _ContiguousGrad.apply(gather(x, 0, group), None)
    box = [] if torch.is_grad_enabled() and x.requires_grad else None
    if box is not None:
        x = _SettledGrad.apply(x, box)
    references = x._use_count()
    full = gather(x, 0, group)
    wait = getattr(full, "wait", None)  # (an AsyncCollectiveTensor: wait for it here)
    full = wait() if wait is not None else full
    _settle((x, references), (full, 1))
    return _ContiguousGrad.apply(full, box)


class FrameParallel:
    """The frames of a clip of ``num_frames`` frames split over the processes of ``group``.

    Args:
        num_frames: T, the frames per video of the whole clip.
        group: the processes that share the clip: a ``ProcessGroup``, a 1-D ``DeviceMesh`` (the
            frames dimension of a videos x frames mesh) or None for the default process group.
            ``torch.distributed`` must be initialised.

    Process ``rank`` of the group holds frames ``frames`` (a slice, :func:`frame_sizes`: T need not
    be divisible by the group size; each process needs one frame at least) of the same videos.
    Pass it as ``frame_parallel=`` to :class:`~xclip_fast.encoder.XCLIPVideoEncoder` (and its CCT, blocks):
    they then take the process's own frames and exchange what crosses frames (see the module doc,
    also for what the gradients mean). Drop path draws the random numbers one process would draw
    for the whole clip when every process starts from the same RNG state (seed all alike); an
    attention dropout inside frames (in no released model) draws per process.
    """

    def __init__(self, num_frames: int, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("FrameParallel needs torch.distributed initialised (init_process_group, or torchrun)")
        self.group = _group_of(group)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the frame group")
        self.num_frames = num_frames
        self.sizes = frame_sizes(num_frames, self.world_size)
        self.start = sum(self.sizes[:self.rank])
        self.local_frames = self.sizes[self.rank]
        # whether an exchange ran through this object: since expect_exchange() began, and ever
        # (constant stores: a compiled graph replays them on every call without a guard)
        self._exchanged = self._ever_exchanged = False

    def __repr__(self) -> str:
        return (f"FrameParallel(num_frames={self.num_frames}, rank={self.rank}/{self.world_size}, "
                f"frames={self.start}:{self.stop})")

    @property
    def stop(self) -> int:
        return self.start + self.local_frames

    @property
    def frames(self) -> slice:
        """This process's frames of the clip, ``slice(start, stop)``."""
        return slice(self.start, self.stop)

    @property
    def exchanged(self) -> bool:
        """Whether an exchange (:meth:`gather`, :meth:`sum`) ran through this object since it was made
        or since the innermost :meth:`expect_exchange` began."""
        return self._exchanged

    @contextlib.contextmanager
    def expect_exchange(self):
        """A context that raises a ``RuntimeError`` on exit when no exchange ran through this object
        inside it: the model called there ignored ``frame_parallel=`` (an unpatched Hugging Face model
        passes the keyword down without using it) and each process computed only its own frames. Wrap
        each frame-parallel forward in it::

            with fp.expect_exchange():
                out = model(..., pixel_values=video[:, fp.frames], frame_parallel=fp)

        Costs nothing (a flag); works around compiled models too. An exception raised inside before
        any exchange (an unpatched model given fewer frames than its configuration's fails on a shape)
        goes on with a note saying so (Python 3.11 and later)."""
        self._exchanged = False
        try:
            yield self
        except Exception as e:
            if not self._exchanged and hasattr(e, "add_note"):
                e.add_note(f"xclip_fast: {self._ignored()}")
            raise
        if not self._exchanged:
            raise RuntimeError(f"xclip_fast: {self._ignored()}")

    def _ignored(self) -> str:
        return (f"no frame exchange ran inside {self!r}.expect_exchange(): the model ignored frame_parallel= "
                "and each process computed only its own frames. A Hugging Face XCLIPModel (or XCLIPVisionModel) "
                "takes it only once patched: xclip_fast.patch_xclip(model), again after from_pretrained, which "
                "builds the original classes; transformers passes an unknown keyword down without using it.")

    def _mark(self) -> None:
        self._exchanged = self._ever_exchanged = True

    def check_local(self, n: int, what: str) -> None:
        """A ``ValueError`` when ``n`` (the frames per video a process was given) is not its slice's."""
        if n != self.local_frames:
            raise ValueError(f"{what} has {n} frames per video on process {self.rank} of {self.world_size}, but "
                             f"{self!r} gives it {self.local_frames} (pass video[:, fp.frames])")

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole clip along ``dim`` from every process's ``x`` (its own frames along ``dim``).

        Differentiable; the backward sums the gradient over the group and gives each process its
        frames' rows (reduce-scatter). Uneven slices travel padded to the largest one."""
        self.check_local(x.shape[dim], "the tensor to gather")
        self._mark()
        if self.world_size == 1:
            return x
        rows = x.movedim(dim, 0)
        widest = self.sizes[0]
        if rows.shape[0] < widest:
            rows = torch.cat([rows, rows.new_zeros((widest - rows.shape[0],) + rows.shape[1:])])
        full = _all_gather(rows, self.group)
        if any(s != widest for s in self.sizes):
            full = torch.cat([full[r * widest:r * widest + s] for r, s in enumerate(self.sizes)])
        return full.movedim(0, dim)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group of every process's ``x`` (e.g. a sum over its own frames), the
        same on every process. Differentiable with the gradient convention of the module doc: the
        backward sums the gradient over the group (each process receives ``W`` times its share)."""
        self._mark()
        if self.world_size == 1:
            return x
        return _all_gather(x.unsqueeze(0), self.group).sum(0)

    def own(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This process's frames of ``full`` (the whole clip along ``dim``)."""
        if full.shape[dim] != self.num_frames:
            raise ValueError(f"expected {self.num_frames} frames along dim {dim}, got shape {tuple(full.shape)}")
        return full.narrow(dim, self.start, self.local_frames)

    @torch.no_grad()
    def average_gradients(self, module: nn.Module) -> None:
        """Average the gradients of ``module``'s parameters over the frame group (all-reduce), for
        training loops where no DDP/FSDP2 reduction spans it; afterwards every process holds the
        gradient one process computes over the whole clip. Raises a ``RuntimeError`` when no exchange
        has ever run through this object (the model ignored ``frame_parallel=``, see
        :meth:`expect_exchange`): the gradients would average different computations."""
        if not self._ever_exchanged:
            raise RuntimeError(
                f"xclip_fast: average_gradients: no frame exchange has run through {self!r}, so the model "
                "ignored frame_parallel= and each process computed only its own frames (an unpatched Hugging "
                "Face model: call xclip_fast.patch_xclip(model) first, again after from_pretrained).")
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(self.world_size)
