"""Evaluation (`fmrilm eval`, issue 18): corpus readers of instruction items and phenotypes, the tasks, option
scoring, calibration, baselines, k-shot prompts, the report. A 12-ROI synthetic corpus with a test split, a tiny
stage-1 tokenizer and a tiny random Llama aligned for a few steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_builder.readers import read_instructions, read_manifest, read_phenotypes, split_keys
from fmrilm_core.errors import InputError
from fmrilm_core.runtime import LocalRuntime
from tests.conftest import N_ROIS, align_cfg, tiny_cohort, train_brain_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """UKB (sex, age, fluid intelligence) and ABCD (sex, age, ADHD) with train, val and test splits."""
    return tiny_cohort(tmp_path_factory.mktemp("eval"), subjects=32, fractions="[0.5,0.1,0.4]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus, llm_dir) -> Path:
    """A stage-1 tokenizer trained on the corpus and a tiny Llama aligned to it for a few steps."""
    from llm_train.train import AlignInputs
    from llm_train.train import train as train_align

    root = tmp_path_factory.mktemp("eval_models")
    tok_dir = train_brain_tokenizer(corpus, llm_dir, root / "tok", steps=2)
    cfg = align_cfg(llm_dir, steps=2, checkpoint_every=2, eval_every=2, max_caption_tokens=16,
                    eval={"scans": 2, "caption_scans": 2, "max_new_tokens": 2, "t2t_docs": 2})
    out = root / "llm"
    train_align(cfg, AlignInputs(corpus, tok_dir, out), LocalRuntime(out / "checkpoints"))
    return out


# ---- readers ----------------------------------------------------------------------------------------------


def test_read_instructions_and_phenotypes_per_split(corpus):
    manifest = read_manifest(corpus)
    for split in ("train", "test"):
        keys = split_keys(corpus, split)
        items = read_instructions(corpus, split)
        assert sorted(items) == keys
        assert all(isinstance(v, list) and all("turns" in i for i in v) for v in items.values())
        pheno = read_phenotypes(corpus, split)
        assert list(pheno.index) == keys and (pheno["split"] == split).all()
        m = manifest.set_index("key").loc[keys]
        assert (pheno["subject"] == m["subject"]).all()
        assert set(pheno["sex"].dropna()) <= {"M", "F"}
        sexes = {k: next(i["answer"] for i in v if i["attribute"] == "sex") for k, v in items.items()}
        assert all((sexes[k] == "Male") == (pheno.at[k, "sex"] == "M") for k in keys)
    assert set(read_phenotypes(corpus, "train")["subject"]).isdisjoint(read_phenotypes(corpus, "test")["subject"])


# ---- tasks ------------------------------------------------------------------------------------------------


def test_tasks_from_phenotypes_and_skipped_with_a_reason(corpus):
    from evaluation.tasks import TASKS, select_tasks

    train, test = read_phenotypes(corpus, "train"), read_phenotypes(corpus, "test")
    run, skipped = select_tasks(None, train, test)
    names = {t.task.name for t in run}
    assert {"sex", "age"} <= names
    assert skipped["ad"] == "the corpus has no diagnosis label for Alzheimer's disease"
    assert skipped["asd"] == "the corpus has no diagnosis label for autism spectrum disorder"
    sex = next(t for t in run if t.task.name == "sex")
    assert set(sex.test.index) <= set(test.index)
    assert all((sex.test[k] == 1) == (test.at[k, "sex"] == "M") for k in sex.test.index)
    if "adhd" in names:  # ABCD only: patients against the controls of ABCD, never UKB's healthy adults
        adhd = next(t for t in run if t.task.name == "adhd")
        assert set(train.loc[adhd.train.index, "dataset"]) == {"ABCD"}
    with pytest.raises(ValueError, match="unknown task"):
        select_tasks(["sex", "iq"], train, test)
    assert TASKS["adhd"].options == ("no diagnosis", "ADHD")


# ---- scoring ----------------------------------------------------------------------------------------------


def _hand_loglik(model, ids: list[int], answer: list[int]) -> float:
    """log P(answer | ids) from plain input ids through the backbone (the tokens mode's embeddings are the
    brain tokens' own rows)."""
    full = torch.tensor([ids + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model.backbone(input_ids=full).logits.float()[0], -1)
    return float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(answer)))


def test_option_scoring_equals_a_hand_computation(corpus, model_dir):
    from llm_train.data import encode_scans
    from llm_train.export import load_aligned
    from llm_train.scoring import Shot, option_loglik, option_probabilities, question_ids, shot_text

    model, tokenizer, brain, meta = load_aligned(model_dir)
    from corpus_builder.readers import open_zarr

    keys = split_keys(corpus, "test")[:3]
    x = torch.from_numpy(open_zarr(corpus).batch(keys).astype(np.float32))
    scans = encode_scans(brain, x, False, model.connectivity)
    assert scans["connectivity"].shape == (3, model.connectivity.n_tokens)
    q = question_ids(tokenizer, "the brain is")
    eos = tokenizer.eos_token_id
    options = [tokenizer("default network", add_special_tokens=False)["input_ids"] + [eos],
               tokenizer("visual", add_special_tokens=False)["input_ids"] + [eos]]
    v = model.vocab
    shot_scan = encode_scans(brain, torch.from_numpy(open_zarr(corpus).batch(split_keys(corpus, "train")[:1])
                                                     .astype(np.float32)), False, model.connectivity)
    text = shot_text(tokenizer, "the brain is", "weak")
    for shots in ([], [Shot({k: v[0] for k, v in shot_scan.items()}, text)]):
        got = option_loglik(model, scans, q, options, shots)
        prefix_shots = []
        for s in shots:
            prefix_shots += [v.scan_start, *v.ids(s.scan["codes"]).flatten().tolist(),
                             *s.scan["connectivity"].tolist(), v.scan_end, *s.text]
        for i in range(len(keys)):
            ids = prefix_shots + [v.scan_start, *v.ids(scans["codes"][i]).flatten().tolist(),
                                  *scans["connectivity"][i].tolist(), v.scan_end, *q]
            for c, option in enumerate(options):
                assert got[i, c].item() == pytest.approx(_hand_loglik(model, ids, option), abs=1e-4)
        probs = option_probabilities(model, tokenizer, scans, "the brain is", ["default network", "visual"], shots)
        np.testing.assert_allclose(probs, torch.softmax(got.double(), 1).numpy(), atol=1e-9)


@pytest.mark.parametrize("mode", ["sequential", "per_step"])
def test_a_zero_shot_sequence_is_stage_twos_scan_sequence(corpus, model_dir, mode):
    """With no examples the prompt is exactly what stage 2 trained F2T on: same embeddings, same position ids."""
    from corpus_builder.readers import open_zarr
    from llm_train.data import encode_scans
    from llm_train.export import load_aligned
    from llm_train.scoring import question_ids, sequence

    model, tokenizer, brain, _ = load_aligned(model_dir)
    model.position_mode = mode
    x = torch.from_numpy(open_zarr(corpus).batch(split_keys(corpus, "test")[:2]).astype(np.float32))
    scans = encode_scans(brain, x, False, model.connectivity)
    q = question_ids(tokenizer, "the brain is")
    with torch.no_grad():
        embeds, pos = sequence(model, [], scans, q)
        ref, n_suffix = model.scan_sequence(scans, torch.tensor(q)[None].expand(2, -1))
    torch.testing.assert_close(embeds, ref)
    assert torch.equal(pos, model.positions(2, n_suffix, "cpu"))


def test_numbers_parse_and_a_miss_takes_the_declared_fallback_on_the_same_scans_as_the_baselines():
    from evaluation.metrics import regression_figures
    from evaluation.protocols import with_fallback
    from llm_train.scoring import parse_number

    assert parse_number("63") == 63 and parse_number(" 7.5") == 7.5
    assert parse_number("") is None and parse_number("7..5") is None and parse_number("1.2.3") is None
    y = np.array([60.0, 70.0, 80.0, 50.0])
    values, misses = with_fallback([61.0, None, 79.0, float("nan")], fallback=65.0)
    assert misses == 2 and values.tolist() == [61.0, 65.0, 79.0, 65.0]
    m = regression_figures(y, values)
    assert m["n"] == 4 and m["mae"] == pytest.approx((1 + 5 + 1 + 15) / 4)  # every scan, as the FC baseline's


# ---- baselines --------------------------------------------------------------------------------------------


def test_fc_features_are_fisher_z_of_the_upper_triangle(corpus):
    from corpus_builder.readers import open_zarr
    from evaluation.baselines import fc_features

    keys = split_keys(corpus, "train")[:2]
    x = open_zarr(corpus).batch(keys)
    got = fc_features(x)
    assert got.shape == (2, N_ROIS * (N_ROIS - 1) // 2)
    corr = np.corrcoef(x[1].T.astype(np.float64))
    np.testing.assert_allclose(got[1], np.arctanh(corr[np.triu_indices(N_ROIS, 1)]), atol=1e-8)


def test_linear_baseline_chooses_its_regularisation_on_train_folds_grouped_by_subject():
    from evaluation.baselines import fit_predict

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 2)  # two scans per subject
    y = np.repeat(np.arange(30) % 2, 2)
    x = rng.normal(size=(60, 20)) + y[:, None] * 0.8
    xt = rng.normal(size=(20, 20)) + (np.arange(20) % 2)[:, None] * 0.8
    p, chosen = fit_predict(x, y, groups, xt, classification=True)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(np.arange(20) % 2, p) > 0.9 and chosen["folds"] == 5 and chosen["param"] == "C"
    v, chosen = fit_predict(x, x[:, 0] * 3 + 1, groups, xt, classification=False)
    assert np.corrcoef(v, xt[:, 0])[0, 1] > 0.9 and chosen["param"] == "alpha"


# ---- the evaluation run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, corpus, model_dir):
    from evaluation.task_eval import evaluate_tasks

    out = tmp_path_factory.mktemp("eval_out") / "E"
    metrics = evaluate_tasks(model_dir, corpus, out, shots=(0, 2), examples=2, max_new_tokens=4, device="cpu")
    return out, metrics


def test_metrics_hold_every_task_protocol_and_both_baselines(evaluated):
    out, metrics = evaluated
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["ad"] == {"skipped": "the corpus has no diagnosis label for Alzheimer's disease"}
    for name in ("sex", "age"):
        entry = metrics[name]
        for protocol in ("zero_shot", "k_shot_2", "fc_baseline", "tokenizer_probe"):
            assert protocol in entry, (name, protocol)
    for protocol in ("zero_shot", "k_shot_2", "fc_baseline", "tokenizer_probe"):
        assert set(metrics["sex"][protocol]) >= {"accuracy", "balanced_accuracy", "auc", "f1", "ece"}
        assert set(metrics["age"][protocol]) >= {"mae", "r", "r2", "ci"}
        assert metrics["sex"][protocol]["ci"]["auc"] is not None  # every figure with its interval
        if protocol != "fc_baseline":
            assert set(metrics["sex"][protocol]["vs_fc_baseline"]) >= {"auc"}
    # the tiny word-level tokenizer has no digit token: every generated age is a counted miss, scored as the
    # train-split mean, so the model's MAE covers the same scans as the FC baseline's
    zero = metrics["age"]["zero_shot"]
    assert zero["misses"] == metrics["age"]["n_test"] == zero["n"] == metrics["age"]["fc_baseline"]["n"]
    assert zero["miss_rate"] == 1.0 and np.isfinite(zero["mae"])
    preds = json.loads((out / "predictions.json").read_text())["age"]
    assert set(preds["zero_shot"]) == {metrics["age"]["fallback"]["value"]}


def test_no_k_shot_prompt_holds_a_test_subject(evaluated, corpus):
    from evaluation.task_eval import choose_shots
    from evaluation.tasks import select_tasks

    out, _ = evaluated
    info = json.loads((out / "eval.json").read_text())
    train, test = read_phenotypes(corpus, "train"), read_phenotypes(corpus, "test")
    test_subjects = set(test["subject"])
    used = info["in_context_examples"]
    assert used["sex"]["2"] and used["sex"]["0"] == []
    for per_k in used.values():
        for keys in per_k.values():
            assert set(keys) <= set(train.index)
            assert not set(train.loc[keys, "subject"]) & test_subjects
    runnable, _ = select_tasks(["sex"], train, test)
    for seed in range(20):  # class-balanced, one scan per subject, train only, whatever the seed
        keys = choose_shots(runnable[0], train, test_subjects, 4, seed)
        assert sorted(runnable[0].train[keys]) == [0, 0, 1, 1]
        assert len(set(train.loc[keys, "subject"])) == 4 and not set(train.loc[keys, "subject"]) & test_subjects
    poisoned = train.copy()
    poisoned["subject"] = "same-subject-as-test"
    with pytest.raises(RuntimeError, match="not train scans of train subjects"):
        choose_shots(runnable[0], poisoned, {"same-subject-as-test"}, 1, 0)


def test_report_is_self_contained_and_holds_every_table_and_figure(evaluated):
    import base64
    from html.parser import HTMLParser

    out, metrics = evaluated

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.images, self.links = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.tables.append(attrs.get("id"))
            if tag == "img":
                self.images.append(attrs)
            for name in ("src", "href"):
                if name in attrs and tag != "img":
                    self.links.append(attrs[name])

    page = Parse()
    page.feed((out / "report.html").read_text())
    ran = [k for k, v in metrics.items() if "skipped" not in v]
    assert {f"table-{k}" for k in ran} | {"run", "skipped", "descriptions"} <= set(page.tables)
    classification = [k for k in ran if metrics[k]["kind"] == "classification"]
    assert len(page.images) == 3 * len(classification) + (len(ran) - len(classification))
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.links == []
    import re

    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (out / "report.html").read_text())
    assert "http" not in text and "<link" not in text and "@import" not in text  # nothing fetched


CHROMIUM_HINT = ("headless Chromium is not installed: `apt-get install chromium` (Debian's package) to render the "
                 "report in this test")


@pytest.mark.slow
def test_report_renders_offline_in_headless_chromium_with_every_image_loaded(evaluated, tmp_path):
    import re
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(CHROMIUM_HINT)
    out, _ = evaluated
    page = (out / "report.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { const seen = Array.from(document.images).map("
             "i => (i.complete && i.naturalWidth > 0) ? '1' : '0').join(''); "
             "document.body.setAttribute('data-images', seen || 'none'); });</script></body>")
    copy = tmp_path / "report_probe.html"
    copy.write_text(page.replace("</body>", probe))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any network fetch would fail
             "--virtual-time-budget=10000", "--window-size=1280,3000"]
    dom = subprocess.run(flags + ["--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=180)
    seen = re.search(r'data-images="([01]+|none)"', dom.stdout)
    assert seen is not None, dom.stderr[-2000:]
    assert seen.group(1) == "1" * page.count("<img "), seen.group(1)  # every image decoded, none broken
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True,
                   timeout=180)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(shot, out / "report_screenshot.png")  # kept beside the report for a person to look at


# ---- the command ------------------------------------------------------------------------------------------


def _fmrilm(*args: str):
    from typer.testing import CliRunner

    from fmrilm.cli import app

    return CliRunner().invoke(app, list(args))


def test_eval_command_prints_the_table_and_refuses_bad_input_in_one_line(corpus, model_dir, tmp_path):
    import shutil

    base = ["eval", "--model", str(model_dir), "--corpus", str(corpus), "--set", f"workdir={tmp_path / 'w'}"]
    done = _fmrilm(*base, "--out", str(tmp_path / "E"), "--tasks", "sex,ad", "--max-test", "4", "--examples", "1")
    assert done.exit_code == 0, done.output
    assert "sex" in done.output and "fc_baseline" in done.output and "tokenizer_probe" in done.output
    assert "skipped: the corpus has no diagnosis label" in done.output
    assert (tmp_path / "E" / "report.html").is_file() and (tmp_path / "w" / "mlflow.db").is_file()

    # more shots than the context holds: 10 scans of 50 tokens and their text pass the tiny Llama's 512
    done = _fmrilm(*base, "--out", str(tmp_path / "E2"), "--tasks", "sex", "--shots", "9")
    assert done.exit_code == 2
    lines = [line for line in done.output.splitlines() if line.startswith("error:")]  # (weight-loading bars aside)
    assert len(lines) == 1 and "9-shot prompt needs" in lines[0] and "context holds 512" in lines[0], done.output
    assert "Traceback" not in done.output

    # a model folder from another atlas
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((other / "brain.json").read_text())
    meta["atlas"]["labels_sha256"] = "0" * 16
    (other / "brain.json").write_text(json.dumps(meta))
    done = _fmrilm("eval", "--model", str(other), "--corpus", str(corpus), "--out", str(tmp_path / "E3"),
                   "--set", f"workdir={tmp_path / 'w'}")
    assert done.exit_code == 2 and done.output.strip().startswith("error:") and "reads another atlas" in done.output
    assert len(done.output.strip().splitlines()) == 1  # refused before any model is loaded

    done = _fmrilm(*base, "--out", str(tmp_path / "E4"), "--tasks", "iq")
    assert done.exit_code == 2 and "eval.tasks" in done.output and "'iq'" in done.output


def test_ask_scores_named_choices_as_eval_scores_options(corpus, model_dir):
    from corpus_builder.readers import open_zarr
    from llm_train.ask import BrainReader
    from llm_train.data import encode_scans
    from llm_train.scoring import option_probabilities

    key = split_keys(corpus, "test")[0]
    done = _fmrilm("ask", "--model", str(model_dir), "--scan", key, "--corpus", str(corpus),
                   "--choices", "default network, visual", "the brain is")
    assert done.exit_code == 0, done.output
    rows = re.findall(r"([01]\.\d{3})  ([^\n\r]+)", done.output)  # (CliRunner mixes in the weight-loading bar)
    assert sorted(choice for _, choice in rows) == ["default network", "visual"], repr(done.output)
    reader = BrainReader(model_dir)
    x = open_zarr(corpus)[key]
    probs = option_probabilities(reader.model, reader.tokenizer,
                                 encode_scans(reader.brain_tokenizer, torch.as_tensor(x)[None], False,
                                              reader.model.connectivity),
                                 "the brain is", ["default network", "visual"])[0]
    assert reader.choose(x, "the brain is", ["default network", "visual"]) == pytest.approx(
        {"default network": probs[0], "visual": probs[1]})
    assert {c: float(p) for p, c in rows} == pytest.approx({"default network": probs[0], "visual": probs[1]},
                                                          abs=1e-3)
    done = _fmrilm("ask", "--model", str(model_dir), "--scan", key, "--corpus", str(corpus), "--choices", "visual",
                   "the brain is")
    assert done.exit_code == 2 and "at least two answers" in done.output

    # no --choices: answers the question names are scored the same way, after the question as written
    named = "the brain is: default network or visual?"
    done = _fmrilm("ask", "--model", str(model_dir), "--scan", key, "--corpus", str(corpus), named)
    assert done.exit_code == 0, done.output
    rows = re.findall(r"([01]\.\d{3})  ([^\n\r]+)", done.output)
    assert {c: float(p) for p, c in rows} == pytest.approx(
        reader.choose(x, named, ["default network", "visual"]), abs=1e-3), repr(done.output)
    # a question that names none is answered by generation, as before
    done = _fmrilm("ask", "--model", str(model_dir), "--scan", key, "--corpus", str(corpus), "--max-new-tokens",
                   "3", "the brain is")
    assert done.exit_code == 0 and not re.search(r"[01]\.\d{3}  ", done.output), done.output
    generated = reader.ask(x, "the brain is", 3) or "(the model generated no text)"
    assert done.output.rstrip().endswith(generated), repr(done.output)  # (after the weight-loading bar's \r)


@pytest.mark.parametrize("question, choices", [
    ("Is this subject male or female?", ["male", "female"]),
    ("Does this scan show ADHD: yes or no?", ["yes", "no"]),
    ("Which sex is this subject: female, male?", ["female", "male"]),
    ("Answer with one of: control, ADHD.", ["control", "ADHD"]),
    ("Is it a male, a female or other?", ["male", "female", "other"]),
    ("Diagnosis? no diagnosis, ADHD or autism spectrum disorder", ["no diagnosis", "ADHD", "autism spectrum disorder"]),
    ("Note: is the participant male or female?", ["male", "female"]),
    ("Yes or no?", ["Yes", "no"]),
])
def test_choices_are_read_from_a_question_that_names_them(question, choices):
    from llm_train.ask import choices_in

    assert choices_in(question) == choices


@pytest.mark.parametrize("question", [
    "Describe this scan.", "the brain is", "Age?", "Describe this scan in one or two sentences.",
    "Does this participant have a diagnosis? If so, which one?", "Which clinical diagnosis, if any, does this scan "
    "suggest?", "Describe this scan: networks, coupling.", "Answer with one of: control, ADHD. Be brief.",
    "Is it yes or yes?", "What is the age of this participant, or a guess at it?",
])
def test_no_choices_are_read_from_a_question_that_names_none(question):
    from llm_train.ask import choices_in

    assert choices_in(question) is None


def test_every_tasks_question_with_its_options_is_read_as_those_options():
    from evaluation.tasks import TASKS
    from llm_train.ask import choices_in

    for task in TASKS.values():
        assert choices_in(task.question) is None, task.name  # "Sex?" alone names no answer
        if task.options:
            options = list(task.options)
            assert choices_in(f"{task.question} {' or '.join(options)}") == options, task.name
            assert choices_in(f"{task.question.rstrip('?')}: {', '.join(options)}?") == options, task.name


# ---- stage 3: instruction tuning --------------------------------------------------------------------------


def test_chat_format_labels_the_assistant_turns_only(model_dir):
    from transformers import AutoTokenizer

    from llm_train.instruct import ChatFormat
    from llm_train.model import IGNORE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    turns = [{"role": "user", "content": "the brain"}, {"role": "assistant", "content": "default network"},
             {"role": "user", "content": "is"}, {"role": "assistant", "content": "visual"}]
    ids, labels = ChatFormat(tokenizer).encode(turns)
    assert len(ids) == len(labels)
    learnt = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert [lab for lab in labels if lab != IGNORE] == learnt
    end = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "X"}],
                                        tokenize=False).split("X", 1)[1]
    expected = [tokenizer(a + end, add_special_tokens=False)["input_ids"] for a in ("default network", "visual")]
    assert learnt == expected[0] + expected[1]
    whole = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == whole  # the turn-by-turn pieces are the whole conversation


def test_instruct_trains_saves_a_stock_folder_and_eval_reads_it_in_chat_format(corpus, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.task_eval import evaluate_tasks
    from llm_train.config import InstructConfig
    from llm_train.instruct import InstructInputs
    from llm_train.instruct import train as train_instruct

    cfg = InstructConfig.model_validate({"steps": 4, "batch_size": 2, "checkpoint_every": 2, "eval_every": 4,
                                         "eval_items": 4, "max_tokens": 48, "exclude_attributes": ["sex"],
                                         "optim": {"lr": 3e-3, "warmup_steps": 1}})
    out = tmp_path / "llm3"
    metrics = train_instruct(cfg, InstructInputs(model_dir, corpus, out), LocalRuntime(out / "checkpoints"))
    assert np.isfinite(metrics["val/answer_loss"]) and np.isfinite(metrics["val/answer_loss_before"])
    meta = json.loads((out / "brain.json").read_text())
    assert (meta["stage"], meta["prompt_format"], meta["lora"]) == ("instruct", "chat", False)
    assert meta["instruct"]["exclude_attributes"] == ["sex"]
    assert "sex" not in meta["instruct"]["trained_attributes"]  # read from the items trained on
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|brain_3|>") == meta["vocab"]["first_id"] + 3
    # a resumed run at its end trains nothing and saves the same folder
    again = train_instruct(cfg, InstructInputs(model_dir, corpus, out), LocalRuntime(out / "checkpoints"))
    assert again["val/answer_loss"] == pytest.approx(metrics["val/answer_loss"], rel=1e-5)

    got = evaluate_tasks(out, corpus, tmp_path / "E", tasks=["sex"], shots=(0, 1), examples=1, max_new_tokens=4,
                         max_test=4, report=False, device="cpu")
    assert {"zero_shot", "k_shot_1", "fc_baseline"} <= set(got["sex"])
    assert got["sex"]["in_tuning_mix"] is False  # left out of the mix: zero-shot in the paper's sense
    assert json.loads((tmp_path / "E" / "eval.json").read_text())["in_tuning_mix"] == {"sex": False}

    # `fmrilm ask` asks a stage-3 folder in its chat template (a stage-2 folder stays plain)
    from corpus_builder.readers import open_zarr
    from llm_train.ask import BrainReader
    from llm_train.scoring import question_ids

    reader = BrainReader(out)
    assert reader.prompt_ids("Sex?") == question_ids(reader.tokenizer, "Sex?", "chat")
    assert isinstance(reader.ask(open_zarr(corpus)[split_keys(corpus, "test")[0]], "Sex?", 3), str)
    plain = BrainReader(model_dir)
    assert plain.prompt_ids("Sex?") == plain.tokenizer("Sex?\n", add_special_tokens=False)["input_ids"]

    # LoRA through the command (adapters merged on save: a plain AutoModelForCausalLM folder)
    done = _fmrilm("llm", "instruct", "--model", str(model_dir), "--corpus", str(corpus), "--out",
                   str(tmp_path / "llm3_lora"), "--lora", "--set", f"workdir={tmp_path / 'w'}",
                   "--set", "instruct.steps=2", "--set", "instruct.checkpoint_every=2",
                   "--set", "instruct.eval_items=2", "--set", "instruct.max_tokens=32",
                   "--set", "instruct.lora.r=2", "--set", "instruct.lora.alpha=4")
    assert done.exit_code == 0, done.output
    assert "answer_loss" in done.output
    assert not (tmp_path / "llm3_lora" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "llm3_lora")


def test_train_n_and_tuned_fine_tune_on_train_subjects_only(corpus, model_dir, tmp_path):
    from evaluation.task_eval import evaluate_tasks
    from llm_train.config import InstructConfig

    cfg = InstructConfig.model_validate({"steps": 2, "batch_size": 2, "checkpoint_every": 2, "eval_every": 2,
                                         "eval_items": 2, "max_tokens": 32})
    out = tmp_path / "E"
    reported = []  # the fine-tuning loops report their steps, named after the task and protocol

    def progress_fn(stage, total, start, rank):
        from fmrilm_core.runtime import _Silent

        reported.append((stage, total, start))
        return _Silent()

    metrics = evaluate_tasks(model_dir, corpus, out, tasks=["sex"], shots=(0,), train_n=(2,), tuned=True,
                             instruct_cfg=cfg, max_test=4, examples=0, device="cpu", progress_fn=progress_fn)
    info = json.loads((out / "eval.json").read_text())
    every = info["fine_tuning_sets"]["sex"]["tuned"]
    epoch = -(-len(every) // cfg.batch_size)  # `tuned`: one epoch over every labelled train scan
    assert [r for r in reported if "fine-tuning" in r[0]] == [("eval sex_train_n_2: fine-tuning steps", 2, 0),
                                                             ("eval sex_tuned: fine-tuning steps", epoch, 0)]
    for name in ("zero_shot", "train_n_2", "tuned"):  # scoring reports its scans too
        assert (f"eval sex {name}: scans", 4, 0) in reported
    assert info["fine_tunings"]["sex"]["tuned"]["examples_seen"] == epoch * cfg.batch_size >= len(every)
    assert {"zero_shot", "train_n_2", "tuned", "fc_baseline", "tokenizer_probe"} <= set(metrics["sex"])
    keys = info["fine_tuning_sets"]["sex"]["train_n_2"]
    train, test = read_phenotypes(corpus, "train"), read_phenotypes(corpus, "test")
    assert set(keys) <= set(train.index) and not set(train.loc[keys, "subject"]) & set(test["subject"])
    assert sorted(train.loc[keys, "sex"]) == ["F", "M"]  # class-balanced
    every = info["fine_tuning_sets"]["sex"]["tuned"]  # fully tuned: every labelled train scan, no test subject
    assert every == sorted(train.index[train["sex"].notna()])
    for name in ("train_n_2", "tuned"):
        assert json.loads((out / "fine_tuned" / f"sex_{name}" / "brain.json").read_text())["stage"] == "instruct"
        assert name in (out / "report.html").read_text()


def test_a_train_runner_runs_each_fine_tuning_as_the_pipeline_runs_a_stage(corpus, model_dir, tmp_path):
    """The pipeline hands eval a runner built on `cluster.launch.run_training` (Ray Train workers when it has
    any); every fine-tuning goes through it, stage 3's own training, into the fine-tuning's folder."""
    from cluster.launch import run_training
    from evaluation.task_eval import evaluate_tasks
    from llm_train import instruct
    from llm_train.config import InstructConfig

    cfg = InstructConfig.model_validate({"steps": 2, "batch_size": 2, "checkpoint_every": 2, "eval_every": 2,
                                         "eval_items": 2, "max_tokens": 32})
    calls = []

    def runner(train_fn, tune_cfg, inputs, name):
        calls.append((train_fn, tune_cfg, inputs, name))
        return run_training(train_fn, tune_cfg, inputs, workers=0, log_fn=None, storage=inputs.out / "ray",
                            name=name)

    out = tmp_path / "E"
    metrics = evaluate_tasks(model_dir, corpus, out, tasks=["sex"], shots=(), train_n=(2,), instruct_cfg=cfg,
                             max_test=4, examples=0, device="cpu", report=False, temperature=False,
                             train_runner=runner)
    tuned = out / "fine_tuned" / "sex_train_n_2"
    assert [(fn, c, inputs.out, name) for fn, c, inputs, name in calls] == [
        (instruct.train, cfg, tuned, "fine_tune_sex_train_n_2")]
    chosen = json.loads((out / "eval.json").read_text())["fine_tuning_sets"]["sex"]["train_n_2"]
    assert [key for key, _ in calls[0][2].items] == chosen  # the examples, and only them
    assert (tuned / "checkpoints" / "step_00000002").is_dir()  # run_training's runtime, in the folder
    assert json.loads((tuned / "brain.json").read_text())["stage"] == "instruct"
    assert "train_n_2" in metrics["sex"]


def test_eval_never_reports_another_models_fine_tuning_left_in_its_folder(corpus, model_dir, tmp_path):
    """An eval folder holds a fine-tuning made from one model; evaluating another model into it redoes the
    fine-tuning (or, with resume, refuses in one line) instead of scoring the stale one."""
    import shutil

    from evaluation.task_eval import evaluate_tasks
    from fmrilm_core.lineage import folder_digest
    from llm_train.config import InstructConfig

    cfg = InstructConfig.model_validate({"steps": 2, "batch_size": 2, "checkpoint_every": 2, "eval_every": 2,
                                         "eval_items": 2, "max_tokens": 32})
    out = tmp_path / "E"
    kwargs = dict(tasks=["sex"], shots=(), train_n=(2,), instruct_cfg=cfg, max_test=4, examples=0, device="cpu",
                  report=False, temperature=False)
    evaluate_tasks(model_dir, corpus, out, **kwargs)
    tuned = out / "fine_tuned" / "sex_train_n_2"
    first = json.loads((tuned / "fine_tune.json").read_text())
    assert first["model_digest"] == folder_digest(model_dir)
    other = tmp_path / "other_model"  # another model folder: same lineage, other content
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((other / "brain.json").read_text())
    (other / "brain.json").write_text(json.dumps(meta | {"note": "another model"}))
    with pytest.raises(InputError, match="holds a fine-tuning made from .*not of .*other_model") as err:
        evaluate_tasks(other, corpus, out, resume=True, **{**kwargs, "shots": (0,)})
    assert "\n" not in str(err.value)
    assert json.loads((out / "metrics.json").read_text())["sex"].keys() >= {"train_n_2"}  # refused before scoring
    assert "zero_shot" not in json.loads((out / "metrics.json").read_text())["sex"]
    evaluate_tasks(other, corpus, out, **kwargs)
    again = json.loads((tuned / "fine_tune.json").read_text())
    assert again["model_digest"] == folder_digest(other) != first["model_digest"]
    assert json.loads((tuned / "lineage.json").read_text())["parent"]["stage"] == "align"


def test_eval_refuses_the_corpus_rebuilt_with_another_seed_and_scores_an_external_cohort_as_such(corpus, model_dir,
                                                                                                tmp_path):
    import ray

    from corpus_builder.build import build_corpus
    from evaluation.task_eval import evaluate_tasks
    from fmrilm.config import load_config

    cfg = load_config(None, ["corpus.source.cleaning.length=32", f"corpus.source.atlas.n_rois={N_ROIS}",
                             "corpus.build.shard_size=8", "corpus.build.workers=2",
                             "corpus.splits.fractions=[0.5,0.1,0.4]"])
    build_corpus([str(corpus.parent / "src")], cfg.corpus, tmp_path / "reseeded", seed=1)  # same scans, new splits
    ray.shutdown()
    with pytest.raises(InputError, match="key -> split assignment .* is not the one the model was trained on") as err:
        evaluate_tasks(model_dir, tmp_path / "reseeded", tmp_path / "E1", tasks=["sex"], shots=(0,), device="cpu")
    assert "\n" not in str(err.value) and not (tmp_path / "E1").exists()  # refused before any scoring
    with pytest.raises(InputError, match="training subjects of stage 2"):  # the same people, called external
        evaluate_tasks(model_dir, tmp_path / "reseeded", tmp_path / "E1", tasks=["sex"], external=True, device="cpu")
    other = tiny_cohort(tmp_path / "other", subjects=8, fractions="[0.5,0.25,0.25]")  # a fresh secret: new people
    metrics = evaluate_tasks(model_dir, other, tmp_path / "E2", tasks=["sex"], shots=(0,), examples=0, report=False,
                             external=True, device="cpu")
    info = json.loads((tmp_path / "E2" / "eval.json").read_text())
    assert info["evaluation"] == "external" and info["lineage_check"]["external"]
    assert metrics["sex"]["n_test"] == len(read_manifest(other).query("status == 'ok'"))  # every scan is a test scan
    assert metrics["sex"]["fc_baseline"]["n"] == metrics["sex"]["n_test"]  # fitted on the model's own train split
