"""Privacy: keyed pseudonyms for patients and volumes, patient-level split assignment and near-duplicate grouping.

Identifiers never leave a reader in clear text: every patient, study, series or file key is replaced by
``"p-" + 16 hex`` = HMAC-SHA256(secret key, value). The key lives in a file outside the dataset (created with mode 0600
when missing), so the same key gives the same pseudonyms across ingests and nobody without it can reverse or re-derive
them from a guessed identifier.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


DEFAULT_KEY_FILE = "~/.config/medgan/pseudonym.key"  # outside any repository a `git add -A` would take


def load_key(key_file: str | os.PathLike, *, dataset: str | os.PathLike | None = None) -> bytes:
    """Read the pseudonymisation key, creating a random 32-byte key (mode 0600) when the file is missing.

    A folder created for the key is made 0700 whatever the umask. An existing key that others than its owner may read
    gets a warning.

    Args:
        key_file: where the key lives (e.g. `DEFAULT_KEY_FILE`).
        dataset: the dataset folder being written; the key must not live inside it or any folder ingest deletes
            (``<dataset>.partial``, ``<dataset>.parts``, ``<dataset>.old``).

    Returns:
        The key bytes.

    Raises:
        ValueError: the key file lies inside a folder ingest writes or deletes, or is shorter than 16 bytes.
    """
    key_file = Path(key_file).expanduser()
    if dataset is not None:
        ds = Path(dataset).expanduser().resolve()
        kf = key_file.resolve()
        for d in (ds, *(ds.with_name(ds.name + suffix) for suffix in (".partial", ".parts", ".old"))):
            if kf == d or d in kf.parents:
                raise ValueError(
                    f"key file {key_file} lies inside {d.name}, a folder ingest writes and may delete; keep the "
                    f"pseudonymisation key outside anything you share (e.g. --key-file {DEFAULT_KEY_FILE})"
                )
    if not key_file.exists():
        missing = [p for p in [key_file.parent, *key_file.parent.parents] if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)  # mkdir's mode is cut by the umask
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    elif key_file.stat().st_mode & 0o077:
        warnings.warn(
            f"key file {key_file} can be read by other users (mode {key_file.stat().st_mode & 0o777:o}); "
            f"restrict it with: chmod 600 {key_file}",
            stacklevel=2,
        )
    key = key_file.read_bytes()
    if len(key) < 16:
        raise ValueError(
            f"key file {key_file} holds {len(key)} bytes; a key needs >= 16 (delete it to create a new one)"
        )
    return key


def key_id(key: bytes) -> str:
    """A short public fingerprint of the key (which key made these pseudonyms), not the key itself."""
    return hashlib.sha256(b"medgan-key-id:" + key).hexdigest()[:12]


class Pseudonymizer:
    """Keyed pseudonyms: ``"p-" + 16 hex`` of HMAC-SHA256(key, value).

    Example:
        >>> pseudonym = Pseudonymizer(b"0" * 32)
        >>> pseudonym("patient:crlab")  # 'p-' + 16 hex, the same for the same key and value
    """

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)

    def __call__(self, value: str) -> str:
        return "p-" + hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def __reduce__(self):  # picklable for worker processes (the key travels in memory only)
        return (Pseudonymizer, (self._key,))


# Path components and reason texts: what looks like a UID or a long number, or matches a header's identifier.
_UID_IN_PATH = re.compile(r"\d+(?:\.\d+){2,}|\d{6,}")
_UID_IN_TEXT = re.compile(r"\d+(?:\.\d+){3,}")


class Redactor:
    """Replaces identifiers in paths and messages by keyed pseudonyms, so a report line still tells a user which
    file it means (the same text gives the same pseudonym under the same key) without showing who it is.

    Replaced: any run of words (split at ``_ - . / space``) that equals a known identifier, case-insensitively
    (PatientID, PatientName and its parts, UIDs, AccessionNumber of the files read, the manifest's patient ids;
    identifiers shorter than 3 characters are not matched); in paths, any run of digits and dots shaped like a UID
    (three or more numbers) or of six or more digits; in messages, UIDs (four or more numbers). Identifiers are held
    as keyed hashes (`id_hash`), so they can travel through part files without being written in clear.

    Example:
        >>> Redactor(Pseudonymizer(key), {"crlab"}).path("crlab/0001_1.3.12.2.1107.5.2.dcm")
        'p-…/0001_p-….dcm'
    """

    _MAX_WORDS = 8  # the longest identifier matched, in words

    def __init__(
        self, pseudonym: Callable[[str], str], identifiers: Iterable[str] = (), hashed: Iterable[str] = ()
    ) -> None:
        self._pseudonym = pseudonym
        self.hashed = {self.id_hash(i) for i in identifiers if len(i.strip()) >= 3} | set(hashed)

    def id_hash(self, value: str) -> str:
        """The keyed hash an identifier is known by."""
        return self._pseudonym("id:" + value.strip().lower())

    def _spans(self, text: str, shaped: re.Pattern) -> list[tuple[int, int]]:
        spans = [m.span() for m in shaped.finditer(text)]
        if self.hashed:
            words = list(re.finditer(r"[^\W_]+|\^", text))
            i = 0
            while i < len(words):
                for j in range(min(len(words), i + self._MAX_WORDS) - 1, i - 1, -1):
                    a, b = words[i].start(), words[j].end()
                    if b - a >= 3 and self.id_hash(text[a:b]) in self.hashed:
                        spans.append((a, b))
                        i = j
                        break
                i += 1
        merged: list[tuple[int, int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged

    def _sub(self, text: str, shaped: re.Pattern) -> str:
        out, last = [], 0
        for a, b in self._spans(text, shaped):
            out += [text[last:a], self._pseudonym("path:" + text[a:b].lower())]
            last = b
        return "".join([*out, text[last:]])

    def path(self, rel: str) -> str:
        """A relative path with identifying components replaced."""
        return self._sub(rel, _UID_IN_PATH)

    def text(self, message: str) -> str:
        """A message with identifiers replaced."""
        return self._sub(message, _UID_IN_TEXT)


def _unit_hash(value: str, seed: int) -> float:
    """A stable number in [0, 1) from a (pseudonymous) key and the seed."""
    d = hashlib.sha256(f"medgan-split:{seed}:{value}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2.0**64


def assign_splits(
    patient_classes: Mapping[str, str],
    fractions: Sequence[float],
    seed: int = 0,
    fixed: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign every patient to train/val/test, stratified by class.

    The rule: patients are grouped by their main class (the class of most of their slices). Within each class the
    patients are ordered by a stable hash of (seed, pseudonymous patient key); the patient at rank ``i`` of ``n`` goes
    to the split whose cumulative fraction interval contains ``(i + 0.5) / n``. So each class is split in the configured
    proportions as far as its patient count allows (a class with one patient lands in train), the assignment depends
    only on the keys, seed and fractions, and a patient is never in two splits. Patients in `fixed` (a split from the
    manifest) keep it.

    Args:
        patient_classes: patient key -> main class name.
        fractions: train/val/test fractions (normalised to sum 1).
        seed: hashing salt (``ingest.seed``).
        fixed: patient key -> split given by the manifest.

    Returns:
        patient key -> split name.

    Raises:
        ValueError: fractions are not three non-negative numbers with a positive sum.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"ingest.split_fractions must be 3 non-negative numbers (train, val, test), got {fractions}")
    edges = np.cumsum(f / f.sum())
    fixed = dict(fixed or {})
    out = dict(fixed)
    strata: dict[str, list[str]] = defaultdict(list)
    for p, c in patient_classes.items():
        if p not in fixed:
            strata[c].append(p)
    for members in strata.values():
        members.sort(key=lambda p: (_unit_hash(p, seed), p))
        n = len(members)
        for i, p in enumerate(members):
            k = int(np.searchsorted(edges, (i + 0.5) / n, side="right"))
            out[p] = SPLITS[min(k, 2)]
    return out


# Near-duplicate grouping for 2-D sets without patients.

HASH_SIDE = 16  # 16x16 low-frequency DCT coefficients: 256 bits


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """256-bit DCT perceptual hash (pHash) of a 2-D image.

    The image is area-downsampled to 64x64, transformed with a 2-D DCT, and each of the 16x16 lowest-frequency
    coefficients (the DC term replaced by the next one) becomes a bit: above the block's median or not. Unlike a mean
    hash, which mostly encodes the head's silhouette, this separates different slices of similar shape while leaving
    re-encoded or rescaled copies within a few bits.

    Returns:
        uint64 [4] (the bits, packed).
    """
    from scipy.fft import dctn

    x = np.asarray(image, dtype=np.float32)
    side = 4 * HASH_SIDE
    h, w = x.shape
    if h >= side and w >= side and h % side == 0 and w % side == 0:
        x = x.reshape(side, h // side, side, w // side).mean(axis=(1, 3))
    else:
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
        x = F.interpolate(t, size=(side, side), mode="bilinear", antialias=True).numpy()[0, 0]
    coef = dctn(x.astype(np.float64), norm="ortho")[:HASH_SIDE, :HASH_SIDE].copy()
    coef[0, 0] = coef[0, 1]
    bits = (coef > np.median(coef)).ravel()
    return np.packbits(bits).view(">u8").astype(np.uint64)


def group_near_duplicates(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group images whose hashes differ in at most `max_distance` bits (transitively), by union-find.

    Candidate pairs come from hash buckets: by the pigeonhole rule, two 256-bit hashes within distance d agree exactly
    on at least one of d + 1 interleaved bit subsets, so only images sharing a bucket are compared.

    Args:
        hashes: uint64 [N, 4] from `perceptual_hash`.
        max_distance: the largest Hamming distance that still counts as a duplicate.

    Returns:
        int64 [N]: the group id of each image = the smallest index in its group.
    """
    n = len(hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(n, -1)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bits = np.unpackbits(hashes.astype(">u8").view(np.uint8), axis=1)  # [N, 256]
    nsub = max(1, int(max_distance) + 1)
    for k in range(nsub):
        sub = np.packbits(bits[:, k::nsub], axis=1)
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, row in enumerate(sub):
            buckets[row.tobytes()].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            m = np.asarray(members)
            hm = hashes[m]
            for a in range(len(m) - 1):
                dist = np.bitwise_count(hm[a + 1 :] ^ hm[a]).sum(axis=1)
                for b in m[a + 1 :][dist <= max_distance]:
                    ra, rb = find(int(m[a])), find(int(b))
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)
