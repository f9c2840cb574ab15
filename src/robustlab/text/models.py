"""Text classifiers on token ids (batch × tokens, right-padded with `pad_id`): a TextCNN and a small
Transformer encoder. Both expose `get_input_embeddings()` for `EmbeddingAdversary`, as Hugging Face
models do, and give the same logits however much padding a batch carries (tested).

Word embeddings start with a per-token norm of about 1 (std 1/√dim), the scale of BERT's trained word
embeddings, so that the ε and step sizes of the BERT-era papers (FreeLB, the FGM/PGD recipe) mean
roughly the same perturbation here.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError, check_choice


def _embedding(vocab_size: int, dim: int, pad_id: int) -> nn.Embedding:
    embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
    nn.init.normal_(embed.weight, std=dim ** -0.5)
    with torch.no_grad():
        embed.weight[pad_id].zero_()
    return embed


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the columns that are padding in every row (batches padded to a whole set's length)."""
    real = (ids != pad_id).any(0).nonzero()
    return ids[:, :max(int(real.max()) + 1 if len(real) else 1, 1)]


class TextCNN(nn.Module):
    """Kim (EMNLP 2014): parallel 1-D convolutions of widths 3, 4, 5 with 100 filters each, ReLU,
    max-over-time pooling, dropout 0.5, linear classifier (the paper's "CNN-rand" settings; the
    embedding is 128-dimensional here, 300 in the paper).

    Every sequence gets width−1 zero vectors after its end, so each window that starts on a real token
    exists whatever the batch's padding, and windows starting on padding are left out of the max.
    """

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 128, widths=(3, 4, 5), channels: int = 100,
                 dropout: float = 0.5, pad_id: int = 0):
        super().__init__()
        self.pad_id, self.widths = pad_id, tuple(widths)
        self.embed = _embedding(vocab_size, dim, pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, w) for w in self.widths)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * len(self.widths), num_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = trim_padding(ids, self.pad_id)
        mask = (ids != self.pad_id).unsqueeze(1)                    # B×1×T
        x = self.embed(ids).transpose(1, 2)                          # B×D×T
        x = F.pad(x, (0, max(self.widths) - 1))
        t = ids.shape[1]
        pooled = [F.relu(conv(x))[..., :t].masked_fill(~mask, 0).amax(-1) for conv in self.convs]
        return self.fc(self.dropout(torch.cat(pooled, 1)))


class TransformerClassifier(nn.Module):
    """A small pre-norm Transformer encoder: word + learned position embeddings, LayerNorm, dropout,
    `layers` encoder layers (GELU, padding positions masked out of attention), mean over the real
    tokens, LayerNorm, linear. Defaults (dim 64, 4 heads, 2 layers, feed-forward 256, dropout 0.1) are
    sized for a CPU; BERT's layout at a small scale.
    """

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64, heads: int = 4, layers: int = 2,
                 ff: int = 256, dropout: float = 0.1, max_len: int = 512, pad_id: int = 0):
        super().__init__()
        if dim % heads:
            raise RobustlabError(f"transformer dim must be a multiple of heads, got dim={dim}, heads={heads}")
        self.pad_id, self.max_len = pad_id, max_len
        self.embed = _embedding(vocab_size, dim, pad_id)
        self.position = nn.Parameter(torch.randn(max_len, dim) * dim ** -0.5)
        self.norm_in = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # No nested tensors: the same code path in training, evaluation and attacks.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = trim_padding(ids, self.pad_id)
        if ids.shape[1] > self.max_len:
            raise RobustlabError(f"sequence of {ids.shape[1]} tokens is longer than the model's max_len {self.max_len}")
        mask = ids != self.pad_id
        x = self.embed(ids) + self.position[:ids.shape[1]]
        x = self.encoder(self.dropout(self.norm_in(x)), src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm_out(x) * m).sum(1) / m.sum(1).clamp_min(1)
        return self.fc(pooled)


TEXT_MODELS = {"textcnn": TextCNN, "transformer": TransformerClassifier}


def build_text_model(name: str, vocab_size: int, num_classes: int, **kwargs) -> nn.Module:
    check_choice("text model", name, TEXT_MODELS)
    cls = TEXT_MODELS[name]
    options = [p for p in inspect.signature(cls).parameters if p not in ("vocab_size", "num_classes")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise RobustlabError(f"text model {name} takes no option {', '.join(unknown)}; its options: {', '.join(options)}")
    return cls(vocab_size, num_classes, **kwargs)
