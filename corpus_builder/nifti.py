"""Parcellating 4D NIfTI images: mean signal per atlas label, streamed over volumes.

The result equals nilearn's `NiftiLabelsMasker(labels_img=atlas, strategy="mean")` on the atlas's own grid:
one column per label value present in the atlas (background 0), in ascending value order, each the mean
over that label's voxels. The masker materialises the whole 4D image as float (a UKB run of 88x88x64x490
volumes is ~1 GB as float32, twice that as float64, plus copies); here the atlas becomes a sparse matrix
W [n_labels x n_voxels] holding 1/count at each label's voxels, built once per process, and the image is
read through nibabel's array proxy a block of volumes at a time (`dataobj[..., t0:t1]`; the file handle is
kept open, so a .nii.gz is decompressed once, front to back). Memory is one block, not the image.

Several atlas images combine into one ROI set (Tian S3 first, then Schaefer-400): each image contributes
its own rows, so a voxel labelled in both images counts in both - the same as running one masker per image
and stacking the columns. The combined label values offset each image's values by the largest value of
the images before it, so they never collide.

The atlas must be on the image's grid (shape and affine): resampling it per scan would hide a space
mismatch (a T1w-space run parcellated with an MNI atlas), so a different grid fails the scan instead.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from scipy import sparse

from corpus_builder.atlas import atlas_order, read_networks
from corpus_builder.config import AtlasConfig
from corpus_builder.records import RawScan, ScanError
from fmrilm_core.errors import InputError

GRID_ATOL = 1e-3
BLOCK_BYTES = 32 * 2**20        # volumes read per step: about this many bytes of float32 data
_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ImageFileError, HeaderDataError)
_CACHE: dict[tuple, LabelAtlas] = {}


def _one_line(exc: BaseException, path: Path | str | None = None) -> str:
    """`Type: message` on one line; the file's path is cut out (paths hold raw subject ids)."""
    text = " ".join(str(exc).split())
    if path:
        text = text.replace(f'"{path}"', "the file").replace(str(path), "the file")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_label_table(path: Path) -> dict[int, str]:
    """Label value -> name from a label table.

    Accepted: a TSV with a header naming `index` and `name` (or `label`) columns (BIDS dseg.tsv); headerless
    tab- or space-separated lines starting with the value (Schaefer's `*_order.txt`, FSL LUTs); or one
    name per line, in label-value order starting at 1 (Tian's `*_label.txt`).
    """
    path = Path(path)
    try:
        lines = [ln.rstrip("\r\n") for ln in path.read_text().splitlines()]
    except OSError as exc:
        raise InputError(f"{path}: cannot read atlas label table ({_one_line(exc)})") from None
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: empty atlas label table")
    header = [h.strip().lower() for h in lines[0].split("\t")]
    if "index" in header and ("name" in header or "label" in header):
        i_col, n_col = header.index("index"), header.index("name" if "name" in header else "label")
        rows = [ln.split("\t") for ln in lines[1:]]
        try:
            return {int(float(r[i_col])): r[n_col].strip() for r in rows}
        except (IndexError, ValueError):
            raise InputError(f"{path}: malformed row in atlas label table") from None
    fields = [ln.split() for ln in lines]
    if all(len(f) >= 2 and f[0].lstrip("-").isdigit() for f in fields):
        return {int(f[0]): f[1] for f in fields}
    return {i + 1: ln.strip() for i, ln in enumerate(lines)}


@dataclass(frozen=True, eq=False)
class LabelAtlas:
    """One or more label images on a common grid, as a sparse averaging matrix."""

    weights: sparse.csr_matrix      # [n_labels, n_voxels] float64, voxels in NIfTI (Fortran) order
    labels: tuple[str, ...]         # ROI names, one per row
    values: tuple[int, ...]         # combined label values (image k offset by the max value of images < k)
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def from_images(cls, images: Sequence[Path | nib.Nifti1Image],
                    label_tables: Sequence[Path | dict[int, str] | None] | None = None) -> LabelAtlas:
        """Build from label images (paths or loaded images), each with an optional label table.

        Without a table, an ROI is named `<image name>_<value>`. Raises InputError for unusable atlases.
        """
        if not images:
            raise InputError("no atlas images given (set atlas.images)")
        tables = list(label_tables) if label_tables else [None] * len(images)
        if len(tables) != len(images):
            raise InputError(f"{len(images)} atlas images but {len(tables)} label tables")
        blocks, labels, values = [], [], []
        shape = affine = None
        offset = 0
        for k, (image, table) in enumerate(zip(images, tables)):
            name = Path(image).name if isinstance(image, (str, Path)) else f"atlas{k + 1}"
            data, img_affine = _read_label_image(image)
            if shape is None:
                shape, affine = data.shape, img_affine
            elif data.shape != shape or not np.allclose(img_affine, affine, atol=GRID_ATOL):
                raise InputError(f"{name}: atlas images are not on one grid (shape {data.shape} vs {shape})")
            flat = data.ravel(order="F")
            voxels = np.flatnonzero(flat)
            present, row, counts = np.unique(flat[voxels], return_inverse=True, return_counts=True)
            if not len(present):
                raise InputError(f"{name}: atlas image has no labels (all background)")
            blocks.append(sparse.csr_matrix((1.0 / counts[row], (row, voxels)),
                                            shape=(len(present), flat.size)))
            names = table if isinstance(table, dict) else read_label_table(table) if table else None
            for value in present.tolist():
                if names is None:
                    labels.append(f"{name.split('.')[0]}_{value}")
                elif value in names:
                    labels.append(names[value])
                else:
                    raise InputError(f"{table}: no name for label value {value} of atlas {name}")
            values += (present + offset).tolist()
            offset += int(present.max())
        weights = sparse.vstack(blocks, format="csr")
        return cls(weights=weights, labels=tuple(labels), values=tuple(values), shape=tuple(shape),
                   affine=affine)

    @classmethod
    def from_config(cls, cfg: AtlasConfig) -> LabelAtlas:
        """The atlas named by the config, built once per process (keyed by the files and their mtimes).

        With a network lookup table (`cfg.lookup`), the ROIs are put in atlas order by it (subcortical
        first), as for atlases whose label names say nothing about their network.
        """
        files = [*cfg.images, *cfg.labels, *([cfg.lookup] if cfg.lookup else [])]
        try:
            key = (len(cfg.images), *((str(Path(p).resolve()), Path(p).stat().st_mtime_ns) for p in files))
        except OSError as exc:
            raise InputError(f"atlas file not found: {_one_line(exc)}") from None
        if key not in _CACHE:
            atlas = cls.from_images(list(cfg.images), list(cfg.labels) or None)
            if cfg.lookup is not None:
                try:
                    order = atlas_order(list(atlas.labels), read_networks(cfg.lookup))
                except (OSError, ValueError) as exc:
                    raise InputError(f"{cfg.lookup}: unusable network lookup ({_one_line(exc)})") from None
                atlas = cls(weights=atlas.weights[order], labels=tuple(atlas.labels[i] for i in order),
                            values=tuple(atlas.values[i] for i in order), shape=atlas.shape,
                            affine=atlas.affine)
            _CACHE[key] = atlas
        return _CACHE[key]

    def check_grid(self, img: nib.Nifti1Image) -> None:
        """Raise ScanError unless `img` (3D or 4D) is on the atlas grid."""
        if tuple(img.shape[:3]) != self.shape or not np.allclose(img.affine, self.affine, atol=GRID_ATOL):
            raise ScanError(f"atlas grid (shape/affine) does not match the image: image "
                            f"{tuple(img.shape[:3])}, atlas {self.shape}; resample the atlas to its space")

    def transform(self, img: nib.Nifti1Image, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
        """[T, n_labels] float32 label means of a 4D image on the atlas grid (read a block at a time)."""
        self.check_grid(img)
        if img.ndim != 4:
            raise ScanError(f"expected a 4D image, got shape {img.shape}")
        n_vol = img.shape[3]
        step = max(1, block_bytes // (4 * int(np.prod(self.shape))))
        out = np.empty((n_vol, self.n_labels), np.float32)
        weights = self.weights
        for t0 in range(0, n_vol, step):
            block = np.asarray(img.dataobj[..., t0:t0 + step])
            flat = block.reshape(-1, block.shape[-1], order="F")   # a view: volumes are Fortran-contiguous
            # one sparse mat-vec per volume reads each volume once in place; W @ flat would first copy the
            # whole block to C order, and is 4-7x slower
            for j in range(flat.shape[1]):
                out[t0 + j] = weights @ flat[:, j]
        return out


def check_atlas(cfg: AtlasConfig) -> LabelAtlas:
    """The configured atlas, checked before any scan is read: it loads, and has `n_rois` labels.

    Sources call this at discovery so that a missing or wrong atlas stops the build with one InputError
    instead of failing every scan with the same reason.
    """
    if not cfg.images:
        raise InputError("NIfTI sources need atlas label images: set corpus.source.atlas.images (and labels)")
    atlas = LabelAtlas.from_config(cfg)
    if cfg.n_rois is not None and atlas.n_labels != cfg.n_rois:
        raise InputError(f"the atlas has {atlas.n_labels} labels but atlas.n_rois is {cfg.n_rois}")
    return atlas


def _read_label_image(image: Path | nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(image) if isinstance(image, (str, Path)) else image
        data = np.asanyarray(img.dataobj)
    except (FileNotFoundError, *_READ_ERRORS) as exc:
        raise InputError(f"{image}: cannot read atlas image ({_one_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{image}: atlas image must be 3D, got shape {data.shape}")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise InputError(f"{image}: atlas image holds non-integer values (not a label image)")
    return rounded.astype(np.int64), np.asarray(img.affine, dtype=float)


def load_image(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI image lazily (header only), keeping the file open for sequential block reads."""
    try:
        return nib.load(path, keep_file_open=True)
    except FileNotFoundError:
        raise ScanError("file not found") from None
    except _READ_ERRORS as exc:
        raise ScanError(f"unreadable NIfTI ({_one_line(exc, path)})") from None


def header_tr(img: nib.Nifti1Image) -> float | None:
    """Repetition time in seconds from the header's 4th zoom (honouring ms / us time units), None if unset."""
    if len(img.header.get_zooms()) < 4:
        return None
    tr = float(img.header.get_zooms()[3])
    unit = img.header.get_xyzt_units()[1]
    tr = tr / 1000 if unit == "msec" else tr / 1e6 if unit == "usec" else tr
    return tr if tr > 0 else None


def _parcellate(img: nib.Nifti1Image, atlas: LabelAtlas, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    try:  # the kept-open handle closes when `img` is freed (nibabel's ArrayProxy.__del__)
        return atlas.transform(img, block_bytes)
    except _READ_ERRORS as exc:
        raise ScanError(f"truncated or corrupt NIfTI ({_one_line(exc, img.get_filename())})") from None


def extract(img_path: Path | str, atlas: LabelAtlas, block_bytes: int = BLOCK_BYTES
            ) -> tuple[np.ndarray, list[str]]:
    """Label means of a 4D NIfTI file: ([T, N] float32, the N atlas labels).

    Raises ScanError (one line) for a missing, truncated or corrupt file or a grid that is not the atlas's.
    """
    return _parcellate(load_image(Path(img_path)), atlas, block_bytes), list(atlas.labels)


def read_scan(path: Path | str, cfg: AtlasConfig, tr: float | None = None) -> RawScan:
    """A NIfTI run parcellated with the configured atlas; TR `tr` if given (sidecar), else the header's."""
    img = load_image(Path(path))
    tr = tr or header_tr(img)
    if not tr:
        raise ScanError("no repetition time (no sidecar RepetitionTime and none in the NIfTI header)")
    atlas = LabelAtlas.from_config(cfg)
    return RawScan(data=_parcellate(img, atlas), labels=list(atlas.labels), tr=float(tr))
