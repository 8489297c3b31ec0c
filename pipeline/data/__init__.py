"""Input: WebDataset shards (write/verify) and the Ray Data stream that feeds the trainers."""
