"""Optional integrations with other libraries.

Each submodule imports its library only when it is itself imported, so ``import pykd`` never
pulls them in. ``pykd.integrations.hf`` (Hugging Face ``transformers``) needs
``pip install "pykd[hf]"``.
"""
