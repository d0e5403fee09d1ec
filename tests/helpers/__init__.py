"""Test helpers: an offline tiny tokenizer (``tokenizer``) and a loopback mock Hugging Face Hub (``hub_server``)."""
