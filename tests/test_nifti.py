"""Sparse label-matrix parcellation (`corpus_builder.nifti`) against nilearn's NiftiLabelsMasker, atlas
combination and label tables, and the ways a NIfTI scan fails."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.maskers import NiftiLabelsMasker

from corpus_builder import sources
from corpus_builder.config import AtlasConfig, CleaningConfig, SourceConfig
from corpus_builder.nifti import LabelAtlas, extract, header_tr, load_image, read_label_table
from corpus_builder.records import ScanError, ScanRecord
from fmrilm_core.errors import InputError

SHAPE = (7, 8, 9)


def _affine(shift: float = 0.0) -> np.ndarray:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0 + shift, -12.0, -14.0]
    return affine


def _labels(rng, values, p_background=0.3, shape=SHAPE) -> np.ndarray:
    data = rng.choice(np.asarray(values), size=shape).astype(np.int16)
    data[rng.random(shape) < p_background] = 0
    return data


def _image(rng, n_vol=23, shape=SHAPE, dtype=np.float32, tr=2.0, affine=None) -> nib.Nifti1Image:
    data = (100 + 10 * rng.standard_normal((*shape, n_vol))).astype(np.float32)
    img = nib.Nifti1Image(data, _affine() if affine is None else affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((3.0, 3.0, 3.0, tr))
    return img


def _masker(labels_path, img_path) -> np.ndarray:
    return NiftiLabelsMasker(labels_img=str(labels_path), strategy="mean", standardize=None).fit_transform(
        str(img_path))


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_matches_nilearn_masker(tmp_path, dtype):
    rng = np.random.default_rng(0)
    labels = _labels(rng, [1, 2, 4, 7, 9, 40])          # gaps and a large value: columns follow the values
    nib.save(nib.Nifti1Image(labels, _affine()), tmp_path / "atlas.nii.gz")
    nib.save(_image(rng, dtype=dtype), tmp_path / "bold.nii.gz")
    atlas = LabelAtlas.from_images([tmp_path / "atlas.nii.gz"])
    vol_bytes = 4 * int(np.prod(SHAPE))
    x, names = extract(tmp_path / "bold.nii.gz", atlas, block_bytes=5 * vol_bytes)   # 5 blocks, last partial
    expected = _masker(tmp_path / "atlas.nii.gz", tmp_path / "bold.nii.gz")
    assert x.dtype == np.float32 and x.shape == expected.shape == (23, 6)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-3)
    assert atlas.values == (1, 2, 4, 7, 9, 40)
    assert names == [f"atlas_{v}" for v in (1, 2, 4, 7, 9, 40)]


def test_two_atlases_combined_with_label_tables(tmp_path):
    rng = np.random.default_rng(1)
    sub = np.zeros(SHAPE, np.int16)
    sub[2:5, 2:6, 3:6] = _labels(rng, [1, 2, 3], p_background=0.0, shape=(3, 4, 3))
    cortex = _labels(rng, [1, 2, 3, 4, 5])             # overlaps the subcortical block: both count the voxel
    nib.save(nib.Nifti1Image(sub, _affine()), tmp_path / "tian.nii.gz")
    nib.save(nib.Nifti1Image(cortex, _affine()), tmp_path / "schaefer.nii.gz")
    tian_names = ["HIP-rh", "THA-rh", "HIP-lh"]
    schaefer_names = [f"7Networks_LH_{n}_1" for n in ("Vis", "SomMot", "DorsAttn", "Cont", "Default")]
    (tmp_path / "tian.txt").write_text("\n".join(tian_names) + "\n")           # one name per line
    pd.DataFrame({"index": range(1, 6), "name": schaefer_names}).to_csv(tmp_path / "schaefer.tsv", sep="\t",
                                                                          index=False)
    nib.save(_image(rng), tmp_path / "bold.nii.gz")
    cfg = AtlasConfig(images=[tmp_path / "tian.nii.gz", tmp_path / "schaefer.nii.gz"],
                      labels=[tmp_path / "tian.txt", tmp_path / "schaefer.tsv"], n_rois=8)
    atlas = LabelAtlas.from_config(cfg)
    assert LabelAtlas.from_config(cfg) is atlas                                 # built once per process
    x, names = extract(tmp_path / "bold.nii.gz", atlas)
    assert names == tian_names + schaefer_names
    assert atlas.values == (1, 2, 3, 4, 5, 6, 7, 8)                           # second image offset by 3
    expected = np.hstack([_masker(tmp_path / "tian.nii.gz", tmp_path / "bold.nii.gz"),
                          _masker(tmp_path / "schaefer.nii.gz", tmp_path / "bold.nii.gz")])
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-3)


def test_label_table_formats(tmp_path):
    (tmp_path / "order.txt").write_text("1\t7Networks_LH_Vis_1\t120\t18\t131\t0\n"
                                        "2\t7Networks_LH_Vis_2\t1\t2\t3\t0\n")   # Schaefer *_order.txt
    (tmp_path / "dseg.tsv").write_text("index\tname\tnetwork\n3\tA\tx\n1\tB\ty\n")
    (tmp_path / "names.txt").write_text("CAU-lh\n\nPUT-lh\n")
    assert read_label_table(tmp_path / "order.txt") == {1: "7Networks_LH_Vis_1", 2: "7Networks_LH_Vis_2"}
    assert read_label_table(tmp_path / "dseg.tsv") == {3: "A", 1: "B"}
    assert read_label_table(tmp_path / "names.txt") == {1: "CAU-lh", 2: "PUT-lh"}


def test_bad_atlases_are_input_errors(tmp_path):
    rng = np.random.default_rng(2)
    nib.save(nib.Nifti1Image(_labels(rng, [1, 2, 3]), _affine()), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(_labels(rng, [1, 2], shape=(7, 8, 8)), _affine()), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(rng.random(SHAPE).astype(np.float32), _affine()), tmp_path / "float.nii.gz")
    (tmp_path / "two.txt").write_text("X\nY\n")
    with pytest.raises(InputError, match="not on one grid"):
        LabelAtlas.from_images([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    with pytest.raises(InputError, match="non-integer"):
        LabelAtlas.from_images([tmp_path / "float.nii.gz"])
    with pytest.raises(InputError, match="no name for label value 3"):
        LabelAtlas.from_images([tmp_path / "a.nii.gz"], [tmp_path / "two.txt"])
    with pytest.raises(InputError, match="not found"):
        LabelAtlas.from_config(AtlasConfig(images=[tmp_path / "missing.nii.gz"]))


def test_grid_mismatch_is_a_scan_error(tmp_path):
    rng = np.random.default_rng(3)
    nib.save(nib.Nifti1Image(_labels(rng, [1, 2, 3]), _affine()), tmp_path / "atlas.nii.gz")
    nib.save(_image(rng, shape=(7, 8, 10)), tmp_path / "shape.nii.gz")
    nib.save(_image(rng, affine=_affine(shift=2.0)), tmp_path / "affine.nii.gz")
    atlas = LabelAtlas.from_images([tmp_path / "atlas.nii.gz"])
    for name in ("shape.nii.gz", "affine.nii.gz"):
        with pytest.raises(ScanError, match=r"atlas grid \(shape/affine\) does not match the image"):
            extract(tmp_path / name, atlas)


def test_truncated_gzip_is_a_failed_record(tmp_path):
    rng = np.random.default_rng(4)
    nib.save(nib.Nifti1Image(_labels(rng, [1, 2, 3]), _affine()), tmp_path / "atlas.nii.gz")
    nib.save(_image(rng, n_vol=40), tmp_path / "bold.nii.gz")
    blob = (tmp_path / "bold.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) * 2 // 3])
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 40))
    cfg = SourceConfig(atlas=AtlasConfig(images=[tmp_path / "atlas.nii.gz"], n_rois=3),
                       cleaning=CleaningConfig(length=16, confounds=[]))
    atlas = LabelAtlas.from_config(cfg.atlas)
    with pytest.raises(ScanError, match="truncated or corrupt"):
        extract(tmp_path / "cut.nii.gz", atlas)
    for name, reason in (("cut.nii.gz", "truncated or corrupt NIfTI"),
                         ("garbage.nii.gz", "unreadable NIfTI")):
        record = ScanRecord(dataset="X", subject="s", session="1", run="1", source_path=str(tmp_path / name),
                            loader="fmriprep", tr=2.0)
        assert sources.extract(record, cfg) == (None, None)
        assert record.error.startswith(reason) and "\n" not in record.error
        assert str(tmp_path) not in record.error                              # paths hold raw ids
    good = ScanRecord(dataset="X", subject="s", session="1", run="1",
                      source_path=str(tmp_path / "bold.nii.gz"), loader="fmriprep")
    x, labels = sources.extract(good, cfg)
    assert good.error is None and x.shape == (16, 3) and good.tr == 2.0   # TR from the header


def test_header_tr_units(tmp_path):
    img = _image(np.random.default_rng(5), tr=800.0)
    img.header.set_xyzt_units("mm", "msec")
    nib.save(img, tmp_path / "ms.nii.gz")
    assert header_tr(load_image(tmp_path / "ms.nii.gz")) == pytest.approx(0.8)
