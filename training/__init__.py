"""M-IDoL pretraining: multi-crop self-distillation with a mixture-of-experts head.

Runs the same code from a laptop CPU to many GPUs (``torchrun``). Imports ``midol_hub``;
``midol_hub`` never imports this package.
"""
