"""How much of each science property can a plain regressor learn from ``n`` molecules? The yardstick for the experts' R².

The suite's quantum and chemistry experts answer numeric questions (GFN2-xTB gap, HOMO, LUMO, dipole; measured
hydration free energy and logS) and score R² ≤ 0 on them (BENCHMARKS, "R² of the forward numeric answers").
Is that the data or the model? This fits ridge regression (``RidgeCV``, alphas 1e-1..1e5) on

    x(m) = standardise([log1p(Morgan radius-2 counts, 2048 bits) ; RDKit's descriptor list])

for ``n`` training molecules and reports R² on a fixed 300 held-out molecules (the same for every ``n``)

    R² = 1 − Σ (y − ŷ)² / Σ (y − ȳ)²        (ȳ: the held-out references' mean, as ``xlora.analysis.eval_numeric``)

per property, from the shipped rows (``xlora/demo/assets/science/molecules.jsonl.gz``). ``--states FILE.npy`` adds the
same ridge on any per-molecule feature matrix in row order (e.g. a language model's mean-pooled states).

    .venv/bin/python benchmarks/property_ceiling.py --n 150 600 2000
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

ROWS = Path(__file__).resolve().parents[1] / "src" / "xlora" / "demo" / "assets" / "science" / "molecules.jsonl.gz"
PROPS = {"gap": "gap_ev", "homo": "homo_ev", "lumo": "lumo_ev", "dipole": "dipole_debye",
         "hydration": "dG_hyd_kcal_mol", "logS": "logS"}
N_TEST = 300


def fingerprints(smiles: list[str]) -> np.ndarray:
    """``[n, 2048 + n_descriptors]``: log1p Morgan counts and RDKit's descriptors (non-finite set to 0, clipped)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem, Descriptors

    gen = AllChem.GetMorganGenerator(radius=2, fpSize=2048)
    out = []
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        desc = np.nan_to_num(np.array([f(mol) for _, f in Descriptors.descList], dtype=float), posinf=0, neginf=0)
        out.append(np.concatenate([np.log1p(gen.GetCountFingerprintAsNumPy(mol).astype(float)), desc.clip(-1e6, 1e6)]))
    return np.stack(out)


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def ceiling(rows: list[dict], features: dict[str, np.ndarray], sizes: list[int], seed: int = 0) -> list[str]:
    """One line per property: its held-out SD and the R² of each feature set at each training size."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    lines = []
    for name, key in PROPS.items():
        idx = np.array([i for i, r in enumerate(rows) if r.get(key) is not None])
        np.random.default_rng(seed).shuffle(idx)
        y = np.array([rows[i][key] for i in idx], dtype=float)
        test, y_test = idx[:N_TEST], y[:N_TEST]
        cells = [f"{name:9s} rows {len(idx):5d}  held-out SD {y_test.std():5.2f}"]
        for n in sizes:
            if N_TEST + n > len(idx):
                continue
            train, y_train = idx[N_TEST:N_TEST + n], y[N_TEST:N_TEST + n]
            for label, x in features.items():
                fit = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(x[train], y_train)
                cells.append(f"{label}@{n} {r2_score(y_test, fit.predict(x[test])):5.2f}")
        lines.append("  ".join(cells))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[150, 600, 2000], help="training molecules per fit")
    p.add_argument("--rows", default=str(ROWS))
    p.add_argument("--states", help="an [n_rows, d] .npy of other features, in the rows' order")
    a = p.parse_args()
    with gzip.open(a.rows, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    features = {"fp": standardised(fingerprints([r["smiles"] for r in rows]))}
    if a.states:
        states = np.load(a.states)
        if states.ndim != 2 or len(states) != len(rows):
            raise SystemExit(f"--states {a.states}: shape {states.shape}, expected [{len(rows)}, d] (one row per "
                             f"molecule of {a.rows}, in its order)")
        features["states"] = standardised(states)
    print(f"{len(rows)} molecules; R² on {N_TEST} held-out ones, ridge on fingerprints+descriptors")
    print("\n".join(ceiling(rows, features, a.n)))


if __name__ == "__main__":
    main()
