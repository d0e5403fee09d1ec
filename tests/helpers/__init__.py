"""Test helpers: an offline tiny tokenizer (``tokenizer``), a loopback mock Hugging Face Hub (``hub_server``), MoE
builders (``moe``), save-and-reload checks (``reload``) and random packed matrices (``packed``)."""
