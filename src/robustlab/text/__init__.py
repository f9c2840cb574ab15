"""Adversarial training for text classifiers in embedding space (FGM, PGD-K, FreeAT, FreeLB); see docs/text.md."""
from robustlab.text.adversary import EmbeddingAdversary, adversary_options, embedding_pgd, input_embeddings
from robustlab.text.data import (TEXT_DATASETS, TextInfo, TextSet, TextSplits, Vocab, hf_encode, load_text_dataset,
                                 read_agnews, read_folders, read_sst2, tokenize)
from robustlab.text.models import TEXT_MODELS, TextCNN, TransformerClassifier, build_text_model

__all__ = ["EmbeddingAdversary", "TEXT_DATASETS", "TEXT_MODELS", "TextCNN", "TextInfo", "TextSet", "TextSplits",
           "TransformerClassifier", "Vocab", "adversary_options", "build_text_model", "embedding_pgd", "hf_encode",
           "input_embeddings", "load_text_dataset", "read_agnews", "read_folders", "read_sst2", "tokenize"]
