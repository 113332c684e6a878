"""Delta families: one package per family (`sparse`, `lora`), each registering itself (no torch) with its implementation beside it."""
