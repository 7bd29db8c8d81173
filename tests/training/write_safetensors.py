#!/usr/bin/env python3
"""Writes a safetensors file by hand with NumPy, independently of effattn: the parameters of a
Linear(d_in=3, d_out=4) with w[i][j] = 0.5*(4*i + j) - 1 (float32, shape [3, 4]) and
b[j] = 0.25*j + 2 (float32, shape [4], as PyTorch stores a bias). Usage: write_safetensors.py FILE"""
import json
import struct
import sys

import numpy as np

w = (0.5 * np.arange(12, dtype=np.float32) - 1).reshape(3, 4)
b = 0.25 * np.arange(4, dtype=np.float32) + 2
blobs = [("b", b), ("w", w)]  # not in effattn's visiting order, on purpose
header, offset = {}, 0
for name, array in blobs:
    data = array.astype("<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
header["__metadata__"] = {"writer": "numpy"}
text = json.dumps(header).encode()
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for _, array in blobs:
        f.write(array.astype("<f4").tobytes())
