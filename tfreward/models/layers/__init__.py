"""Building blocks shared by several families: `mlp.MLP`, `attention` (multi-head dot-product attention),
`dropout.Dropout` (Philox masks, fast under XLA on CPU)."""
