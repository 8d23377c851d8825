"""Model families behind one registry (spec), with what they share (common); a family lives in its own module
(gpt) or package (bert/, transformer_xl/) and is imported only when a run asks for it."""

from pretrain.models.common import check_vocab_fits, padded_vocab_size
from pretrain.models.spec import BatchFn, Classification, ModelSpec, get, register

__all__ = ["BatchFn", "Classification", "ModelSpec", "check_vocab_fits", "get", "padded_vocab_size",
           "register"]
