"""The forge compiler: forge-alloy recipes and Hydra configs compiled into a doit graph that builds native-vision Qwen3.5 GGUF releases."""

__version__ = "0.1.0"
