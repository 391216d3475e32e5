"""Known models and interop: the catalog and verified downloads (``catalog``, ``download``), and
Hugging Face Llava import and export (``llava_import``, ``llava_export``). Import from the
submodules: importing this package loads nothing heavy."""
