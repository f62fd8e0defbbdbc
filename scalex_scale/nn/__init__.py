"""Torch modules of scalex-scale: the DSBN layer and the SCALEX VAE (no files, no AnnData)."""

from __future__ import annotations

from scalex_scale.nn.dsbn import DSBN, convert_sync_dsbn
from scalex_scale.nn.sync_dsbn import sync_dsbn
from scalex_scale.nn.vae import LossOutput, SCALEXModule

__all__ = ["DSBN", "LossOutput", "SCALEXModule", "convert_sync_dsbn", "sync_dsbn"]
