"""Run the compiled AQLM layer kernels of an artifact folder with the TVM runtime and numpy (no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import artifact
from ..kernel_abi import gemm_symbol, gemv_symbol
from ..errors import ConfigError, FormatError


class KernelLibrary:
    def __init__(self, artifact_dir: str | Path):
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        import tvm
        from safetensors.numpy import load_file

        self.dir = Path(artifact_dir)
        self.manifest = artifact.verify(self.dir)
        self.tvm = tvm
        self.dev = tvm.cpu()
        self.library = artifact.member(self.dir, self.manifest, self.manifest.get("kernel_library"), "kernel_library")
        where = self.dir / artifact.MANIFEST
        for name, info in artifact.expect(self.manifest, "layers", dict, where).items():
            for key in ("out_features", "in_features"):
                artifact.expect(info, key, int, where, low=1, high=1 << 20, field=f"layers.{name}.{key}")
            if "config" in info:
                artifact.expect(info, "config", str, where, field=f"layers.{name}.config")
        artifact.expect(self.manifest, "kernels", dict, where)
        self.module = tvm.runtime.load_module(str(self.library))
        weights = artifact.member(self.dir, self.manifest, "weights/model.safetensors", "files")
        try:
            self.weights = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise FormatError(f"{weights}: not a readable safetensors file ({str(exc)[:200]})") from None
        self._cache: dict[str, list] = {}

    def layer_args(self, layer: str):
        if layer not in self._cache:
            if layer not in self.manifest["layers"]:
                raise ConfigError(f"layer {layer!r}: not in {self.dir / artifact.MANIFEST}")
            w = self.weights
            codes = w[f"{layer}.codes"]
            cb = w[f"{layer}.codebooks"]
            cb = cb.reshape(cb.shape[0], cb.shape[1], -1).astype(np.float16)
            scales = w[f"{layer}.scales"].reshape(-1).astype(np.float32)
            bias = w.get(f"{layer}.bias", np.zeros_like(scales)).astype(np.float32)
            self._cache[layer] = [self.tvm.runtime.tensor(np.ascontiguousarray(a), self.dev)
                                  for a in (codes, cb, scales, bias)]
        return self._cache[layer]

    def linear(self, layer: str, x: np.ndarray) -> np.ndarray:
        """y = x @ Ŵᵀ + b for x [N, in] float32: the GEMV kernel for its N when built, else the GEMM (any N)."""
        info = self.manifest["layers"].get(layer)
        if info is None:
            raise ConfigError(f"layer {layer!r}: not in {self.dir / artifact.MANIFEST}")
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != info["in_features"]:
            raise ConfigError(f"{layer}: expected float32 [N, {info['in_features']}], found {x.dtype} {list(x.shape)}")
        if x.shape[0] < 1:
            raise ConfigError(f"{layer}: expected at least one row in x, found {list(x.shape)}")
        own = info.get("config")  # a layer whose config is not the artifact's has its own kernels
        symbol = gemv_symbol(info["out_features"], info["in_features"], x.shape[0], config_name=own)
        if symbol not in self.manifest["kernels"]:
            symbol = gemm_symbol(info["out_features"], info["in_features"], config_name=own)
        if symbol not in self.manifest["kernels"]:
            raise ConfigError(f"{layer}: no kernel for batch {x.shape[0]} in this artifact")
        try:
            fn = self.module[symbol]
        except Exception as exc:  # the library does not match its manifest
            raise FormatError(f"{self.library}: no function {symbol} ({exc})") from None
        y = self.tvm.runtime.empty((x.shape[0], info["out_features"]), "float32", self.dev)
        fn(self.tvm.runtime.tensor(np.ascontiguousarray(x), self.dev), *self.layer_args(layer), y)
        return y.numpy()
