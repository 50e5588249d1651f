"""Data sets and their preprocessing (run scripts from the repository root: this package shadows
Hugging Face's `datasets`)."""
