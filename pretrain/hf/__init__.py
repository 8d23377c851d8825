"""Hugging Face conversion, one module per architecture (gpt2, bert) over shared pieces (common); the driver of
``pretrain export hf`` (export) picks the module a checkpoint's family names in its ModelSpec (``hf_export``)."""
