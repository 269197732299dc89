"""Data for the DLRM: real MovieLens-100k (shipped inside the ``recbole`` package) and synthetic
Criteo-like click logs.

Both give a :class:`ClickData`: dense features (N, 13 or 2) float32, one KeyedJagged-ready id list
per sparse feature, labels (N,) float32 in {0, 1}, and the table sizes.

MovieLens-100k: 100,000 ratings of 1,682 movies by 943 users; click = rating >= 4 (55% positive).
Sparse features: user, item, gender, occupation, zip prefix (3 digits), age bucket, release year,
genres (multi-valued: a jagged bag of 1-6 ids). Dense: age / 100 and release year scaled to [0, 1].
Split: a fixed random permutation (seed 0), 80% train / 20% test.

Synthetic Criteo: the 26 table sizes of the Criteo Kaggle (DAC) data set times ``scale``, ids drawn
Zipf(``alpha``) per feature (rank -> row through a fixed random permutation, as hashed ids land), 13
dense features from a log-normal. The label comes from a hidden logistic model over per-row effects
of the ids and the dense features, so a model can learn it and AUC means something. It is synthetic
and is reported as such.
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .jagged import KeyedJagged

__all__ = ["ClickData", "movielens_100k", "synthetic_criteo", "CRITEO_KAGGLE_ROWS", "zipf_ids", "find_movielens"]

# rows per categorical feature of the Criteo Kaggle display-advertising data set (C1..C26)
CRITEO_KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                      5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)


@dataclass
class ClickData:
    """A click data set: ``dense`` (N, Dd) float32, ``ids[f]`` (values, lengths) per sparse feature,
    ``labels`` (N,) float32, ``rows[f]`` table size per feature, and a name saying what it is."""

    name: str
    dense: torch.Tensor
    features: tuple[str, ...]
    values: dict  # feature -> (nnz,) int64
    lengths: dict  # feature -> (N,) int64
    labels: torch.Tensor
    rows: dict  # feature -> num_rows

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, idx: torch.Tensor) -> "ClickData":
        idx = idx.to(torch.int64)
        vals, lens = {}, {}
        for f in self.features:
            off = self._offsets(f)
            lens[f] = self.lengths[f][idx]
            starts = off[idx]
            pos = torch.repeat_interleave(starts - torch.cumsum(lens[f], 0) + lens[f], lens[f]) + torch.arange(int(lens[f].sum()))
            vals[f] = self.values[f][pos]
        return ClickData(self.name, self.dense[idx], self.features, vals, lens, self.labels[idx], self.rows)

    def batch(self, lo: int, hi: int) -> tuple[torch.Tensor, KeyedJagged, torch.Tensor]:
        """Samples [lo, hi) as (dense, KeyedJagged, labels)."""
        vals, lens = [], []
        for f in self.features:
            off = self._offsets(f)
            vals.append(self.values[f][int(off[lo]):int(off[hi])])
            lens.append(self.lengths[f][lo:hi])
        kj = KeyedJagged(self.features, torch.cat(vals), lengths=torch.cat(lens))
        return self.dense[lo:hi], kj, self.labels[lo:hi]

    def _offsets(self, f: str) -> torch.Tensor:
        cache = self.__dict__.setdefault("_off", {})
        if f not in cache:
            off = torch.zeros(self.lengths[f].numel() + 1, dtype=torch.int64)
            torch.cumsum(self.lengths[f], 0, out=off[1:])
            cache[f] = off
        return cache[f]


def zipf_ids(n: int, num_rows: int, alpha: float, gen: np.random.Generator, perm: np.ndarray | None = None) -> np.ndarray:
    """``n`` ids in [0, num_rows) with P(rank k) proportional to 1 / k^alpha (alpha > 0; alpha = 0 is
    uniform), ranks mapped to rows through ``perm`` (a random permutation when None)."""
    if alpha == 0:
        return gen.integers(0, num_rows, n, dtype=np.int64)
    cdf = np.cumsum(1.0 / np.arange(1, num_rows + 1, dtype=np.float64) ** alpha)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, gen.random(n)), num_rows - 1)
    if perm is None:
        perm = gen.permutation(num_rows)
    return perm[ranks].astype(np.int64)


def synthetic_criteo(num_samples: int = 200_000, *, scale: float = 1e-3, alpha: float = 1.15, seed: int = 0,
                     world_seed: int = 0, min_rows: int = 4) -> ClickData:
    """Synthetic Criteo-like clicks (see the module docstring). ``scale`` shrinks the 26 Kaggle table
    sizes (1e-3 keeps tables of 4 to 10,131 rows; 1.0 is the real 33.8M rows). ``world_seed`` fixes the
    hidden click model (row effects, id permutations), ``seed`` the samples drawn from it: a train and
    a test set share ``world_seed`` and differ in ``seed``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    world = np.random.default_rng(world_seed)
    gen = np.random.default_rng([world_seed, seed])
    feats = tuple(f"C{i + 1}" for i in range(26))
    rows = {f: max(min_rows, int(round(r * scale))) for f, r in zip(feats, CRITEO_KAGGLE_ROWS)}
    dense = gen.lognormal(0.0, 1.0, (num_samples, 13)).astype(np.float32)
    dense = np.log1p(dense)  # the usual log transform of Criteo's counts
    w_dense = world.normal(0, 0.5, 13)
    logit = (dense - np.log1p(np.exp(0.5))) @ w_dense
    values, lengths = {}, {}
    for f in feats:
        perm = world.permutation(rows[f])
        effect = world.normal(0, 0.6, rows[f])  # hidden per-row click propensity
        ids = zipf_ids(num_samples, rows[f], alpha, gen, perm)
        logit += effect[ids]
        values[f] = torch.from_numpy(ids)
        lengths[f] = torch.ones(num_samples, dtype=torch.int64)
    logit = logit * 0.5 - 1.0  # ~30% clicks
    labels = (gen.random(num_samples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return ClickData(f"synthetic Criteo-like (scale {scale:g}, Zipf {alpha:g}, world {world_seed}, seed {seed})", torch.from_numpy(dense),
                     feats, values, lengths, torch.from_numpy(labels), rows)


def find_movielens() -> Path:
    """The ml-100k folder inside the installed ``recbole`` package (``make data`` installs it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100k ships inside the 'recbole' package: run `make data` "
                                "(pip install --no-deps recbole==1.2.1)")
    root = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (root / "ml-100k.inter").is_file():
        raise FileNotFoundError(f"{root}/ml-100k.inter not found in the installed recbole")
    return root


def _read_atomic(path: Path) -> tuple[list[str], list[list[str]]]:
    # RecBole atomic files: tab-separated, a header of "name:type" columns
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            rd = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = [h.split(":")[0] for h in next(rd)]
            rows = [r for r in rd if r]
    except StopIteration:
        raise ValueError(f"{path} is empty") from None
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 2} has {len(rows[bad])} fields, the header {len(header)} (corrupted?)")
    return header, rows


def movielens_100k(root: str | Path | None = None) -> tuple[ClickData, ClickData]:
    """MovieLens-100k as click data: (train, test), see the module docstring."""
    root = Path(root) if root is not None else find_movielens()
    ih, inter = _read_atomic(root / "ml-100k.inter")
    uh, users = _read_atomic(root / "ml-100k.user")
    mh, items = _read_atomic(root / "ml-100k.item")
    if len(inter) < 1000:
        raise ValueError(f"{root / 'ml-100k.inter'} has only {len(inter)} ratings (truncated?)")
    col = {n: i for i, n in enumerate(ih)}
    ucol = {n: i for i, n in enumerate(uh)}
    mcol = {n: i for i, n in enumerate(mh)}

    def vocab(vals):
        v = {x: i for i, x in enumerate(sorted(set(vals)))}
        return v

    uid = vocab(r[col["user_id"]] for r in inter)
    iid = vocab(r[col["item_id"]] for r in inter)
    user = {r[ucol["user_id"]]: r for r in users}
    item = {r[mcol["item_id"]]: r for r in items}
    missing_u = [u for u in uid if u not in user]
    if missing_u:
        raise ValueError(f"{root}: {len(missing_u)} users of the ratings are missing from ml-100k.user (corrupted?)")
    gender = vocab(r[ucol["gender"]] for r in users)
    occ = vocab(r[ucol["occupation"]] for r in users)
    zips = vocab(r[ucol["zip_code"]][:3] for r in users)
    years = vocab(r[mcol["release_year"]] for r in items)
    genres = vocab(g for r in items for g in r[mcol["class"]].split())
    n = len(inter)
    ids = {k: np.empty(n, np.int64) for k in ("user", "item", "gender", "occupation", "zip3", "age", "year")}
    dense = np.zeros((n, 2), np.float32)
    labels = np.empty(n, np.float32)
    gvals, glens = [], np.empty(n, np.int64)
    for k, r in enumerate(inter):
        u, i = r[col["user_id"]], r[col["item_id"]]
        ur, ir = user[u], item.get(i)
        age = int(ur[ucol["age"]])
        ids["user"][k] = uid[u]
        ids["item"][k] = iid[i]
        ids["gender"][k] = gender[ur[ucol["gender"]]]
        ids["occupation"][k] = occ[ur[ucol["occupation"]]]
        ids["zip3"][k] = zips[ur[ucol["zip_code"]][:3]]
        ids["age"][k] = min(age // 10, 9)
        year = ir[mcol["release_year"]] if ir is not None else ""
        ids["year"][k] = years.get(year, 0)
        g = [genres[x] for x in (ir[mcol["class"]].split() if ir is not None else [])]
        gvals.extend(g)
        glens[k] = len(g)
        dense[k, 0] = age / 100.0
        dense[k, 1] = (float(year) - 1920.0) / 80.0 if year.isdigit() else 0.5
        labels[k] = 1.0 if float(r[col["rating"]]) >= 4 else 0.0
    rows = {"user": len(uid), "item": len(iid), "gender": len(gender), "occupation": len(occ), "zip3": len(zips),
            "age": 10, "year": max(1, len(years)), "genres": max(1, len(genres))}
    feats = ("user", "item", "gender", "occupation", "zip3", "age", "year", "genres")
    values = {k: torch.from_numpy(v) for k, v in ids.items()}
    values["genres"] = torch.tensor(gvals, dtype=torch.int64)
    lengths = {k: torch.ones(n, dtype=torch.int64) for k in ids}
    lengths["genres"] = torch.from_numpy(glens)
    data = ClickData("MovieLens-100k (click = rating >= 4)", torch.from_numpy(dense), feats, values, lengths,
                     torch.from_numpy(labels), rows)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    cut = int(0.8 * n)
    return data.subset(perm[:cut]), data.subset(perm[cut:])
