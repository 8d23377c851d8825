"""The classifier: a pretrained backbone with a linear head; encoding, accuracy, saving and loading it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from data_pipeline.errors import DataError
from pretrain import models
from pretrain.errors import ConfigError

logger = logging.getLogger(__name__)


class SequenceClassifier(torch.nn.Module):
    """A pretrained backbone (its family's ``classification`` features) with a classification layer."""

    def __init__(self, backbone: torch.nn.Module, family: str, hidden_size: int, num_classes: int,
                 dropout: float):
        super().__init__()
        self.classification = models.get(family).classification
        if self.classification is None:
            raise ConfigError(f"model.family={family}: this family is not fine-tuned for classification")
        self.backbone, self.family = backbone, family
        # The LM / MLM head is unused here: without post_process the model returns the final hidden states.
        backbone.post_process = False
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(hidden_size, num_classes)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] right-padded, lengths [b] real tokens per row -> class logits [b, C]."""
        pooled = self.classification.features(self.backbone, input_ids, lengths)  # [b, h]
        return self.head(self.dropout(pooled.float()))  # [b, C]


def encode(texts: list[str], tokenizer, family: str, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` with the family's framing (its ModelSpec's
    ``classification.frame``)."""
    frame = models.get(family).classification.frame
    return [frame(tokenizer, tokenizer.encode(t), max_length) for t in texts]


def pad_batch(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # [b, s], right-padded
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids.to(device), lengths.to(device)


@torch.no_grad()
def accuracy(model: SequenceClassifier, rows: list[list[int]], targets: list[int], pad_id: int,
             device: torch.device, batch_size: int = 32) -> float:
    """Share of ``rows`` whose argmax class equals the target (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        ids, lengths = pad_batch(rows[start:start + batch_size], pad_id, device)
        predicted = model(ids, lengths).argmax(-1).cpu()
        correct += int((predicted == torch.tensor(targets[start:start + batch_size])).sum())
    model.train(was_training)
    return correct / len(rows)


def save(model: SequenceClassifier, record: dict, tokenizer, output: Path) -> None:
    """classifier.pt (state dict: ``backbone.*`` = the whole fine-tuned model, ``head.*``), finetune.json (labels
    in class-id order, accuracy, options) and the tokenizer, written last so finetune.json marks completion."""
    output.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
               output / "classifier.pt")
    target = output / "tokenizer.model"
    if not (target.exists() and target.samefile(tokenizer.model_path)):  # --output may be the pretraining run
        shutil.copyfile(tokenizer.model_path, target)
    (output / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"finetune: saved {output / 'classifier.pt'} and {output / 'finetune.json'} (valid accuracy "
          f"{record['valid_accuracy']:.4f})", flush=True)


def load_classifier(output: str | Path) -> tuple[SequenceClassifier, dict]:
    """A fine-tuned classifier from its output directory (builds the architecture from the pretrained
    checkpoint named in finetune.json, then loads the fine-tuned weights), in eval mode; and its record."""
    from pretrain.inference.loading import load_model

    output = Path(output)
    try:
        record = json.loads((output / "finetune.json").read_text())
    except OSError as e:
        raise DataError(f"{output}: no finetune.json ({e.strerror})") from None
    loaded = load_model(record["checkpoint"])
    model = SequenceClassifier(loaded.model.float(), record["family"], loaded.cfg.model.hidden_size,
                               record["num_labels"], record["dropout"]).to(loaded.device)
    state = torch.load(output / "classifier.pt", map_location=loaded.device)
    missing, unexpected = model.load_state_dict(state, strict=False)  # megatron's _extra_state is optional
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        example = (missing + unexpected)[0]
        raise DataError(f"{output / 'classifier.pt'}: does not fit the checkpoint's model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {example})")
    return model.eval(), record
