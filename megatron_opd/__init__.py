"""megatron_opd: knowledge distillation (GKD, OPD-RL, OPSD) on Megatron-Core."""

__version__ = "0.1.0"

# Before any module of the package imports Megatron-Core: its import-time notices about
# missing GPU packages (Apex, Transformer Engine) are replaced by the one line
# initialize_runtime prints (megatron_opd/runtime/quiet.py).
from megatron_opd.runtime.quiet import silence_optional_package_notices as _silence  # noqa: E402

_silence()
