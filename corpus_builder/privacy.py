"""Keyed pseudonyms for subject identifiers.

UKB and ABCD ids must never reach shards, captions, logs or MLflow. A pseudonym is BLAKE2b keyed with a
secret the lab keeps (`FMRILM_PSEUDONYM_KEY`, or a file named by `FMRILM_PSEUDONYM_KEY_FILE`): stable
across builds with the same secret, not reversible or linkable without it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from fmrilm_core.errors import InputError

KEY_ENV = "FMRILM_PSEUDONYM_KEY"
KEY_FILE_ENV = "FMRILM_PSEUDONYM_KEY_FILE"


class Pseudonymizer:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise InputError("pseudonym secret must be at least 16 bytes")
        self._secret = hashlib.blake2b(secret, digest_size=32).digest()

    def __call__(self, dataset: str, subject: str) -> str:
        msg = f"{dataset}\x00{subject}".encode()
        return hashlib.blake2b(msg, key=self._secret, digest_size=6).hexdigest()

    def scheme_fingerprint(self) -> str:
        """Names the secret without revealing it: two corpora with the same fingerprint give a subject the same
        pseudonym, so their keys can be compared (a model's training subjects against a corpus's test subjects).
        A keyed hash of a fixed message; neither the secret nor any pseudonym can be derived from it."""
        return hashlib.blake2b(b"fmrilm pseudonym scheme", key=self._secret, digest_size=8).hexdigest()

    @classmethod
    def from_env(cls) -> Pseudonymizer | None:
        """The lab's secret from the environment, or None when none is set."""
        if os.environ.get(KEY_ENV):
            return cls(os.environ[KEY_ENV].encode())
        if os.environ.get(KEY_FILE_ENV):
            path = Path(os.environ[KEY_FILE_ENV])
            if not path.is_file():
                raise InputError(f"{path}: pseudonym key file ({KEY_FILE_ENV}) not found")
            return cls(path.read_bytes().strip())
        return None

    @classmethod
    def for_synthetic(cls, root: Path) -> Pseudonymizer:
        """Synthetic cohorts keep a generated secret next to the data (created on first use)."""
        path = Path(root) / ".pseudonym_key"
        if not path.exists():
            path.write_text(secrets.token_hex(32))
        return cls(path.read_bytes().strip())
