"""`pretrain finetune`: sequence classification on a pretrained checkpoint (pretrain, then fine-tune).

The examples (data), the classifier on the pretrained backbone (classifier), the training run (run) and the
subcommand (cli). Which features a family classifies from, and how it frames an example, its ModelSpec says
(``classification``): GPT the final hidden state of an EOS appended to every text, as GPT-2's classifier; BERT
``[CLS] text [SEP]`` through the pretrained pooler, as in the paper.
"""
