"""DNA: FASTA in, RC-aware sequence classifiers out (Mamba, transformer, DeepBind-style CNN), with reports.

    from leanseq import dna
    records = dna.read_fasta("peaks.fa.gz")                        # Biopython; plain or gzip; IUPAC -> N
    ids = dna.encode(records[0].sequence); rc = dna.reverse_complement_ids(ids)
    report = dna.classify({"oct4": "a.fa", "mafk": "b.fa"})         # models side by side, 5 seeds
    report = dna.run_long_range()                                   # JASPAR motifs far apart, accuracy vs length
    model = dna.load_classifier("leanseq-out/dna/classify-models/mamba-ps")
    logits = dna.classify_long(model, very_long_ids)                # chunked, constant memory

Heavy pieces (Biopython, pyjaspar, sklearn, matplotlib) are imported where they are used.
"""

from leanseq.dna.classify import ClassifySettings, ModelSpec, classify
from leanseq.dna.fasta import (
    FastaError,
    FastaRecord,
    decode,
    encode,
    read_fasta,
    read_label_table,
    read_labelled,
    reverse_complement,
    reverse_complement_ids,
    stack_equal_length,
)
from leanseq.dna.long_range import LongRangeSettings, make_dataset, run_long_range
from leanseq.dna.models import DNAClassifier, DNAConfig, augment_rc, load_classifier, save_classifier
from leanseq.dna.stream import StreamingClassifier, classify_long
from leanseq.dna.train import evaluate, fit

__all__ = [
    "ClassifySettings", "DNAClassifier", "DNAConfig", "FastaError", "FastaRecord", "LongRangeSettings", "ModelSpec",
    "StreamingClassifier", "augment_rc", "classify", "classify_long", "decode", "encode", "evaluate", "fit",
    "load_classifier", "make_dataset", "read_fasta", "read_label_table", "read_labelled", "reverse_complement",
    "reverse_complement_ids", "run_long_range", "save_classifier", "stack_equal_length",
]
