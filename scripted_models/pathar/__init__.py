"""PathAR: dual-VQ tokenizer + interleaved autoregressive transformer with asymmetric attention."""
