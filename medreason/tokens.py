"""The tokenized form of a split, as prepare writes it and train reads it.

One safetensors file per split holds every record's token ids back to back (int32), the
offsets where each record starts, and how many leading tokens of each record are prompt (their
labels are -100 unless the run trains on the prompt). Record uids ride in the metadata.
32,682 records of ~550 tokens are ~72 MB of int32: loading is a single read, no tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load_file, save_file

IGNORE_INDEX = -100


@dataclass
class TokenizedSplit:
    input_ids: np.ndarray  # int32, all records concatenated (each ends with EOS)
    offsets: np.ndarray  # int64, len n+1; record i is input_ids[offsets[i]:offsets[i+1]]
    prompt_lens: np.ndarray  # int32, len n; labels of the first prompt_lens[i] tokens are ignored
    uids: list[str]  # "<dataset_name>:<id_in_dataset>", len n

    def __post_init__(self) -> None:
        n = len(self.uids)
        if len(self.offsets) != n + 1 or len(self.prompt_lens) != n:
            raise ValueError(f"inconsistent tokenized split: {n} uids, {len(self.offsets)} offsets, "
                             f"{len(self.prompt_lens)} prompt lengths")

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i] : self.offsets[i + 1]]

    def labels(self, i: int) -> np.ndarray:
        labels = self.ids(i).astype(np.int64)
        labels[: self.prompt_lens[i]] = IGNORE_INDEX
        return labels

    @classmethod
    def from_records(cls, records: list[tuple[str, list[int], int]]) -> TokenizedSplit:
        """From (uid, token ids, prompt length) triples."""
        lengths = np.array([len(ids) for _, ids, _ in records], dtype=np.int64)
        offsets = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for _, ids, _ in records for t in ids), dtype=np.int32, count=int(offsets[-1]))
        return cls(
            input_ids=flat,
            offsets=offsets,
            prompt_lens=np.array([p for _, _, p in records], dtype=np.int32),
            uids=[u for u, _, _ in records],
        )


def save_split(split: TokenizedSplit, path: str) -> None:
    save_file(
        {"input_ids": split.input_ids, "offsets": split.offsets, "prompt_lens": split.prompt_lens},
        path,
        metadata={"uids": json.dumps(split.uids), "format": "medreason-tokens-v1"},
    )


def load_split(path: str) -> TokenizedSplit:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != "medreason-tokens-v1":
        raise ValueError(f"{path}: not a medreason tokenized split (format {meta.get('format')!r})")
    arrays = load_file(path)
    return TokenizedSplit(
        input_ids=arrays["input_ids"],
        offsets=arrays["offsets"],
        prompt_lens=arrays["prompt_lens"],
        uids=json.loads(meta["uids"]),
    )
