"""The built-in unlearning methods, one module each; the registry imports every module here (``registry``)."""
