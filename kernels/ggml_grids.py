"""The grid codebooks of GGML's i-quants: ggml-common.h's iq2xxs_grid, iq2xs_grid, iq2s_grid, iq3xxs_grid
and iq3s_grid, each row the magnitudes of 8 (IQ2) or 4 (IQ3) weights before the signs.

Data, not code: ggml_grids.txt beside this file holds them (generated once from gguf-py 0.19.0, which
transcribes ggml-common.h, so that minqwen needs no gguf at run time; tests/test_kernels_iquants.py checks
them against gguf-py), one grid a line: name, weights per row, magnitudes, one digit per weight.
"""
from pathlib import Path

import numpy as np


def read_grids(path: Path) -> dict[str, np.ndarray]:
    """name -> grid [rows, width] uint8, grid[r, j] = magnitudes[digit width r + j]"""
    grids = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, width, magnitudes, digits = line.split()
            index = np.frombuffer(digits.encode(), np.uint8) - ord("0")
            grids[name] = np.array(magnitudes.split(","), np.uint8)[index].reshape(-1, int(width))
    return grids


GRIDS = read_grids(Path(__file__).with_name("ggml_grids.txt"))
IQ2_XXS_GRID, IQ2_XS_GRID, IQ2_S_GRID = GRIDS["IQ2_XXS"], GRIDS["IQ2_XS"], GRIDS["IQ2_S"]  # [256|512|1024, 8]
IQ3_XXS_GRID, IQ3_S_GRID = GRIDS["IQ3_XXS"], GRIDS["IQ3_S"]  # [256|512, 4]
