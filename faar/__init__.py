"""FAAR: multi-task dense prediction with DoRA adapters, PDRS rank shrinking and TS-PD."""

from .config import Config, load_config
from .model import FAARModel, build_model, merge_model, parameter_summary

__all__ = ["Config", "FAARModel", "build_model", "load_config", "merge_model", "parameter_summary"]
__version__ = "0.1.0"
