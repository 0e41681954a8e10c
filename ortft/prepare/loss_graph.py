"""torch modules whose forward returns the training loss, so the exported graph holds the loss.

Causal LM: the LM head and cross-entropy run only at positions whose (shifted) label is not -100,
which skips prompt and padding positions entirely (the 49k-vocabulary head is a large share of the
FLOPs). Sequence classification: cross-entropy over class logits, which are a second output.
Token classification: cross-entropy over every position whose label is not -100 (the first
sub-token of each word), with the per-token class logits as a second output.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _last_hidden_state(output):
    if isinstance(output, dict):
        return output["last_hidden_state"]
    return output[0]


class CausalLMLoss(torch.nn.Module):
    """loss = mean over counted positions t of -log p(labels[t+1] | tokens <= t)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, input_ids, attention_mask, position_ids, labels):
        base = self.peft_model.get_base_model()
        decoder = base.get_decoder()
        hidden = _last_hidden_state(
            decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        )
        hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        counted = torch.nonzero(targets != IGNORE_INDEX).reshape(-1)
        logits = base.get_output_embeddings()(hidden.index_select(0, counted))
        softcap = getattr(base.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits.float(), targets.index_select(0, counted))


class SequenceClassificationLoss(torch.nn.Module):
    """loss = mean cross-entropy of the class logits against integer labels; logits are returned too."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, input_ids, attention_mask, labels):
        output = self.peft_model(input_ids=input_ids, attention_mask=attention_mask)
        logits = output["logits"] if isinstance(output, dict) else output.logits
        return self.loss(logits, labels), logits

    @staticmethod
    def loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float(), labels)


class TokenClassificationLoss(SequenceClassificationLoss):
    """loss = mean cross-entropy of the per-token class logits over positions whose label is not -100
    (transformers' `*ForTokenClassification` loss); logits [batch, sequence, labels] are returned too."""

    @staticmethod
    def loss(logits, labels):
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX)


def wrapper_for(task: str, peft_model) -> torch.nn.Module:
    if task == "causal-lm":
        return CausalLMLoss(peft_model)
    if task == "token-cls":
        return TokenClassificationLoss(peft_model)
    return SequenceClassificationLoss(peft_model)


def input_names(task: str) -> list[str]:
    if task == "causal-lm":
        return ["input_ids", "attention_mask", "position_ids", "labels"]
    return ["input_ids", "attention_mask", "labels"]


def output_names(task: str) -> list[str]:
    return ["loss"] if task == "causal-lm" else ["loss", "logits"]


def example_inputs(task: str, vocab_size: int, batch: int = 2, seq: int = 16) -> tuple:
    """A batch that exercises padding and masking, used to trace the export."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[-1, seq - 3 :] = 0
    if task == "causal-lm":
        position_ids = torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(batch, seq).contiguous()
        labels = input_ids.clone()
        labels[:, :4] = IGNORE_INDEX
        labels[attention_mask == 0] = IGNORE_INDEX
        return input_ids, attention_mask, position_ids, labels
    if task == "token-cls":
        labels = torch.randint(0, 2, (batch, seq), generator=generator)
        labels[:, 0] = IGNORE_INDEX
        labels[attention_mask == 0] = IGNORE_INDEX
        return input_ids, attention_mask, labels
    labels = torch.randint(0, 2, (batch,), generator=generator)
    return input_ids, attention_mask, labels
