"""megatron_opd: knowledge distillation (GKD, OPD-RL, OPSD) on Megatron-Core."""

__version__ = "0.1.0"
