"""Integrations with training frameworks. Each submodule imports its framework; this package
imports none of them (``import kdkernels.integrations.torchdistill`` registers the losses)."""
