"""sami_fast: fused Triton kernels and a shared-prefix trainer for SAMI."""

from sami_fast import reference
from sami_fast.backend import requested_backend
from sami_fast.batch_logprobs import get_batch_logprobs
from sami_fast.loss import sami_loss
from sami_fast.prefix import logprob_matrix, sami_backward
from sami_fast.sequence_logprobs import sequence_logprobs
from sami_fast.trainer import MasterWeights, SAMITrainer, encode_sami_batch
from sami_fast.training import TrainConfig, Trainer

__all__ = [
    "reference", "requested_backend", "sami_loss", "sequence_logprobs", "logprob_matrix", "sami_backward",
    "get_batch_logprobs", "SAMITrainer", "MasterWeights", "encode_sami_batch", "TrainConfig", "Trainer",
]
# The one version source: setup.py reads it from here.
__version__ = "0.1.0"
