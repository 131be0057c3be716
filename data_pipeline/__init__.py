"""ImageNet (and any labelled image tree) to WebDataset shards, and streaming them back."""
