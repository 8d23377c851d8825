"""BERT (post-LN, MLM + NSP) on megatron-core's BertModel: the model and its spec (model), the post-LN layer
(layers)."""
