"""The shipped corpus and its tokenizer: everything here runs offline and without torch."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SEPARATOR = "<|endoftext|>"
# Enough merges to give real subwords on ~40 KB of English; more would only add ids that occur once.
MAX_BPE_IDS = 8192


@dataclass(frozen=True)
class TokenizedCorpus:
    ids: array  # array('i'): every document, separated by SEPARATOR's id
    tokenizer_ids: int  # how many ids the tokenizer uses (0 .. tokenizer_ids-1)
    n_bytes: int
    n_documents: int
    description: str


def corpus_files() -> list[Path]:
    files = sorted(DATA_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus files (*.txt) in {DATA_DIR}: the package was installed without its data")
    return files


def tokenize_corpus(vocab: int) -> TokenizedCorpus:
    """Train a byte-level BPE on the corpus (a second or two) and encode it; ids live in [0, min(vocab, 8192))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [path.read_text(encoding="utf-8") for path in corpus_files()]
    # 256 byte symbols + the separator is the smallest alphabet a byte-level BPE can have.
    if vocab < 257:
        raise ValueError(f"--vocab must be at least 257 for a byte-level tokenizer, got {vocab}")
    target = min(vocab, MAX_BPE_IDS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        special_tokens=[SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    used = tokenizer.get_vocab_size()
    sep = tokenizer.token_to_id(SEPARATOR)
    ids = array("i")
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)
        ids.append(sep)
    description = (
        f"byte-level BPE trained at startup on the shipped corpus (HF tokenizers, {used} ids), "
        f"placed at ids 0-{used - 1} of the {vocab}-id vocabulary: the other ids never occur, "
        f"but the head still scores all {vocab} of them at every position"
    )
    return TokenizedCorpus(ids, used, sum(len(t.encode("utf-8")) for t in texts), len(texts), description)
