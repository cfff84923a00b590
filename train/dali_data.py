"""Training images decoded by NVIDIA DALI: the class-folder source of train/data.py with nvJPEG on the GPU.

    source = DALISource(root, 256, device=torch.device("cuda", 0), global_batch_size=256, rank=r, world_size=world,
                        seed=0, num_workers=4, prefetch=2)
    images_B3RR, labels_B = source.next_batch()          # uint8 [B, 3, R, R] on the GPU, int64 [B]

Holds: the DALI pipeline (decode, the ADM crop as close to PIL's as DALI allows, CHW), its feeding in the order of
train/sharding.py, the resumable position and the one-line error on an undecodable file. The scan, the labels and
the reference crop are train/data.py's (docs/DATA.md#nvidia-dali says how far the two crops are apart).

Order: an `external_source` callback (`BatchReader`) maps the pipeline's iteration i to global batch
start + i, takes this rank's indices of it from `epoch_permutation` / `rank_slice`, and returns the files' bytes,
labels, indices and crop plans; so batches, labels and resume positions equal the folder source's at any world size.
Device: `device.type == "cuda"` decodes with `fn.decoders.image(device="mixed")` (nvJPEG, the hardware decoder where
present) and resizes on that GPU; `cpu` runs everything on DALI's CPU backend (tests, benchmarks).
An undecodable file stops DALI's pipeline: the source finds the file among the batches in flight and raises one
ValueError naming it and the dataset tool (`python -m repae.train.dataset_tool check ROOT`).
"""

# B batch (this rank), G global batch, R resolution; in formulas n images, k a halving stage

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .data import ImageFolderDataset, ImageFolderSource
from .sharding import epoch_permutation, rank_slice

MAX_HALVINGS = 4
"""BOX-halving stages in the pipeline; an image that needs more has its last stage go to the final halved size."""
MISSING_DALI = ("data.source=dali needs NVIDIA DALI: pip install 'repae[dali]' (the nvidia-dali-cuda130 wheel; "
                "nvidia-dali-cuda120 for a CUDA 12 torch), or set data.source=folder")


class MissingDALI(ImportError, ValueError):
    """DALI is asked for and not installed: an ImportError that the entry point prints as one line (a ValueError)."""


def import_dali():
    """(fn, types, pipeline_def) of nvidia.dali, or ImportError in one line naming the extra to install."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except ImportError:
        raise MissingDALI(MISSING_DALI) from None
    return fn, types, pipeline_def


def crop_plan(width: int, height: int, resolution: int) -> tuple[list, tuple[int, int], tuple[int, int]]:
    """The sizes of train/data.py's center_crop_arr for one image: ([(h, w) after each BOX halving], (h, w) after
    BICUBIC, (y, x) of the crop), the same integer arithmetic, so only the filters differ."""
    halved = []
    while min(width, height) >= 2 * resolution:
        width, height = width // 2, height // 2
        halved.append((height, width))
    scale = resolution / min(width, height)
    final_h, final_w = round(height * scale), round(width * scale)
    return halved, (final_h, final_w), ((final_h - resolution) // 2, (final_w - resolution) // 2)


class BatchReader:
    """external_source callback: BatchInfo -> this rank's (bytes, labels, indices, halvings, stage sizes...,
    final size, crop anchor) of global batch start + iteration. Plain data only: DALI's workers unpickle it."""

    def __init__(self, dataset: ImageFolderDataset, *, global_batch_size: int, steps_per_epoch: int, rank: int,
                 world_size: int, seed: int, start: int):
        self.root, self.relpaths, self.labels = dataset.root, dataset.relpaths, dataset.labels
        self.resolution = dataset.resolution
        self.global_batch_size, self.steps_per_epoch, self.seed, self.start = (global_batch_size, steps_per_epoch,
                                                                               seed, start)
        self.rank, self.world_size = rank, world_size
        self._perm = (None, None)  # (epoch, permutation): one randperm per epoch

    def indices(self, position: int) -> list[int]:
        """This rank's dataset indices of global batch `position` (epoch * steps_per_epoch + batch)."""
        epoch, batch = divmod(position, self.steps_per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(len(self.relpaths), self.seed, epoch))
        G = self.global_batch_size
        return rank_slice(self._perm[1][batch * G:(batch + 1) * G], self.rank, self.world_size).tolist()

    def __call__(self, info) -> tuple:
        indices = self.indices(self.start + info.iteration)
        encoded, plans = [], []
        for i in indices:
            with open(f"{self.root}/{self.relpaths[i].decode()}", "rb") as f:
                data = f.read()
            try:
                width, height = Image.open(io.BytesIO(data)).size  # the header only
            except Exception:  # noqa: BLE001 - not an image: DALI's decoder names no file, next_batch will
                width, height = 2 * self.resolution, 2 * self.resolution
            encoded.append(np.frombuffer(data, np.uint8))
            plans.append(crop_plan(width, height, self.resolution))
        stages = [[_stage_size(halved, k) for halved, _, _ in plans] for k in range(MAX_HALVINGS)]
        return (encoded, [np.array(self.labels[i], np.int64) for i in indices],
                [np.array(i, np.int64) for i in indices],
                [np.array(min(len(h), MAX_HALVINGS), np.int32) for h, _, _ in plans], *stages,
                [np.array(size, np.float32) for _, size, _ in plans], [np.array(yx, np.int32) for _, _, yx in plans])


def _stage_size(halved: list[tuple[int, int]], k: int) -> np.ndarray:
    """(h, w) after halving stage k; the last stage goes to the final halved size; (1, 1) where unused."""
    if k >= len(halved):
        return np.ones(2, np.float32)
    return np.array(halved[-1] if k == MAX_HALVINGS - 1 else halved[k], np.float32)


def build_pipeline(reader: BatchReader, *, batch_size: int, device: torch.device, num_workers: int, prefetch: int):
    """The DALI pipeline: external_source -> decode (mixed on cuda, cpu otherwise) -> the ADM crop -> CHW.

    The BOX halvings run as LINEAR resizes without antialiasing to the halved size (exactly a 2x2 mean when the
    side is even), each only for the images that need it (DALI conditionals); then CUBIC with antialiasing to
    PIL's rounded size (subpixel_scale off: the whole image maps onto it, as in PIL) and the crop at PIL's offsets.
    """
    fn, types, pipeline_def = import_dali()
    mixed, R, parallel = device.type == "cuda", reader.resolution, num_workers > 0

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_workers), prefetch_queue_depth=prefetch,
                  device_id=(device.index if device.index is not None else torch.cuda.current_device()) if mixed
                  else None, enable_conditionals=True, py_num_workers=max(1, num_workers), py_start_method="spawn")
    def pipeline():
        encoded, labels, indices, steps, *stages, size, anchor = fn.external_source(
            source=reader, num_outputs=6 + MAX_HALVINGS, batch=True, batch_info=True, parallel=parallel,
            **({"prefetch_queue_depth": prefetch} if parallel else {}))
        # adjust_orientation off: PIL's Image.open ignores the EXIF orientation too.
        image = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)
        for k, size_k in enumerate(stages):
            if steps > k:
                image = fn.resize(image, size=size_k, interp_type=types.INTERP_LINEAR, antialias=False,
                                  subpixel_scale=False)
        image = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True, subpixel_scale=False)
        image = fn.slice(image, anchor, np.array([R, R], np.int32), axes=[0, 1])
        return fn.transpose(image, perm=[2, 0, 1]), labels, indices

    pipe = pipeline()
    pipe.build()
    return pipe


class DALISource:
    """Class-folder images decoded by DALI, as this rank's slices of world-size-independent global batches."""

    def __init__(self, root: str, resolution: int, *, device: torch.device, global_batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 4, prefetch: int = 2, max_bad_images: int = 0,
                 file_list: str | None = None):
        import_dali()  # fail now, in one line, when the extra is missing
        if global_batch_size <= 0 or global_batch_size % world_size != 0 or not 0 <= rank < world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be > 0 and divisible by world_size="
                             f"{world_size}, rank={rank} in [0, world_size)")
        self.dataset = ImageFolderDataset(root, resolution, file_list=file_list)
        if self.num_images < global_batch_size:
            raise ValueError(f"image folder {root!r} holds {self.num_images} images, fewer than "
                             f"global_batch_size={global_batch_size} (the last partial batch is dropped)")
        self.root, self.resolution, self.device, self.seed = root, resolution, torch.device(device), seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.num_workers, self.prefetch, self.drop_last = num_workers, prefetch, True
        self.max_bad_images = max_bad_images  # DALI cannot skip a file: the first undecodable one stops the run
        self.last_indices: torch.Tensor | None = None
        """Dataset indices (int64 [B]) of the batch next_batch() returned last."""
        self.epoch, self.batch_in_epoch = 0, 0  # position of the next batch next_batch() returns
        self._pipe = None

    num_images = ImageFolderSource.num_images
    num_classes = ImageFolderSource.num_classes
    steps_per_epoch = ImageFolderSource.steps_per_epoch
    check_labels = ImageFolderSource.check_labels  # the folder source's check, on the same dataset attributes
    state_dict = ImageFolderSource.state_dict

    def load_state_dict(self, state: dict) -> None:
        """Continue at the batch that followed `state` (the folder source's checks; its states load here too)."""
        ImageFolderSource.load_state_dict(self, state)
        self._pipe = None  # drop the batches decoded ahead from the old position

    @property
    def num_bad_images(self) -> int:
        return 0  # an undecodable file stops the run (next_batch), so none is ever skipped

    def _reader(self) -> BatchReader:
        return BatchReader(self.dataset, global_batch_size=self.global_batch_size,
                           steps_per_epoch=self.steps_per_epoch, rank=self.rank, world_size=self.world_size,
                           seed=self.seed, start=self.epoch * self.steps_per_epoch + self.batch_in_epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (images uint8 [B, 3, R, R] on self.device, labels int64 [B]); walks the epochs."""
        if self._pipe is None:
            self._pipe = build_pipeline(self._reader(), batch_size=self.global_batch_size // self.world_size,
                                        device=self.device, num_workers=self.num_workers, prefetch=self.prefetch)
        try:
            images, labels, indices = self._pipe.run()
        except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError; the callback anything
            self._pipe = None
            raise ValueError(self._explain(err)) from None
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.last_indices = torch.from_numpy(np.array(indices.as_tensor())).to(torch.int64)
        return self._to_torch(images), torch.from_numpy(np.array(labels.as_tensor())).to(torch.int64)

    def _to_torch(self, images) -> torch.Tensor:
        """DALI's batch -> uint8 [B, 3, R, R]: a copy (DALI reuses its buffers) on the GPU, or from host memory."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(images.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out_B3RR = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, out_B3RR, cuda_stream=torch.cuda.current_stream(self.device))
        return out_B3RR

    def _explain(self, err: BaseException) -> str:
        """One line for a stopped pipeline: the first unreadable file among the batches in flight, and the tool."""
        reader, tool = self._reader(), f"python -m repae.train.dataset_tool check {self.root}"
        start = reader.start
        for position in range(start, start + self.prefetch + 2):
            for i in reader.indices(position):
                path = self.dataset.path(i)
                try:
                    with Image.open(path) as img:
                        img.load()
                except Exception as bad:  # noqa: BLE001 - any failure of one file's decode is that file's fault
                    reason = " ".join(f"{type(bad).__name__}: {bad}".split())[:200]
                    return (f"DALI could not decode {path} ({reason}); run `{tool}` and train on the clean list "
                            f"it writes, or use data.source=folder, which skips unreadable files")
        last = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = " ".join(f"{type(err).__name__}: {last[-1] if last else ''}".split())[:300]
        return (f"DALI stopped at epoch {self.epoch}, batch {self.batch_in_epoch} of data.root={self.root} "
                f"({reason}); run `{tool}` to find unreadable files")
