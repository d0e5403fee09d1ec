"""Test helpers: an offline tiny tokenizer (``tokenizer``), a loopback mock Hugging Face Hub (``hub_server``) and
random packed matrices (``packed``)."""
