"""Reading model files: headers, tensors (lazily, memory-mapped), key layouts, GGUF / fp8 formats.

Below the models: nothing here imports ``dit/`` or ``encoders/`` (tests/test_import_structure.py); the DiT
loads itself in ``dit/loading.py`` and each encoder in its own module (``encoders/base.py``).
"""
